"""The Ansible role and the systemd unit, checked with the real tools.

The rollout to a booted systemd host is tests/test_rollout.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent
ROLE = ROOT / "ansible" / "roles" / "pgslowlog"
UNIT = ROOT / "etc" / "pgslowlog.service"
BIN = Path(sys.executable).parent


def run(*command: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)


def test_ansible_lint_production_profile():
    result = run(str(BIN / "ansible-lint"), "--profile", "production", "ansible/", cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Profile 'production' was required, and it passed" in result.stdout + result.stderr


def test_defaults_and_argument_specs_name_the_same_variables():
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    specs = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())
    options = specs["argument_specs"]["main"]["options"]
    assert sorted(defaults) == sorted(options)
    assert all(name.startswith("pgslowlog_") for name in defaults)
    for name, spec in options.items():
        assert spec["default"] == defaults[name], name


def test_playbook_syntax():
    result = run(
        str(BIN / "ansible-playbook"), "--syntax-check", "playbook.yml", cwd=ROOT / "ansible"
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("architecture", ["x86_64", "aarch64"])
def test_preflight_refuses_other_architectures_than_x86_64(tmp_path, architecture):
    # The role's own preflight tasks, run on the controller with the facts of a
    # Debian 12 host on the given architecture (set_fact, nothing gathered or changed).
    facts = {
        "architecture": architecture,
        "os_family": "Debian",
        "distribution": "Debian",
        "service_mgr": "systemd",
        "kernel": "6.1.0-28-amd64",
        "cacheable": True,
    }
    play = [
        {
            "name": "Preflight with a given architecture",
            "hosts": "localhost",
            "gather_facts": False,
            "tasks": [
                {"name": "Facts", "ansible.builtin.set_fact": facts},
                {
                    "name": "Preflight",
                    "ansible.builtin.import_tasks": str(ROLE / "tasks" / "preflight.yml"),
                },
            ],
        }
    ]
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play))
    result = run(
        str(BIN / "ansible-playbook"),
        "-i",
        "localhost,",
        "-c",
        "local",
        "play.yml",
        cwd=tmp_path,
        env={**os.environ, "ANSIBLE_NOCOLOR": "1"},
    )
    if architecture == "x86_64":
        assert result.returncode == 0, result.stdout + result.stderr
    else:
        assert result.returncode != 0, result.stdout
        assert "x86_64 only, not on aarch64" in result.stdout, result.stdout
        assert "arm64 is not supported yet" in result.stdout, result.stdout


def test_config_template_renders_a_config_pgslowlog_accepts(tmp_path):
    from pgslowlog.config import load_config

    variables = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    variables["pgslowlog_threshold_ms"] = 350
    variables["pgslowlog_targets"].append({"name": "second", "pid": 1})
    variables["pgslowlog_sinks"]["webhook"] = {
        "url": "https://collector.invalid/slow",
        "headers": {"X-Source": 'db "one"'},
        "headers_from_env": {"Authorization": "PGSLOWLOG_WEBHOOK_TOKEN"},
    }
    (tmp_path / "vars.json").write_text(json.dumps(variables))
    rendered = tmp_path / "pgslowlog.toml"
    result = run(
        str(BIN / "ansible"),
        "localhost",
        "-c",
        "local",
        "-m",
        "ansible.builtin.template",
        "-a",
        f"src={ROLE / 'templates' / 'pgslowlog.toml.j2'} dest={rendered}",
        "-e",
        f"@{tmp_path / 'vars.json'}",
        # ansible's temporary files go below $HOME, which an unprivileged user may not have
        env={**os.environ, "ANSIBLE_REMOTE_TMP": str(tmp_path / "ansible-tmp")},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    config = load_config(rendered)
    assert config.daemon.threshold_ms == 350
    assert [(t.name, t.binary, t.pid) for t in config.target] == [
        ("main", "/usr/lib/postgresql/15/bin/postgres", None),
        ("second", None, 1),
    ]
    assert config.sinks["webhook"]["headers"] == {"X-Source": 'db "one"'}
    assert config.sinks["file"] == {"path": "/var/log/pgslowlog/slow.jsonl"}


def test_role_installs_exactly_the_shipped_unit():
    assert (ROLE / "files" / "pgslowlog.service").resolve() == UNIT.resolve()


def test_unit_verifies(tmp_path):
    # verify checks that ExecStart exists: point it at this venv's pgslowlog
    unit = tmp_path / "pgslowlog.service"
    unit.write_text(UNIT.read_text().replace("/opt/pgslowlog/bin/", f"{BIN}/"))
    result = run("systemd-analyze", "verify", str(unit))
    assert result.returncode == 0, result.stderr
    security = run("systemd-analyze", "security", "--offline=true", str(unit))
    score = re.search(r"Overall exposure level for pgslowlog.service: ([\d.]+)", security.stdout)
    # 4.7: root, no system-call filter (bpf() and perf_event_open() are the job), and
    # no ProtectKernelModules (bcc reads the kernel headers under /lib/modules)
    assert score and float(score.group(1)) <= 4.7, security.stdout[-300:]


@pytest.mark.ebpf
def test_daemon_works_within_the_units_capabilities(pg18, start_daemon):
    """Run under exactly the unit's CapabilityBoundingSet and NoNewPrivileges."""
    lines = UNIT.read_text().splitlines()
    line = next(entry for entry in lines if entry.startswith("CapabilityBoundingSet="))
    capabilities = line.split("=", 1)[1].split()
    assert "NoNewPrivileges=yes" in UNIT.read_text()
    bounding = ",".join(["-all", *(f"+{c.removeprefix('CAP_').lower()}" for c in capabilities)])
    daemon = start_daemon(
        pg18, wrapper=["setpriv", "--no-new-privs", f"--bounding-set={bounding}", "--inh-caps=-all"]
    )
    status = Path(f"/proc/{daemon.process.process.pid}/status").read_text()
    bounding_now = int(re.search(r"CapBnd:\s+([0-9a-f]+)", status).group(1), 16)
    assert not bounding_now & (1 << 1)  # CAP_DAC_OVERRIDE is gone: the wrapper applied
    pg18.psql("select pg_sleep(0.3) /* within the unit's capabilities */", check=True)
    assert len(daemon.wait_for_events("within the unit's capabilities", 1)) == 1

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


def play_locally(tmp_path, play, *options: str):
    """ansible-playbook on this machine (connection local) with `play` as its playbook."""
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play))
    return run(
        str(BIN / "ansible-playbook"),
        "-i",
        "localhost,",
        "-c",
        "local",
        *options,
        "play.yml",
        cwd=tmp_path,
        # Its temporary files in the test's directory: not under the home directory of
        # the user the fast lane may run as (nobody's is /nonexistent).
        env={**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_REMOTE_TMP": str(tmp_path / "tmp")},
    )


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


def preflight(tmp_path, **facts: str) -> subprocess.CompletedProcess[str]:
    """The role's own preflight tasks, run on the controller with the facts of a Debian
    12 host on x86_64 but for `facts` (set_fact, nothing gathered or changed)."""
    host = {
        "architecture": "x86_64",
        "os_family": "Debian",
        "distribution": "Debian",
        "distribution_version": "12.8",
        "distribution_major_version": "12",
        "service_mgr": "systemd",
        "kernel": "6.1.0-28-amd64",
        **facts,
    }
    play = [
        {
            "name": "Preflight with given facts",
            "hosts": "localhost",
            "gather_facts": False,
            "vars_files": [str(ROLE / "defaults" / "main.yml"), str(ROLE / "vars" / "main.yml")],
            "tasks": [
                {"name": "Facts", "ansible.builtin.set_fact": {**host, "cacheable": True}},
                {
                    "name": "Preflight",
                    "ansible.builtin.import_tasks": str(ROLE / "tasks" / "preflight.yml"),
                },
            ],
        }
    ]
    # The interpreter named: discovery would go by the facts set above, not this machine.
    return play_locally(tmp_path, play, "-e", f"ansible_python_interpreter={sys.executable}")


@pytest.mark.parametrize("release", ["11", "12", "13"])
def test_preflight_admits_the_tested_debian_releases(tmp_path, release):
    result = preflight(tmp_path, distribution_major_version=release)
    assert result.returncode == 0, result.stdout + result.stderr


def test_preflight_refuses_other_architectures_than_x86_64(tmp_path):
    result = preflight(tmp_path, architecture="aarch64")
    assert result.returncode != 0, result.stdout
    assert "x86_64 only, not on aarch64" in result.stdout, result.stdout
    assert "arm64 is not supported yet" in result.stdout, result.stdout


@pytest.mark.parametrize(
    "facts",
    [
        {
            "distribution": "Ubuntu",
            "distribution_version": "24.04",
            "distribution_major_version": "24",
        },
        {
            "os_family": "RedHat",
            "distribution": "RedHat",
            "distribution_version": "9.4",
            "distribution_major_version": "9",
        },
        {"distribution_version": "10.13", "distribution_major_version": "10"},
    ],
    ids=["ubuntu", "rhel", "debian-10"],
)
def test_preflight_refuses_what_was_never_tested_in_one_line(tmp_path, facts):
    result = preflight(tmp_path, **facts)
    assert result.returncode != 0, result.stdout
    shown = f"{facts.get('distribution', 'Debian')} {facts['distribution_version']}"
    said = f"this role is tested on Debian 11, 12 and 13 only, not on {shown}"
    assert said in " ".join(result.stdout.split()), result.stdout


def test_config_template_renders_a_config_pgslowlog_accepts(tmp_path):
    from pgslowlog.config import load_config

    variables = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    variables["pgslowlog_threshold_ms"] = 350
    variables["pgslowlog_targets"] = [
        {"name": "main", "binary": "/usr/lib/postgresql/15/bin/postgres", "probes": ["auto"]},
        {"name": "second", "pid": 1},
    ]
    variables["pgslowlog_sinks"]["webhook"] = {
        "url": "https://collector.invalid/slow",
        "headers": {"X-Source": 'db "one"'},
        "headers_from_env": {"Authorization": "PGSLOWLOG_WEBHOOK_TOKEN"},
    }
    rendered = _render(tmp_path, variables)
    config = load_config(rendered)
    assert config.daemon.threshold_ms == 350
    assert [(t.name, t.binary, t.pid) for t in config.target] == [
        ("main", "/usr/lib/postgresql/15/bin/postgres", None),
        ("second", None, 1),
    ]
    assert config.sinks["webhook"]["headers"] == {"X-Source": 'db "one"'}
    assert config.sinks["file"] == {"path": "/var/log/pgslowlog/slow.jsonl"}


def _render(tmp_path: Path, variables: dict[str, object]) -> Path:
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
        f"@{ROLE / 'vars' / 'main.yml'}",  # the paths made from the variables
        "-e",
        f"@{tmp_path / 'vars.json'}",
        # ansible's temporary files go below $HOME, which an unprivileged user may not have
        env={**os.environ, "ANSIBLE_REMOTE_TMP": str(tmp_path / "ansible-tmp")},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return rendered


def test_every_daemon_key_is_a_role_variable_with_the_daemons_default(tmp_path):
    import msgspec

    from pgslowlog.config import DaemonConfig, load_config

    keys = [f.name for f in msgspec.structs.fields(DaemonConfig)]
    assert len(keys) == 15
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    for key in keys:
        assert defaults[f"pgslowlog_{key}"] == getattr(DaemonConfig(), key), key
    defaults["_pgslowlog_found_targets"] = [{"name": "main", "pid": 1}]  # what the role finds
    rendered = _render(tmp_path, defaults)
    assert load_config(rendered).daemon == DaemonConfig()
    daemon = rendered.read_text().split("[daemon]")[1].split("[[target]]")[0]
    # A key whose default is unset (None) is left out, as TOML has no null.
    written = [key for key in keys if getattr(DaemonConfig(), key) is not None]
    assert written == ["threshold_ms", *written[1:]] and "sample_interval_ms" not in written
    assert sorted(re.findall(r"^(\w+) = ", daemon, re.M)) == sorted(written)

    # Every key reaches the file: each set to a value other than its default.
    others = {
        "threshold_ms": 12.5,
        "query_max_bytes": 1024,
        "max_backends": 512,
        "ring_buffer_mib": 32,
        "sink_queue_size": 500,
        "include_background": True,
        "log_level": "debug",
        "stats_interval_s": 5.0,
        "capture_params": True,
        "params_max_length": 64,
        "redact_literals": True,
        "sample_interval_ms": 20.0,
        "blocked_by": False,
        "resources": False,
        "host": "db1.example",
    }
    assert sorted(others) == sorted(keys)
    changed = _render(
        tmp_path, {**defaults, **{f"pgslowlog_{key}": value for key, value in others.items()}}
    )
    assert msgspec.structs.asdict(load_config(changed).daemon) == others


def test_metrics_variables_reach_the_file_and_default_to_off(tmp_path):
    from pgslowlog.config import MetricsConfig, load_config

    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    defaults["_pgslowlog_found_targets"] = [{"name": "main", "pid": 1}]
    assert load_config(_render(tmp_path, defaults)).metrics is None
    assert defaults["pgslowlog_metrics_max_databases"] == MetricsConfig(listen="").max_databases
    assert defaults["pgslowlog_metrics_max_users"] == MetricsConfig(listen="").max_users
    serving = {
        **defaults,
        "pgslowlog_metrics_listen": "[::1]:9900",
        "pgslowlog_metrics_max_databases": 5,
        "pgslowlog_metrics_max_users": 7,
    }
    assert load_config(_render(tmp_path, serving)).metrics == MetricsConfig(
        listen="[::1]:9900", max_databases=5, max_users=7
    )


CLICKHOUSE_PASSWORD = "s3cret-from-vault"


def test_clickhouse_variables_write_the_sink_with_a_password_file_and_default_to_off(tmp_path):
    import msgspec

    from pgslowlog.config import load_config
    from pgslowlog.plugins.clickhouse_schema import DEFAULT_TABLE
    from pgslowlog.plugins.clickhouse_sink import ClickHouseOptions

    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    defaults["_pgslowlog_found_targets"] = [{"name": "main", "pid": 1}]
    assert defaults["pgslowlog_clickhouse_table"] == DEFAULT_TABLE
    off = _render(tmp_path, defaults)
    assert "clickhouse" not in load_config(off).sinks
    assert "[sinks.clickhouse]" not in off.read_text()
    assert not re.search(r"^host = ", off.read_text(), re.M)  # the machine's host name

    sending = {
        **defaults,
        "pgslowlog_host": "{{ inventory_hostname }}",  # the common choice, templated
        "pgslowlog_clickhouse_url": "http://ch1.example:8123",
        "pgslowlog_clickhouse_user": "pgslowlog",
        "pgslowlog_clickhouse_password": CLICKHOUSE_PASSWORD,
        "pgslowlog_clickhouse_ca_file": "/etc/pgslowlog/clickhouse-ca.pem",
        "pgslowlog_clickhouse_cert_file": "/etc/pgslowlog/client.pem",
        "pgslowlog_clickhouse_key_file": "/etc/pgslowlog/client.key",
        "pgslowlog_clickhouse_options": {"max_batch": 5000, "spool_max_mb": 256},
    }
    rendered = _render(tmp_path, sending)
    config = load_config(rendered)
    assert config.daemon.host == "localhost"
    assert config.sinks["clickhouse"] == {
        "url": "http://ch1.example:8123",
        "table": "pgslowlog.slow_queries",
        "user": "pgslowlog",
        "password_file": "/etc/pgslowlog/clickhouse-password",
        "verify_tls": True,
        "ca_file": "/etc/pgslowlog/clickhouse-ca.pem",
        "cert_file": "/etc/pgslowlog/client.pem",
        "key_file": "/etc/pgslowlog/client.key",
        "max_batch": 5000,
        "spool_max_mb": 256,
    }
    assert config.sinks["file"] == {"path": "/var/log/pgslowlog/slow.jsonl"}  # kept beside it
    msgspec.convert(config.sinks["clickhouse"], ClickHouseOptions)  # what the sink accepts
    assert CLICKHOUSE_PASSWORD not in rendered.read_text()
    assert not re.search(r"^password = ", rendered.read_text(), re.M)

    # The least: a URL; no user, no password_file, no TLS files, the default table.
    least = _render(
        tmp_path,
        {
            **defaults,
            "pgslowlog_clickhouse_url": "https://ch.example:8443",
            "pgslowlog_host": "db1",
        },
    )
    config = load_config(least)
    assert config.daemon.host == "db1"
    assert config.sinks["clickhouse"] == {
        "url": "https://ch.example:8443",
        "table": DEFAULT_TABLE,
        "verify_tls": True,
    }


def _configure_task(name: str) -> dict[str, object]:
    tasks = yaml.safe_load((ROLE / "tasks" / "configure.yml").read_text())
    return next(task for task in tasks if task["name"] == name)


def test_clickhouse_password_is_written_0600_once_never_shown_and_removed_unused(tmp_path):
    import grp
    import pwd

    write = _configure_task("Write the clickhouse sink's password")
    remove = _configure_task("Remove the clickhouse sink's password when no sink uses it")
    # The role's own tasks; only where they write, and as whom, are this test's.
    target = tmp_path / "clickhouse-password"
    assert write["ansible.builtin.copy"]["dest"] == remove["ansible.builtin.file"]["path"]
    assert "else pgslowlog_user }}" in write["ansible.builtin.copy"]["owner"]
    assert write["no_log"] is True and write["diff"] is False
    write["ansible.builtin.copy"]["dest"] = remove["ansible.builtin.file"]["path"] = str(target)
    write["ansible.builtin.copy"]["owner"] = pwd.getpwuid(os.getuid()).pw_name
    write["ansible.builtin.copy"]["group"] = grp.getgrgid(os.getgid()).gr_name

    def play(password: str, **keywords: object) -> subprocess.CompletedProcess[str]:
        return play_locally(
            tmp_path,
            [
                {
                    "name": "The clickhouse password's tasks",
                    "hosts": "localhost",
                    "gather_facts": False,
                    "vars": {
                        "ansible_python_interpreter": sys.executable,
                        "pgslowlog_clickhouse_url": "https://ch.example:8443",
                        "pgslowlog_clickhouse_password": password,
                    },
                    **keywords,
                    "tasks": [write, remove],
                    "handlers": [{"name": "Restart pgslowlog", "ansible.builtin.debug": None}],
                }
            ],
            "-vv",
        )

    first, second = play(CLICKHOUSE_PASSWORD), play(CLICKHOUSE_PASSWORD)
    assert first.returncode == 0 and second.returncode == 0, first.stdout + second.stdout
    assert target.read_text() == CLICKHOUSE_PASSWORD
    assert target.stat().st_mode & 0o777 == 0o600
    assert "RUNNING HANDLER [Restart pgslowlog]" in first.stdout, first.stdout
    assert "changed=1" in first.stdout and "changed=0" in second.stdout, second.stdout

    # A new password in check mode with --diff: said to change, not written, not shown.
    checked = play("n3w-s3cret", check_mode=True, diff=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "changed=1" in checked.stdout, checked.stdout
    assert target.read_text() == CLICKHOUSE_PASSWORD
    for result in (first, second, checked):
        output = result.stdout + result.stderr
        assert CLICKHOUSE_PASSWORD not in output and "n3w-s3cret" not in output, output

    removed = play("")
    assert removed.returncode == 0 and "changed=1" in removed.stdout, removed.stdout
    assert not target.exists()


@pytest.mark.parametrize(
    ("variables", "refused"),
    [
        ({}, False),
        ({"pgslowlog_sinks": {"clickhouse": {"url": "http://ch1:8123"}}}, True),
        ({"pgslowlog_clickhouse_options": {"password": CLICKHOUSE_PASSWORD}}, True),
        ({"pgslowlog_clickhouse_url": f"http://u:{CLICKHOUSE_PASSWORD}@ch1:8123"}, True),
    ],
)
def test_clickhouse_sink_is_set_through_its_variables_only(tmp_path, variables, refused):
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    defaults["pgslowlog_clickhouse_url"] = "http://ch1.example:8123"
    play = [
        {
            "name": "The role's clickhouse check",
            "hosts": "localhost",
            "gather_facts": False,
            "vars": {**defaults, **variables},
            "tasks": [
                _configure_task("Check that the clickhouse sink is set through its variables only")
            ],
        }
    ]
    result = play_locally(tmp_path, play)
    assert (result.returncode != 0) == refused, result.stdout
    if refused:
        assert "leave clickhouse out of pgslowlog_sinks" in result.stdout, result.stdout
        assert CLICKHOUSE_PASSWORD not in result.stdout


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("pgslowlog_log_level", "verbose", "pgslowlog_log_level must be one of"),
        ("pgslowlog_ring_buffer_mib", 3, "pgslowlog_ring_buffer_mib must be one of"),
        ("pgslowlog_max_backends", "many", "pgslowlog_max_backends"),
        ("pgslowlog_redact_literals", "perhaps", "pgslowlog_redact_literals"),
    ],
)
def test_argument_specs_refuse_a_bad_value_before_any_task(tmp_path, variable, value, says):
    play = [
        {
            "name": "The role with one bad variable",
            "hosts": "localhost",
            "gather_facts": False,
            "roles": [{"role": str(ROLE), variable: value}],
        }
    ]
    result = play_locally(tmp_path, play)
    assert result.returncode != 0, result.stdout
    assert "Validating arguments against arg spec" in result.stdout, result.stdout
    assert says in result.stdout, result.stdout
    assert "TASK [pgslowlog : Check the architecture" not in result.stdout  # nothing ran


def test_role_installs_exactly_the_shipped_unit():
    assert (ROLE / "files" / "pgslowlog.service").resolve() == UNIT.resolve()


@pytest.mark.system  # systemd-analyze
def test_unit_verifies(tmp_path):
    # verify checks that ExecStart exists: point it at this venv's pgslowlog
    unit = tmp_path / "pgslowlog.service"
    unit.write_text(UNIT.read_text().replace("/opt/pgslowlog/bin/", f"{BIN}/"))
    result = run("systemd-analyze", "verify", str(unit))
    assert result.returncode == 0, result.stderr
    security = run("systemd-analyze", "security", "--offline=true", str(unit))
    score = re.search(r"Overall exposure level for pgslowlog.service: ([\d.]+)", security.stdout)
    # 2.6 (it was 4.7 as root with no system-call filter): what is left is the job,
    # CAP_SYS_ADMIN and CAP_SYS_PTRACE, bpf() and perf_event_open(), the network a
    # sink may use, and /lib/modules readable (bcc's kernel headers). Inside the
    # rollout's hosts the same unit scores 2.4 (tests/test_rollout.py checks it there).
    assert score and float(score.group(1)) <= 2.6, security.stdout[-300:]


def _unit_setting(name: str) -> list[str]:
    line = next(entry for entry in UNIT.read_text().splitlines() if entry.startswith(f"{name}="))
    return line.split("=", 1)[1].split()


def test_unit_runs_as_a_user_with_exactly_its_bounding_capabilities():
    assert _unit_setting("User") == ["pgslowlog"]
    assert _unit_setting("AmbientCapabilities") == _unit_setting("CapabilityBoundingSet")
    assert "PrivateUsers" not in UNIT.read_text()  # a user namespace would void the capabilities
    assert _unit_setting("SystemCallFilter")[:1] == ["@system-service"]


def test_the_units_capabilities_pass_the_privilege_check():
    from pgslowlog import machine
    from pgslowlog.machine import check_privileges

    unit = sum(1 << getattr(machine, name) for name in _unit_setting("AmbientCapabilities"))
    finding = check_privileges(unit, "6.18.44")
    assert finding.ok and not finding.warning, finding
    # CAP_BPF and CAP_PERFMON without CAP_SYS_ADMIN: refused by name on 6.16 and newer,
    # where perf_event_open() of a uprobe returns EACCES to them.
    perfmon = (1 << machine.CAP_PERFMON) | (1 << machine.CAP_BPF) | (1 << machine.CAP_SYS_PTRACE)
    refused = check_privileges(perfmon, "6.18.44")
    assert not refused.ok
    assert str(refused).startswith("error: privileges: CAP_SYS_ADMIN is missing"), refused
    assert check_privileges(perfmon, "6.1.0").warning
    no_ptrace = check_privileges(1 << machine.CAP_SYS_ADMIN, "6.18.44")
    assert no_ptrace.ok and no_ptrace.warning and "CAP_SYS_PTRACE" in str(no_ptrace)


@pytest.mark.ebpf
def test_daemon_works_within_the_units_capabilities(pg18, start_daemon):
    """Run under exactly the unit's CapabilityBoundingSet and NoNewPrivileges (as root
    here; as the unit's user with them as ambient capabilities: tests/test_rollout.py)."""
    capabilities = _unit_setting("CapabilityBoundingSet")
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


def test_explain_variables_reach_the_file_and_default_to_off(tmp_path):
    from pgslowlog.config import ExplainConfig, load_config

    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    defaults["_pgslowlog_found_targets"] = [{"name": "main", "pid": 1}]
    assert load_config(_render(tmp_path, defaults)).explain is None
    explaining = {
        **defaults,
        "pgslowlog_explain": True,
        "pgslowlog_explain_options": {"user": "planner", "timeout_ms": 3000},
    }
    assert load_config(_render(tmp_path, explaining)).explain == ExplainConfig(
        user="planner", timeout_ms=3000
    )
    assert load_config(
        _render(tmp_path, {**explaining, "pgslowlog_explain_options": {}})
    ).explaining


@pytest.mark.ebpf  # root (the role runs psql through runuser), as the root lane has; no probe
def test_role_creates_the_explain_role_once_with_only_the_grants_listed(tmp_path):
    from conftest import DEBIAN_PG15

    from pgslowlog.testing.cluster import Cluster

    cluster = Cluster(DEBIAN_PG15).start()
    try:
        cluster.psql("create table orders (id int)", "create table secret (id int)", check=True)
        play = [
            {
                "name": "The role's explain tasks against a throwaway server",
                "hosts": "localhost",
                "gather_facts": False,
                # not whatever python3 interpreter discovery would find first on PATH
                "vars": {"ansible_python_interpreter": sys.executable},
                "tasks": [
                    {
                        "name": "Explain role",
                        "ansible.builtin.include_role": {
                            "name": str(ROLE),
                            "tasks_from": "explain",
                        },
                        "vars": {
                            "pgslowlog_explain": True,
                            "pgslowlog_explain_socket_directory": str(cluster.base),
                            "pgslowlog_explain_port": cluster.port,
                            "pgslowlog_explain_grants": ["GRANT SELECT ON orders TO pgslowlog"],
                        },
                    }
                ],
            }
        ]
        first, second = play_locally(tmp_path, play), play_locally(tmp_path, play)
        rights = cluster.psql(
            "select rolsuper, rolcanlogin, has_table_privilege('pgslowlog', 'orders', 'select'),"
            " has_table_privilege('pgslowlog', 'secret', 'select')"
            " from pg_roles where rolname = 'pgslowlog'",
            check=True,
        ).stdout.strip()
    finally:
        cluster.stop()
    assert first.returncode == 0 and second.returncode == 0, first.stdout + second.stdout
    assert "changed=1" in first.stdout and "changed=0" in second.stdout, (
        first.stdout + second.stdout
    )
    assert rights == "f|t|t|f"

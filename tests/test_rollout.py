"""The example playbook and inventory, run for real on three booted systemd hosts.

Debian 11, 12 and 13 (tests/nspawn_fleet.py), sharing this machine's network: the
default install from a wheel (its dependencies from the package index), check mode on
fresh and on configured hosts, one phase by its tag, and a new config checked as the
service's user inside the unit's sandbox. The air-gapped install and the uninstall are
tests/test_rollout_offline.py. The service runs as the role's `pgslowlog` user with
the unit's ambient capabilities and system call filter.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleet import DEBIAN_PYTHONS
from nspawn_fleet import Fleet, Host, booted_fleet, build_wheel, changed, kernel_headers_repository
from prometheus_server import prometheus
from waiting import wait_until

from pgslowlog import machine as checks

pytestmark = pytest.mark.ebpf

ROOT = Path(__file__).parent.parent
UNIT = ROOT / "etc" / "pgslowlog.service"
# `systemd-analyze security pgslowlog` inside each host (systemd 247, 252, 257); the
# unit scored 4.5 there (4.7 offline) when it ran as root without a system-call filter.
EXPOSURE_AT_MOST = 2.6
FAIL_AT_SETUP = "PGSLOWLOG_TEST_ROLLOUT_FAIL_AT_SETUP"
# The example inventory's hosts that keep the default kernel-headers path ("running").
RUNNING_HEADERS = ("db1", "db2")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("rollout")
    wheel_build = build_wheel(workdir / "dist")
    try:
        with booted_fleet(
            workdir, cut_off=False, fail_at_setup=os.environ.get(FAIL_AT_SETUP)
        ) as booted:
            if wheel_build.wait() != 0:
                raise RuntimeError("pip wheel failed")
            booted.wheel = next((workdir / "dist").glob("pgslowlog-*.whl"))
            yield booted
    finally:
        if wheel_build.poll() is None:
            wheel_build.kill()
            wheel_build.wait()


@pytest.fixture(scope="module")
def headers_package(fleet: Fleet) -> str:
    """The running kernel's headers package, in a repository of each host that keeps
    the default path (Debian has none for this machine's kernel)."""
    names = {
        kernel_headers_repository(host, os.uname().release)
        for host in fleet.hosts
        if host.name in RUNNING_HEADERS
    }
    return names.pop()


def _unit_capabilities() -> int:
    line = next(
        entry for entry in UNIT.read_text().splitlines() if entry.startswith("AmbientCapabilities=")
    )
    return sum(1 << getattr(checks, name) for name in line.split("=", 1)[1].split())


def test_a_set_up_that_fails_after_boot_leaves_nothing_running(tmp_path):
    """The fixture's own failure path, run for real in a pytest of its own: the containers
    had booted when the set-up failed, and they are powered off all the same."""
    inner = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            f"--basetemp={tmp_path / 'inner'}",
            f"{__file__}::test_check_mode_on_fresh_hosts_changes_nothing",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env={**os.environ, FAIL_AT_SETUP: "1"},
    )
    output = inner.stdout + inner.stderr
    assert inner.returncode == 1, output[-3000:]
    assert "set-up failed on purpose" in output and "1 error" in output, output[-3000:]
    # Its own leak check found nothing left (and ours, after this test, checks again).
    assert "left over" not in output, output[-3000:]
    mounts = Path("/proc/self/mounts").read_text()
    assert str(tmp_path / "inner") not in mounts, "an overlay was left mounted"
    assert not list((tmp_path / "inner").glob("rollout*")), "a container's files were left"


def test_check_mode_on_fresh_hosts_changes_nothing(fleet: Fleet, headers_package: str):
    """--check --diff before anything is installed: it says what would change, passes
    the checks that need what is not there yet, and writes nothing."""
    dry = fleet.playbook("--check", "--diff", pgslowlog_wheel=str(fleet.wheel))
    assert dry.returncode == 0, dry.stdout[-5000:]
    assert all(count > 0 for count in changed(dry.stdout).values()), dry.stdout[-3000:]
    assert sorted(changed(dry.stdout)) == sorted(host.name for host in fleet.hosts)
    assert "would be installed (installed now: none)" in dry.stdout, dry.stdout[-3000:]
    for host in fleet.hosts:
        for path in ("/opt/pgslowlog", "/etc/pgslowlog", "/etc/systemd/system/pgslowlog.service"):
            assert not host.exists(path), (host.name, path)
        assert host.run("getent", "passwd", "pgslowlog", check=False).returncode == 2
        if host.name in RUNNING_HEADERS:  # said, not installed
            assert not host.exists(f"/lib/modules/{os.uname().release}/build")
            shown = host.run("dpkg-query", "-W", headers_package, check=False)
            assert shown.returncode != 0, shown.stdout


def test_playbook_rolls_out_a_working_service_to_three_releases(fleet: Fleet, headers_package: str):
    hosts = fleet.hosts
    first = fleet.playbook(pgslowlog_wheel=str(fleet.wheel))
    assert first.returncode == 0, first.stdout[-4000:] + fleet.journals()
    assert sorted(changed(first.stdout)) == sorted(host.name for host in hosts)
    capabilities = _unit_capabilities()
    kernel = os.uname().release
    for host in hosts:
        assert host.active() == "active", host.journal()
        # The role's user, holding exactly the unit's capabilities, nothing more.
        status = host.run("cat", f"/proc/{host.show('MainPID')}/status").stdout
        uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))
        assert host.run("id", "-nu", str(uid)).stdout.strip() == "pgslowlog", status
        assert int(re.search(r"^CapEff:\s+([0-9a-f]+)", status, re.M).group(1), 16) == capabilities
        # The binary of this host's own PostgreSQL: found by the role, or named (db2).
        config = host.config().decode()
        assert f'binary = "{host.binary}"' in config, config
        assert re.search(r"^max_backends = 16384$", config, re.M), config
        # The kernel headers: the default path installed the running kernel's package.
        installed = host.run("dpkg-query", "-W", headers_package, check=False)
        assert (installed.returncode == 0) == (host.name in RUNNING_HEADERS), installed.stdout
        assert host.exists(f"/lib/modules/{kernel}/build")
        security = host.run("systemd-analyze", "security", "pgslowlog", check=False).stdout
        score = re.search(r"Overall exposure level for pgslowlog.service: ([\d.]+)", security)
        assert score and float(score.group(1)) <= EXPOSURE_AT_MOST, (host.name, security[-2000:])
        print(f"{host.name}: exposure {score.group(1)}")

    # The unit refuses a call outside its filter with EPERM, which could fail quietly.
    # Here such a call kills the daemon instead (SIGSYS): everything below, capture,
    # reload and stop on each release's Python and bcc, proves the filter is enough.
    for host in hosts:
        eperm = host.show("SystemCallErrorNumber")
        dropin = host.tree / "etc" / "systemd" / "system" / "pgslowlog.service.d"
        (dropin / "sigsys.conf").write_text("[Service]\nSystemCallErrorNumber=\n")
        host.run("systemctl", "daemon-reload")
        assert host.show("SystemCallErrorNumber") != eperm
        host.run("systemctl", "restart", "pgslowlog")

    for host in hosts:
        host.psql(f"select pg_sleep(0.3) /* rolled out to {host.release} */")
    for host in hosts:
        event = wait_until(
            lambda h=host: next((e for e in h.events() if f"to {h.release}" in e["query"]), None),
            15,
            f"the statement on {host.name} logged",
        )
        assert event["binary"] == host.binary, event
        assert event["host"] == host.name, event  # the example's pgslowlog_host
        # And to syslog, the example's second sink: /dev/log is journald's, here.
        wait_until(
            lambda h=host: (
                f"rolled out to {h.release}"
                in h.run("journalctl", "--no-pager", "-o", "cat", "-n", "3000").stdout
            ),
            15,
            f"the statement on {host.name} in its journal, through syslog",
        )

    # One Prometheus scrapes the fleet: a series per host, each its own Python and bcc.
    instances = {f"127.0.0.1:{host.metrics_port}": host for host in hosts}
    with prometheus(fleet.workdir / "prometheus", {"pgslowlog": list(instances)}) as server:
        slow = server.wait_for(
            "sum by (instance) (pgslowlog_slow_statements_total)",
            ("instance",),
            lambda found: len(found) == len(hosts) and all(v >= 1 for v in found.values()),
        )
        builds = server.values("pgslowlog_build_info", "instance", "python", "bcc")
        attached = server.values("pgslowlog_target_probes_attached", "instance", "target")
    for (instance, python, bcc), _ in builds.items():
        print(f"{instances[instance].name}: python {python}, bcc {bcc}, slow {slow[instance,]}")
    assert {(instances[i].release, p.rsplit(".", 1)[0]) for i, p, _ in builds} == {
        (host.release, DEBIAN_PYTHONS[host.release]) for host in hosts
    }
    # Each host's bcc is its own release's python3-bpfcc (0.18.0+ds-2 reports 0.18.0).
    packaged = {
        host.release: host.run("dpkg-query", "-W", "-f", "${Version}", "python3-bpfcc").stdout
        for host in hosts
    }
    assert {instances[i].release: b for i, _, b in builds} == {
        release: re.split(r"[+~-]", version)[0] for release, version in packaged.items()
    }, packaged
    assert attached == {(instance, "main"): 1 for instance in instances}

    second = fleet.playbook(pgslowlog_wheel=str(fleet.wheel))
    assert second.returncode == 0, second.stdout[-3000:]
    assert changed(second.stdout) == {host.name: 0 for host in hosts}, second.stdout[-3000:]


def test_configure_tag_alone_rewrites_the_config_and_reloads(fleet: Fleet):
    """--tags pgslowlog_configure: the preflight first, then the config, then a reload
    (SIGHUP through ExecReload) under the system call filter, on all three."""
    hosts = fleet.hosts
    pids_before = {host.name: host.show("MainPID") for host in hosts}
    third = fleet.playbook(
        "--tags",
        "pgslowlog_configure",
        pgslowlog_wheel=str(fleet.wheel),
        pgslowlog_threshold_ms=1000,
    )
    assert third.returncode == 0, third.stdout[-3000:]
    assert "TASK [pgslowlog : Check the operating system" in third.stdout  # preflight ran
    assert "TASK [pgslowlog : Copy the wheel]" not in third.stdout  # install did not
    assert "RUNNING HANDLER [pgslowlog : Reload pgslowlog]" in third.stdout
    assert "Restart pgslowlog" not in third.stdout
    assert {host.name: host.show("MainPID") for host in hosts} == pids_before  # not restarted
    for host in hosts:
        host.psql(f"select pg_sleep(0.3) /* under the new threshold on {host.release} */")
        host.psql(f"select pg_sleep(1.1) /* over the new threshold on {host.release} */")
    for host in hosts:
        wait_until(
            lambda h=host: any("over the new" in e["query"] for e in h.events()),
            15,
            f"the statement over the new threshold on {host.name} logged",
        )
        # The one under ended first: had it been logged, it would be in the file already.
        assert not any("under the new" in e["query"] for e in host.events())
        assert "reload_needs_restart" not in host.journal()  # the reload applied it all


def test_check_mode_on_configured_hosts_says_what_would_change_and_changes_nothing(
    fleet: Fleet,
):
    hosts = fleet.hosts
    pids_before = {host.name: host.show("MainPID") for host in hosts}
    configs_before = {host.name: host.config() for host in hosts}
    dry = fleet.playbook(
        "--check", "--diff", pgslowlog_wheel=str(fleet.wheel), pgslowlog_threshold_ms=2000
    )
    assert dry.returncode == 0, dry.stdout[-4000:]
    # The config, and the reload it would ask for.
    assert changed(dry.stdout) == {host.name: 2 for host in hosts}, dry.stdout[-4000:]
    assert "\n-threshold_ms = 1000.0\n" in dry.stdout, dry.stdout[-4000:]
    assert "\n+threshold_ms = 2000.0\n" in dry.stdout, dry.stdout[-4000:]
    assert "RUNNING HANDLER [pgslowlog : Reload pgslowlog]" in dry.stdout
    for host in hosts:
        assert host.config() == configs_before[host.name]
        assert host.show("MainPID") == pids_before[host.name]


def test_service_tag_alone_starts_a_stopped_service(fleet: Fleet):
    for host in fleet.hosts:
        host.run("systemctl", "stop", "pgslowlog")
    started = fleet.playbook(
        "--tags", "pgslowlog_service", pgslowlog_wheel=str(fleet.wheel), pgslowlog_threshold_ms=1000
    )
    assert started.returncode == 0, started.stdout[-3000:]
    assert "TASK [pgslowlog : Check the kernel" in started.stdout  # preflight ran
    assert changed(started.stdout) == {host.name: 1 for host in fleet.hosts}, started.stdout
    for host in fleet.hosts:
        assert host.active() == "active", host.journal()


def test_a_restart_applies_what_a_reload_cannot(fleet: Fleet):
    hosts = fleet.hosts
    pids_before = {host.name: host.show("MainPID") for host in hosts}
    restart = fleet.playbook(
        pgslowlog_wheel=str(fleet.wheel), pgslowlog_threshold_ms=1000, pgslowlog_stats_interval_s=1
    )
    assert restart.returncode == 0, restart.stdout[-3000:]
    assert "RUNNING HANDLER [pgslowlog : Restart pgslowlog]" in restart.stdout
    for host in hosts:
        assert host.show("MainPID") != pids_before[host.name]
        assert host.active() == "active"
    for host in hosts:  # the new daemon writes a health line a second, not a minute

        def health_lines(h: Host = host, pid: str = host.show("MainPID")) -> int:
            lines = h.journal().splitlines()
            return sum(f"pgslowlog[{pid}]" in line and '"health"' in line for line in lines)

        wait_until(
            lambda h=host: health_lines(h) >= 2, 15, f"two health lines from {host.name}'s daemon"
        )


SETTLED = {"pgslowlog_threshold_ms": 1000, "pgslowlog_stats_interval_s": 1}


@pytest.mark.parametrize(
    ("variables", "says"),
    [
        # In the argument spec's range (an int), refused by the daemon (over 16384).
        ({"pgslowlog_query_max_bytes": 100000}, "query_max_bytes"),
        # A file only root can read: the service's user could not.
        (
            {
                "pgslowlog_clickhouse_url": "http://127.0.0.1:9",
                "pgslowlog_clickhouse_ca_file": "/etc/ssl/private/pgslowlog-test-ca.pem",
            },
            "ca_file: cannot read /etc/ssl/private/pgslowlog-test-ca.pem",
        ),
        # A sink directory the service's user may not write.
        (
            {"pgslowlog_sinks": {"file": {"path": "/srv/root-only/slow.jsonl"}}},
            "user pgslowlog cannot write /srv/root-only",
        ),
    ],
    ids=["out-of-range", "root-only-file", "root-only-directory"],
)
def test_a_config_the_service_could_not_use_fails_the_play_and_the_old_one_stays(
    fleet: Fleet, variables: dict[str, object], says: str
):
    """`pgslowlog check` of the new file, as the service's user inside the unit's
    sandbox, fails the template task: the old file stays and the service is untouched."""
    hosts = fleet.hosts
    for host in hosts:
        (host.tree / "etc/ssl/private").mkdir(mode=0o700, exist_ok=True)
        (host.tree / "etc/ssl/private/pgslowlog-test-ca.pem").write_text("root's alone\n")
        (host.tree / "etc/ssl/private/pgslowlog-test-ca.pem").chmod(0o600)
        (host.tree / "srv" / "root-only").mkdir(mode=0o755, exist_ok=True)
    pids_before = {host.name: host.show("MainPID") for host in hosts}
    configs_before = {host.name: host.config() for host in hosts}
    refused = fleet.playbook(pgslowlog_wheel=str(fleet.wheel), **SETTLED, **variables)
    assert refused.returncode != 0, refused.stdout[-3000:]
    for host in hosts:
        assert f"fatal: [{host.name}]" in refused.stdout, refused.stdout[-3000:]
        assert host.config() == configs_before[host.name]
        assert host.show("MainPID") == pids_before[host.name]
    assert says in refused.stdout, refused.stdout[-3000:]
    assert refused.stdout.count("TASK [pgslowlog : Write the configuration") == 1


def test_a_file_sink_outside_var_log_is_made_writable_in_the_sandbox(fleet: Fleet):
    """ProtectSystem=strict makes /srv read-only to the service: the role makes the
    sink's directory, its drop-in adds it to ReadWritePaths=, and the daemon writes there."""
    sinks = {"file": {"path": "/srv/slowlog/slow.jsonl"}}
    moved = fleet.playbook(pgslowlog_wheel=str(fleet.wheel), **SETTLED, pgslowlog_sinks=sinks)
    assert moved.returncode == 0, moved.stdout[-3000:] + fleet.journals()
    assert "RUNNING HANDLER [pgslowlog : Restart pgslowlog]" in moved.stdout
    for host in fleet.hosts:
        dropin = (host.tree / "etc/systemd/system/pgslowlog.service.d/role.conf").read_text()
        assert "ReadWritePaths=-/srv/slowlog\n" in dropin, dropin
        made = host.run("stat", "-c", "%U:%G %a", "/srv/slowlog").stdout.strip()
        assert made == "pgslowlog:pgslowlog 750", made
        assert host.active() == "active", host.journal()
        host.psql(f"select pg_sleep(1.1) /* into /srv on {host.release} */")
    for host in fleet.hosts:
        wait_until(
            lambda h=host: any(
                "into /srv" in e["query"] for e in h.events("/srv/slowlog/slow.jsonl")
            ),
            15,
            f"the statement on {host.name} written to /srv/slowlog",
        )
    again = fleet.playbook(pgslowlog_wheel=str(fleet.wheel), **SETTLED, pgslowlog_sinks=sinks)
    assert changed(again.stdout) == {host.name: 0 for host in fleet.hosts}, again.stdout[-3000:]


def test_a_clean_stop_under_the_filter(fleet: Fleet):
    """No SIGSYS, no failure, the daemon's own last word."""
    for host in fleet.hosts:
        host.run("systemctl", "stop", "pgslowlog")
        assert host.show("Result") == "success", host.journal()
        assert host.show("ExecMainStatus") == "0", host.journal()
        journal = host.journal()
        assert '"event": "stopped"' in journal, journal
        assert "Traceback" not in journal, journal

"""The example playbook, run once for real against a fleet of three booted systemd hosts.

Debian 11, 12 and 13 trees (built once each by .ci/build-debian-tree) boot side by
side under systemd-nspawn, each on a fresh overlay of its own (the cached tree is
never written), each with its own packaged PostgreSQL (13, 15, 17). One inventory
names the three; ansible-playbook reaches them over SSH on loopback and installs
pgslowlog with the role, as on a fleet. The service runs as the role's `pgslowlog`
user with the unit's ambient capabilities and system call filter.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fleet import DEBIAN_MAJORS, DEBIAN_PYTHONS, TREES
from prometheus_server import prometheus
from waiting import wait_until

from pgslowlog import machine as checks
from pgslowlog.testing.cluster import free_ports

pytestmark = pytest.mark.ebpf

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent
UNIT = ROOT / "etc" / "pgslowlog.service"
RELEASES = DEBIAN_MAJORS
# `systemd-analyze security pgslowlog` inside each host (systemd 247, 252, 257); the
# unit scored 4.5 there (4.7 offline) when it ran as root without a system-call filter.
EXPOSURE_AT_MOST = 2.6


@dataclass
class Host:
    release: str
    major: int
    tree: Path
    ssh_port: int
    pg_port: int
    metrics_port: int
    leader: int | None = None  # the container's PID 1, seen from here
    machine: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return f"db-{self.release}"

    @property
    def binary(self) -> str:
        return f"/usr/lib/postgresql/{self.major}/bin/postgres"

    def run(
        self, *command: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container (all of its namespaces)."""
        return subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", *command],
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def psql(self, sql: str) -> None:
        self.run("runuser", "-u", "postgres", "--", "psql", "-p", str(self.pg_port), "-qAtc", sql)

    def events(self) -> list[dict[str, object]]:
        log = self.tree / "var" / "log" / "pgslowlog" / "slow.jsonl"
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]

    def journal(self) -> str:
        shown = self.run("journalctl", "-u", "pgslowlog", "--no-pager", "-n", "60", check=False)
        return f"--- {self.name}\n{shown.stdout}"

    def show(self, prop: str) -> str:
        shown = self.run("systemctl", "show", "-p", prop, "--value", "pgslowlog")
        return shown.stdout.strip()

    def config(self) -> bytes:
        return (self.tree / "etc" / "pgslowlog" / "pgslowlog.toml").read_bytes()


@dataclass
class Fleet:
    hosts: list[Host]
    workdir: Path
    key: Path
    wheel: Path | None = None
    runs: list[str] = field(default_factory=list)

    def playbook(self, **variables: object) -> subprocess.CompletedProcess[str]:
        """The example playbook, once, for the whole inventory."""
        started = time.monotonic()
        common = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
        inventory = {
            "postgresql": {
                "hosts": {
                    host.name: {
                        "ansible_host": "127.0.0.1",
                        "ansible_port": host.ssh_port,
                        "ansible_user": "root",
                        "ansible_ssh_private_key_file": str(self.key),
                        "ansible_ssh_common_args": common,
                        "ansible_python_interpreter": "/usr/bin/python3",
                        # The containers share the host's network: a port each.
                        "pgslowlog_metrics_listen": f"127.0.0.1:{host.metrics_port}",
                    }
                    for host in self.hosts
                }
            }
        }
        (self.workdir / "inventory.json").write_text(json.dumps(inventory))
        (self.workdir / "vars.json").write_text(json.dumps(variables))
        result = subprocess.run(
            [
                str(BIN / "ansible-playbook"),
                "-i",
                str(self.workdir / "inventory.json"),
                "-e",
                f"@{self.workdir / 'vars.json'}",
                str(ROOT / "ansible" / "playbook.yml"),
            ],
            capture_output=True,
            text=True,
            timeout=1200,
            cwd=ROOT / "ansible",  # its ansible.cfg: the role path, SSH pipelining
            env={**os.environ, "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_NOCOLOR": "1"},
        )
        self.runs.append(result.stdout)
        print(f"playbook run {len(self.runs)}: {time.monotonic() - started:.0f} s")
        return result

    def journals(self) -> str:
        return "\n".join(host.journal() for host in self.hosts)


def recap(stdout: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP's counters per host."""
    counters = {}
    for line in stdout.split("PLAY RECAP")[-1].splitlines():
        if ":" in line and "=" in line:
            name, _, rest = line.partition(":")
            counters[name.strip()] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", rest)}
    return counters


def _prepare(host: Host, public_key: str) -> None:
    tree = host.tree
    conf = tree / "etc" / "postgresql" / str(host.major) / "main" / "postgresql.conf"
    conf.write_text(conf.read_text() + f"\nport = {host.pg_port}\n")
    sshd = tree / "etc" / "ssh" / "sshd_config.d" / "pgslowlog-test.conf"
    sshd.write_text(
        f"Port {host.ssh_port}\nListenAddress 127.0.0.1\nPermitRootLogin prohibit-password\n"
    )
    ssh_dir = tree / "root" / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(public_key)
    (tree / "etc" / "hostname").write_text(f"{host.name}\n")
    # Reach the package index as this machine does: same CA bundle, same pip settings.
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", tree / "etc/ssl/certs/ca-certificates.crt")
    (tree / "etc" / "pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")


BOOT_TIMEOUT_S = 180
FAIL_AT_SETUP = "PGSLOWLOG_TEST_ROLLOUT_FAIL_AT_SETUP"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    """Three booted containers; powered off and removed on every path, a failed set-up too."""
    missing = [r for r in RELEASES if not (TREES / r / ".complete").exists()]
    if missing:
        raise RuntimeError(
            f"no complete Debian tree under {TREES} for {', '.join(missing)}: run "
            + "; ".join(f"bash .ci/build-debian-tree {r}" for r in missing)
        )
    workdir = tmp_path_factory.mktemp("rollout")
    ports = free_ports(3 * len(RELEASES))  # the containers share the host's loopback
    hosts = [
        Host(release, major, workdir / release, *ports[3 * i : 3 * i + 3])
        for i, (release, major) in enumerate(RELEASES.items())
    ]
    fleet = Fleet(hosts=hosts, workdir=workdir, key=workdir / "id_ed25519")
    started = time.monotonic()
    wheel_build: subprocess.Popen[bytes] | None = None
    try:
        wheel_build = subprocess.Popen(
            [
                str(BIN / "pip"),
                "wheel",
                "--quiet",
                "--no-deps",
                "--wheel-dir",
                str(workdir / "dist"),
                str(ROOT),
            ],
        )
        for host in hosts:
            _fresh_root(host, workdir)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(fleet.key)], check=True
        )
        public_key = (workdir / "id_ed25519.pub").read_text()
        for host in hosts:
            _prepare(host, public_key)
        for host in hosts:  # booted side by side: the slowest boot is the wait
            console = (workdir / f"console-{host.release}.log").open("w")
            host.machine = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "--register=no",
                    "--keep-unit",
                    "-q",
                    "-D",
                    str(host.tree),
                    "-b",
                    "--capability=all",
                    "--system-call-filter=bpf perf_event_open",
                ],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
            )
            console.close()  # nspawn has its own copy
        for host in hosts:
            host.leader = _container_init(host.machine)
        for host in hosts:
            _wait_until_booted(host, workdir)
        print(f"booted: {time.monotonic() - started:.0f} s")
        if os.environ.get(FAIL_AT_SETUP):
            # To check that a failed set-up leaves nothing running (the leak check).
            raise RuntimeError(f"set-up failed on purpose ({FAIL_AT_SETUP} is set)")
        if wheel_build.wait() != 0:
            raise RuntimeError("pip wheel failed")
        fleet.wheel = next((workdir / "dist").glob("pgslowlog-*.whl"))
        yield fleet
    finally:
        if wheel_build is not None and wheel_build.poll() is None:
            wheel_build.kill()
            wheel_build.wait()
        _power_off([host for host in hosts if host.machine is not None])
        for host in hosts:
            if host.tree.is_mount():
                subprocess.run(["umount", str(host.tree)], check=False)
            if host.tree.is_mount():  # something still holds it: detach it all the same
                subprocess.run(["umount", "--lazy", str(host.tree)], check=False)
        shutil.rmtree(workdir, ignore_errors=True)


def _fresh_root(host: Host, workdir: Path) -> None:
    """The cached tree as the container's root, fresh: an overlay whose upper layer, in
    workdir, takes every write, so the cache is never modified and nothing is copied
    (a copy of the three trees took a minute)."""
    upper, work = workdir / f"{host.release}.upper", workdir / f"{host.release}.work"
    for directory in (upper, work, host.tree):
        directory.mkdir()
    options = f"lowerdir={TREES / host.release},upperdir={upper},workdir={work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(host.tree)], check=True)


def _container_init(machine: subprocess.Popen[bytes], timeout: float = 60) -> int:
    """The container's PID 1: the child of systemd-nspawn running systemd."""

    def systemd_child() -> int | None:
        if machine.poll() is not None:
            raise RuntimeError(f"systemd-nspawn exited with {machine.returncode}")
        children = Path(f"/proc/{machine.pid}/task/{machine.pid}/children")
        for pid in children.read_text().split() if children.exists() else []:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                return int(pid)
        return None

    return wait_until(systemd_child, timeout, "the container's systemd started", interval=0.2)


def _wait_until_booted(host: Host, workdir: Path) -> None:
    """Until systemctl names a finished boot. Right after systemd becomes PID 1 its bus
    is not up and systemctl prints nothing, so ask again until it answers."""
    machine = host.machine
    assert machine is not None
    states = [""]

    def finished_boot() -> bool:
        if machine.poll() is not None:
            raise RuntimeError(f"{host.name} stopped while booting ({machine.returncode})")
        try:
            answer = host.run("systemctl", "is-system-running", "--wait", check=False, timeout=30)
            states.append(answer.stdout.strip())
        except subprocess.TimeoutExpired:
            states.append("(no answer in 30 s)")
        return states[-1] in ("running", "degraded")

    try:
        wait_until(finished_boot, BOOT_TIMEOUT_S, f"{host.name} booted", interval=1)
    except AssertionError:
        console = (workdir / f"console-{host.release}.log").read_text()[-2000:]
        raise RuntimeError(
            f"{host.name} did not finish booting: {states[-1]!r}\n{console}"
        ) from None


def _power_off(hosts: list[Host]) -> None:
    """Power every container off at once; kill one that does not go within a minute."""
    for host in hosts:
        if host.leader is not None and host.machine is not None and host.machine.poll() is None:
            try:
                subprocess.run(
                    [
                        "nsenter",
                        "-t",
                        str(host.leader),
                        "-a",
                        "systemctl",
                        "poweroff",
                        "--no-block",
                    ],
                    capture_output=True,
                    timeout=30,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                pass  # its bus may not be up: nspawn's own signals follow
    for host in hosts:
        machine = host.machine
        assert machine is not None
        try:
            machine.wait(60)
        except subprocess.TimeoutExpired:
            machine.terminate()  # nspawn asks the container's systemd to halt
            try:
                machine.wait(20)
            except subprocess.TimeoutExpired:
                machine.kill()
                machine.wait()
        # Killing nspawn alone would leave the container's processes running: its PID 1,
        # killed, takes every process of its namespace with it.
        if host.leader is not None and Path(f"/proc/{host.leader}").exists():
            try:
                os.kill(host.leader, signal.SIGKILL)
            except ProcessLookupError:
                pass


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
            f"{__file__}::test_playbook_rolls_out_a_working_service_to_three_releases",
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


def test_playbook_rolls_out_a_working_service_to_three_releases(fleet: Fleet):
    hosts = fleet.hosts
    variables = {
        "pgslowlog_wheel": str(fleet.wheel),
        "pgslowlog_kernel_headers": "linked",  # the containers' kernel has no package
        "pgslowlog_threshold_ms": 200,
    }
    first = fleet.playbook(**variables)
    assert first.returncode == 0, first.stdout[-4000:] + fleet.journals()
    assert sorted(recap(first.stdout)) == sorted(host.name for host in hosts)
    capabilities = _unit_capabilities()
    for host in hosts:
        assert host.run("systemctl", "is-active", "pgslowlog").stdout.strip() == "active"
        # The role's user, holding exactly the unit's capabilities, nothing more.
        status = host.run("cat", f"/proc/{host.show('MainPID')}/status").stdout
        uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))
        assert host.run("id", "-nu", str(uid)).stdout.strip() == "pgslowlog", status
        assert int(re.search(r"^CapEff:\s+([0-9a-f]+)", status, re.M).group(1), 16) == capabilities
        # The binary of this host's own PostgreSQL, found by the role.
        config = host.config().decode()
        assert f'binary = "{host.binary}"' in config, config
        assert re.search(r"^max_backends = 16384$", config, re.M), config
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
        dropin.mkdir(parents=True)
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
    assert attached == {(instance, "main"): 1 for instance in instances}

    second = fleet.playbook(**variables)
    assert second.returncode == 0, second.stdout[-3000:]
    assert {name: c["changed"] for name, c in recap(second.stdout).items()} == {
        host.name: 0 for host in hosts
    }, second.stdout[-3000:]

    # A reload (SIGHUP through ExecReload) under the system-call filter, on all three.
    pids_before = {host.name: host.show("MainPID") for host in hosts}
    third = fleet.playbook(**{**variables, "pgslowlog_threshold_ms": 1000})
    assert third.returncode == 0, third.stdout[-3000:]
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

    # Any other key needs a restart: the role asks for one, and the new value is in effect.
    restart = fleet.playbook(
        **{**variables, "pgslowlog_threshold_ms": 1000, "pgslowlog_stats_interval_s": 1}
    )
    assert restart.returncode == 0, restart.stdout[-3000:]
    assert "RUNNING HANDLER [pgslowlog : Restart pgslowlog]" in restart.stdout
    for host in hosts:
        assert host.show("MainPID") != pids_before[host.name]
        assert host.run("systemctl", "is-active", "pgslowlog").stdout.strip() == "active"
    for host in hosts:  # the new daemon writes a health line a second, not a minute

        def health_lines(h: Host = host, pid: str = host.show("MainPID")) -> int:
            lines = h.journal().splitlines()
            return sum(f"pgslowlog[{pid}]" in line and '"health"' in line for line in lines)

        wait_until(
            lambda h=host: health_lines(h) >= 2, 15, f"two health lines from {host.name}'s daemon"
        )
    pids_before = {host.name: host.show("MainPID") for host in hosts}

    # A value the argument spec lets through (an int) but the daemon refuses (over 16384):
    # `pgslowlog check` fails the template task and the old file stays, service untouched.
    configs_before = {host.name: host.config() for host in hosts}
    refused = fleet.playbook(
        **{
            **variables,
            "pgslowlog_threshold_ms": 1000,
            "pgslowlog_stats_interval_s": 1,
            "pgslowlog_query_max_bytes": 100000,
        }
    )
    assert refused.returncode != 0, refused.stdout[-3000:]
    for host in hosts:
        assert f"fatal: [{host.name}]" in refused.stdout, refused.stdout[-3000:]
        assert host.config() == configs_before[host.name]
        assert host.show("MainPID") == pids_before[host.name]
    assert "query_max_bytes" in refused.stdout, refused.stdout[-3000:]
    assert refused.stdout.count("TASK [pgslowlog : Write the configuration") == 1

    # A clean stop under the filter: no SIGSYS, no failure, the daemon's own last word.
    for host in hosts:
        host.run("systemctl", "stop", "pgslowlog")
        assert host.show("Result") == "success", host.journal()
        assert host.show("ExecMainStatus") == "0", host.journal()
        journal = host.journal()
        assert '"event": "stopped"' in journal, journal
        assert "Traceback" not in journal, journal

"""PostgreSQL in containers, traced from the host, with containers made the way
runtimes make them (tests/containers.py): an overlay root over a Debian tree,
postgres as PID 1 of new pid/mount/net/ipc/uts namespaces, cgroups named like
Docker's (v2 and v1), Podman's and Kubernetes', and systemd-nspawn with a machine
name; and the same image on the host outside any container.

Each statement carries a marker, and every event of it is counted: one per
statement, in the right container's instance, with the pid PostgreSQL reports.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from containers import (
    Container,
    NspawnContainer,
    leftover_containers,
    nspawn_hierarchies,
    reclaim_dead_sessions,
)
from fleet import TREES
from waiting import json_lines_written, wait_for_count

from pgslowlog.testing.cluster import ChrootCluster, free_port
from pgslowlog.testing.daemon_process import RunningDaemon

pytestmark = pytest.mark.ebpf

TRIXIE, BOOKWORM, BULLSEYE = TREES / "trixie", TREES / "bookworm", TREES / "bullseye"
SLEEP = "select pg_backend_pid(), pg_sleep(0.3) /* {marker} */"


class Daemon:
    """`pgslowlog run` on a config written here, its events read from its file sink."""

    def __init__(
        self,
        directory: Path,
        targets: list[str],
        metrics_port: int | None = None,
        wrapper: list[str] | None = None,
    ):
        self.log = directory / "slow.jsonl"
        self.config = directory / "pgslowlog.toml"
        self.targets = targets
        self.metrics_port = metrics_port
        self.write_config(threshold_ms=100)
        self.process = RunningDaemon(self.config, wrapper=wrapper)

    def write_config(self, threshold_ms: float) -> None:
        lines = ["[daemon]", f"threshold_ms = {threshold_ms}", "stats_interval_s = 1"]
        lines += [*self.targets, "[sinks.file]", f'path = "{self.log}"']
        if self.metrics_port is not None:
            lines += ["[metrics]", f'listen = "127.0.0.1:{self.metrics_port}"']
            lines += ["max_containers = 3"]
        self.config.write_text("\n".join(lines) + "\n")
        self.config.chmod(0o600)

    def events(self, marker: str) -> list[dict[str, Any]]:
        return [event for event in json_lines_written(self.log) if marker in event["query"]]

    def one_event(self, marker: str) -> dict[str, Any]:
        (event,) = wait_for_count(lambda: self.events(marker), 1, marker, timeout=15)
        return event

    def said(self, event: str, container: str | None, count: int = 1) -> dict[str, Any]:
        """The `count`-th log entry `event` about `container` (others may run too)."""

        def entries() -> list[dict[str, Any]]:
            logs = list(self.process.logs)
            return [e for e in logs if e.get("event") == event and e.get("container") == container]

        return wait_for_count(entries, count, f"{event} of {container}", timeout=15)[count - 1]

    def stop(self) -> int:
        status = self.process.stop()
        assert "Traceback" not in self.process.stderr, self.process.stderr
        return status


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    statuses = [daemon.stop() for daemon in started]
    assert statuses == [0] * len(started)


def _start(daemons: list[Daemon], directory: Path, *targets: str, **options: Any) -> Daemon:
    daemon = Daemon(directory, list(targets), **options)
    daemons.append(daemon)
    daemon.process.wait_for_log("ready")
    return daemon


def _sleep_in(server: Container | ChrootCluster, marker: str) -> int:
    """Run the marked 300 ms statement; the backend's pid as PostgreSQL reports it."""
    result = server.psql(SLEEP.format(marker=marker), check=True)
    return int(result.stdout.split("|")[0])


CONTAINERS_TARGET = '[[target]]\nname = "pods"\ncontainers = true\n'


@pytest.fixture(scope="module")
def fleet() -> Iterator[dict[str, Any]]:
    """Five containers at once, two of them of one image on 5432 each, and the same
    image running on the host outside any container."""
    made: dict[str, Any] = {}
    try:
        made["docker"] = Container(TRIXIE, 17, runtime="docker").start()
        made["docker_v1"] = Container(TRIXIE, 17, runtime="docker", cgroup_version=1).start()
        made["podman"] = Container(BOOKWORM, 15, runtime="podman").start()
        made["kubernetes"] = Container(BULLSEYE, 13, runtime="kubernetes").start()
        made["nspawn"] = NspawnContainer(TRIXIE, 17, machine="pg-nspawn").start()
        made["host"] = ChrootCluster(TRIXIE, 17).start()
        yield made
    finally:
        problems = []
        for server in made.values():
            try:
                server.stop()
            except Exception as error:  # stop every one, then say what failed
                problems.append(repr(error))
        assert not problems and not leftover_containers(), (problems, leftover_containers())


def _expected_name(container: Container) -> str:
    if isinstance(container, NspawnContainer):
        return f"machine://{container.machine}"
    runtime = {"docker": "docker", "podman": "podman", "kubernetes": "containerd"}
    return f"{runtime[container.runtime]}://{container.id}"


@pytest.mark.parametrize("probe", ["sampled", "activity"])
def test_a_containerised_server_named_by_pid_is_traced_with_its_own_pids(
    daemons, fleet, tmp_path, probe
):
    """The defect this issue began with: a server that is PID 1 of its own pid namespace,
    named by its host pid, gave `statements: 0` and no warning (sampled), and its
    host pid as `pid` (activity)."""
    docker = fleet["docker"]
    target = f'[[target]]\npid = {docker.host_pid}\nprobes = ["{probe}"]\n'
    daemon = _start(daemons, tmp_path, target)
    # No containers = true target: the servers in containers are named, not passed over.
    (warning,) = [e for e in daemon.process.logs if e.get("event") == "containers_not_traced"]
    assert len(warning["servers"]) == 5
    pid = _sleep_in(docker, "by-pid")
    event = daemon.one_event("by-pid")
    assert event["pid"] == pid != event["host_pid"]
    assert (event["outcome"], event["user"], event["probe"]) == ("ok", "postgres", probe)
    # A target names its server's pid namespace: the other container of the same image
    # and the host's server are not its own.
    _sleep_in(fleet["docker_v1"], "by-pid-other")
    _sleep_in(fleet["host"], "by-pid-host")
    time.sleep(1)
    assert daemon.stop() == 0
    daemons.remove(daemon)
    assert daemon.events("by-pid-other") == [] == daemon.events("by-pid-host")
    stopped = next(e for e in daemon.process.logs if e.get("event") == "stopped")
    assert stopped["targets"]["target0"]["statements"] >= 1


def test_one_target_traces_every_container_and_says_which(daemons, fleet, tmp_path):
    port = free_port()
    host = fleet["host"]
    host_target = f'[[target]]\nname = "host"\nbinary = "{host.postgres}"\n'
    daemon = _start(daemons, tmp_path, CONTAINERS_TARGET, host_target, metrics_port=port)
    containers = [fleet[name] for name in ("docker", "docker_v1", "podman", "kubernetes", "nspawn")]
    for count in range(1, len(containers) + 1):
        daemon.process.wait_for_log("container_server_found", count)
    found = {
        e["container"]: e for e in daemon.process.logs if e.get("event") == "container_server_found"
    }
    assert set(found) == {_expected_name(c) for c in containers}  # the host's server is not one
    pids = {}
    for index, container in enumerate(containers):
        pids[index] = _sleep_in(container, f"every-{index}-")
    host_pid = _sleep_in(host, "every-host-")
    for index, container in enumerate(containers):
        event = daemon.one_event(f"every-{index}-")
        assert event["container"] == _expected_name(container)
        assert event["pod_uid"] == container.pod_uid  # None outside Kubernetes
        assert event["container_hostname"] == container.hostname
        assert event["target"] == "pods"
        assert event["pid"] == pids[index] != event["host_pid"]
        # 13 does not export MyBEEntry: auto takes activity there (a uprobe on the file).
        assert event["probe"] == ("activity" if container.major == 13 else "sampled")
        assert event["client"] == "[local]"  # as that server saw it
    host_event = daemon.one_event("every-host-")
    assert (host_event["target"], host_event["container"]) == ("host", None)
    assert host_event["pid"] == host_pid == host_event["host_pid"]
    # /metrics: a container label, folded past max_containers (3) into "other"
    scraped = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    series = [
        dict(re.findall(r'(\w+)="([^"]*)"', line))
        for line in scraped.splitlines()
        if line.startswith("pgslowlog_slow_statements_total{")
    ]
    labels = {labels["container"] for labels in series if labels["target"] == "pods"}
    assert len(labels) == 4 and "other" in labels, scraped
    assert [labels["container"] for labels in series if labels["target"] == "host"] == [""]
    assert daemon.stop() == 0
    daemons.remove(daemon)
    stopped = next(e for e in daemon.process.logs if e.get("event") == "stopped")
    instances = {name for name in stopped["targets"] if name.startswith("pods[")}
    assert instances == {f"pods[{_expected_name(c)}]" for c in containers}
    for index in range(len(containers)):
        assert len(daemon.events(f"every-{index}-")) == 1  # never twice


# Every kind of BPF definition: a uprobe on an exported function, USDT probes, and the
# ReadyForQuery uprobe that reads PostgreSQL's own timestamps.
@pytest.mark.parametrize("probe", ["activity", "usdt", "backend_status"])
def test_uprobes_on_one_file_reach_each_containers_instance_once(daemons, fleet, tmp_path, probe):
    """Two containers of one image and the same image on the host map one file (the
    overlay's lower layer): a uprobe on it fires in all three, at the same time."""
    host = fleet["host"]
    targets = [
        CONTAINERS_TARGET + f'binary = "{fleet["docker"].binary_inside}"\nprobes = ["{probe}"]\n',
        f'[[target]]\nname = "host"\nbinary = "{host.postgres}"\nprobes = ["{probe}"]\n',
    ]
    daemon = _start(daemons, tmp_path, *targets)
    for count in (1, 2, 3):  # docker, docker_v1, nspawn: the 17s; podman's 15 is not taken
        daemon.process.wait_for_log("container_server_found", count)
    servers = {"docker": fleet["docker"], "docker_v1": fleet["docker_v1"], "host": host}
    pids: dict[str, int] = {}

    def run(name: str) -> None:
        for round_ in range(3):
            pids[f"{name}-{round_}"] = _sleep_in(servers[name], f"shared-{name}-{round_}-")

    threads = [threading.Thread(target=run, args=(name,)) for name in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    _sleep_in(fleet["podman"], "shared-podman-")
    time.sleep(1)
    assert daemon.stop() == 0
    daemons.remove(daemon)
    for name, server in servers.items():
        for round_ in range(3):
            marker = f"shared-{name}-{round_}-"
            (event,) = daemon.events(marker)  # exactly one, in its own instance
            expected = None if name == "host" else _expected_name(server)
            assert (event["container"], event["probe"]) == (expected, probe)
            assert event["pid"] == pids[marker[len("shared-") : -1]]
    assert daemon.events("shared-podman-") == []  # another binary inside: not this target's
    untaken = {
        e["container"]
        for e in daemon.process.logs
        if e.get("event") == "container_server_not_taken"
    }
    assert untaken == {_expected_name(fleet["podman"]), _expected_name(fleet["kubernetes"])}


UNIT = Path(__file__).parents[1] / "etc" / "pgslowlog.service"


def test_within_the_units_capabilities(daemons, fleet, tmp_path):
    """Reading a container's files through /proc/PID/root, its cgroup, NSpid and pid
    namespace, and the exec notices, within the unit's CapabilityBoundingSet alone
    (as root without CAP_DAC_OVERRIDE: the containers' files are another user's)."""
    line = next(e for e in UNIT.read_text().splitlines() if e.startswith("CapabilityBoundingSet="))
    wanted = [f"+{c.removeprefix('CAP_').lower()}" for c in line.split("=", 1)[1].split()]
    wrapper = ["setpriv", "--no-new-privs", f"--bounding-set={','.join(['-all', *wanted])}"]
    daemon = Daemon(tmp_path, [CONTAINERS_TARGET], wrapper=[*wrapper, "--inh-caps=-all"])
    daemons.append(daemon)
    daemon.process.wait_for_log("ready")
    status = Path(f"/proc/{daemon.process.process.pid}/status").read_text()
    assert not int(re.search(r"CapBnd:\s+([0-9a-f]+)", status)[1], 16) & (1 << 1)  # DAC_OVERRIDE
    for count in range(1, 6):
        daemon.process.wait_for_log("container_server_found", count)
    assert not [e for e in daemon.process.logs if e.get("event") == "exec_notices_unavailable"]
    for name in ("docker", "kubernetes"):  # sampled on 17, activity on 13
        container = fleet[name]
        pid = _sleep_in(container, f"unit-{name}-")
        event = daemon.one_event(f"unit-{name}-")
        assert (event["container"], event["container_hostname"], event["pid"]) == (
            _expected_name(container),
            container.hostname,
            pid,
        )


def test_a_live_threshold_switches_every_instance(daemons, fleet, tmp_path):
    """auto picks sampled at 100 ms and activity under 50 ms, per instance; a SIGHUP
    that crosses the line switches each container's instance, and the next statements
    are still each in its own container."""
    target = CONTAINERS_TARGET + f'binary = "{fleet["docker"].binary_inside}"\n'
    daemon = _start(daemons, tmp_path, target)
    for count in (1, 2, 3):  # docker, docker_v1 and nspawn run 17
        daemon.process.wait_for_log("container_server_found", count)
    taken = [fleet[name] for name in ("docker", "docker_v1", "nspawn")]
    daemon.write_config(threshold_ms=30)
    daemon.process.reload()
    switched = daemon.process.wait_for_log("reloaded")["probes_switched"]
    assert sorted(switched) == sorted(f"activity@pods[{_expected_name(c)}]" for c in taken)
    for index, container in enumerate(taken):
        pid = _sleep_in(container, f"switched-{index}-")
        event = daemon.one_event(f"switched-{index}-")
        assert (event["probe"], event["container"], event["pid"]) == (
            "activity",
            _expected_name(container),
            pid,
        )


def test_restart_stop_and_a_server_started_later(daemons, tmp_path):
    first = Container(TRIXIE, 17, runtime="docker")
    later = NspawnContainer(TRIXIE, 17, machine="pg-later")
    try:
        first.start()
        name = _expected_name(first)
        daemon = _start(daemons, tmp_path, CONTAINERS_TARGET)
        assert daemon.said("container_server_found", name)["postmaster"] == first.host_pid
        old_pid = first.host_pid
        first.restart()  # new namespaces, new pids, the same container
        assert first.host_pid != old_pid
        daemon.said("container_server_gone", name)
        assert daemon.said("container_server_restarted", name)["postmaster"] == first.host_pid
        pid = _sleep_in(first, "after-restart")
        event = daemon.one_event("after-restart")
        assert (event["container"], event["pid"]) == (name, pid)
        # A server started later is found from the kernel's exec notice.
        later.start()
        ready = time.time()
        found = daemon.said("container_server_found", "machine://pg-later")
        found_at = datetime.fromisoformat(found["timestamp"].replace("Z", "+00:00")).timestamp()
        print(f"a server started later was found {found_at - ready:+.2f} s after it was ready")
        _sleep_in(later, "started-later")
        assert daemon.one_event("started-later")["container"] == "machine://pg-later"
        # The health line: the instances now, and what finding them cost.
        count = sum(1 for e in list(daemon.process.logs) if e.get("event") == "health")
        health = daemon.said("health", None, count + 1)
        assert {name, "machine://pg-later"} <= set(health["containers"]["pods"])  # and the fleet's
        finding = health["container_finding"]
        assert finding["exec_notices"] >= 1 and finding["scans"] >= 1, finding
        print(f"finding containers cost: {finding}")
        first.stop()  # the instance goes with its server
        daemon.said("container_server_gone", name, 2)
        assert daemon.stop() == 0
        daemons.remove(daemon)
        # Its counts joined the target's gone ones: a host where containers come and go
        # does not list every one it ever saw.
        stopped = next(e for e in daemon.process.logs if e.get("event") == "stopped")
        assert f"pods[{name}]" not in stopped["targets"]
        assert stopped["targets"]["pods[gone]"]["statements"] >= 1
        assert stopped["targets"]["pods[machine://pg-later]"]["slow_events"] == 1
    finally:
        first.stop()
        later.stop()


def test_containers_with_pid_is_refused_by_check_in_one_line(tmp_path):
    config = tmp_path / "pgslowlog.toml"
    config.write_text(
        '[[target]]\ncontainers = true\npid = 1\n[sinks.file]\npath = "/tmp/x.jsonl"\n'
    )
    config.chmod(0o600)
    result = subprocess.run(
        [sys.executable, "-m", "pgslowlog", "check", "-c", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert "target[0] has containers = true and pid = 1" in line


KILLED_RUN = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from containers import Container, NspawnContainer
trees = Path(sys.argv[1])
made = []
try:
    made.append(NspawnContainer(trees / "trixie", 17, machine="pg-killed").start())
    made.append(Container(trees / "trixie", 17, runtime="docker").start())
except BaseException:
    for container in made:
        container.stop()
    raise
print(" ".join(str(c.base) for c in made), flush=True)
time.sleep(600)
"""


def test_what_a_killed_run_left_is_reclaimed_by_the_next():
    """A run killed with its containers running (SIGKILL, the machine's jobs stopped)
    cannot clean up; its nspawn scope would refuse the next run's container of that name.
    The next session start removes it all, and says so."""
    environment = {k: v for k, v in os.environ.items() if k != "PGSLOWLOG_TEST_SESSION"}
    run = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, str(TREES), str(Path(__file__).parent)],
        stdout=subprocess.PIPE,
        text=True,
        env=environment,  # its own owner mark: <its pid>-<when it started>
        start_new_session=True,
    )
    scopes = [h / "machine.slice" / "machine-pg\\x2dkilled.scope" for h in nspawn_hierarchies()]
    propagate = Path("/run/systemd/nspawn/propagate/pg-killed")
    try:
        assert run.stdout is not None
        bases = [Path(b) for b in run.stdout.readline().split()]
        run.kill()  # killed: nothing of its own clean-up runs
        run.wait()
        assert len(bases) == 2, bases
        assert all(s.is_dir() for s in scopes) and propagate.is_dir()
        assert all((base / "root/usr").is_dir() for base in bases)
        with pytest.raises(RuntimeError, match="exists: another container"):
            NspawnContainer(TRIXIE, 17, machine="pg-killed").start()  # the name is taken

        reclaimed = reclaim_dead_sessions()

        for base in bases:
            line = next(line for line in reclaimed if line.startswith(f"{base} of session"))
            assert f" {run.pid}-" in line and line.endswith("which no longer runs: removed")
            assert not base.exists()
        assert not any(s.exists() for s in scopes) and not propagate.exists()
        mounts = Path("/proc/self/mounts").read_text()
        assert not any(str(base) in mounts for base in bases)
        with NspawnContainer(TRIXIE, 17, machine="pg-killed") as again:  # the name is free
            assert again.backend_pid_inside() > 1
    finally:
        run.kill()
        run.wait()
        reclaim_dead_sessions()  # whatever a failed assertion left

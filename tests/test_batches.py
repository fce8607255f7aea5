"""Slow statements inside a pipeline or batch, with the clients that send them.

A psycopg pipeline, an asyncpg `executemany` and a JDBC `executeBatch` (Debian's
libpostgresql-jdbc-java) each send several Bind/Execute pairs before one Sync. With a
slow statement first, in the middle and last, pgslowlog's events are compared with
PostgreSQL's own `log_min_duration_statement` lines for the same statements:
`sampled` (the default at 200 ms) reports each slow statement on its own, with its
own duration; `activity` reports the whole batch as one event, as `pgslowlog probes`
says.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from pathlib import Path

import asyncpg
import psycopg
import pytest

from pgslowlog.testing.cluster import Cluster

pytestmark = pytest.mark.ebpf

SLEEPS = [0.3, 0, 0.25, 0, 0.22]  # slow first, in the middle and last
SLOW = [s for s in SLEEPS if s >= 0.2]
JDBC_JAR = Path("/usr/share/java/postgresql.jar")
JAVA_SOURCE = Path(__file__).parent / "jdbc" / "Batch.java"
LOGGED = re.compile(r"duration: ([\d.]+) ms\s+(?:execute|statement)[^:]*: (.*)")


def psycopg_pipeline(cluster: Cluster, marker: str) -> None:
    with psycopg.connect(cluster.dsn(), autocommit=True) as connection:
        connection.execute("set log_min_duration_statement = 200")
        with connection.pipeline():
            for seconds in SLEEPS:
                connection.execute(f"select pg_sleep(%s) /* {marker} */", (seconds,))


def asyncpg_executemany(cluster: Cluster, marker: str) -> None:
    async def run() -> None:
        connection = await asyncpg.connect(
            f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres"
        )
        try:
            await connection.execute("set log_min_duration_statement = 200")
            await connection.executemany(
                f"select pg_sleep($1) /* {marker} */", [(s,) for s in SLEEPS]
            )
        finally:
            await connection.close()

    asyncio.run(run())


def jdbc_batch(cluster: Cluster, marker: str, classes: Path) -> None:
    url = f"jdbc:postgresql://127.0.0.1:{cluster.port}/postgres"
    subprocess.run(
        ["java", "-cp", f"{classes}:{JDBC_JAR}", "Batch", url, marker, *map(str, SLEEPS)],
        check=True,
        capture_output=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def jdbc_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Batch.java compiled (fails, never skips, when the JDK or the driver is missing)."""
    assert JDBC_JAR.exists(), "install libpostgresql-jdbc-java (bash .ci/bootstrap test does)"
    classes = tmp_path_factory.mktemp("jdbc")
    subprocess.run(
        ["javac", "-cp", str(JDBC_JAR), "-d", str(classes), str(JAVA_SOURCE)],
        check=True,
        capture_output=True,
    )
    return classes


def postgres_logged(cluster: Cluster, marker: str) -> list[float]:
    """Durations PostgreSQL itself logged for the statements carrying `marker`."""
    durations = []
    for line in cluster.logfile.read_text(errors="replace").splitlines():
        if (match := LOGGED.search(line)) and marker in match.group(2):
            durations.append(float(match.group(1)))
    return durations


CLIENTS = ["psycopg pipeline", "asyncpg executemany", "jdbc executeBatch"]


def send(client: str, cluster: Cluster, marker: str, jdbc_classes: Path) -> None:
    if client == "psycopg pipeline":
        psycopg_pipeline(cluster, marker)
    elif client == "asyncpg executemany":
        asyncpg_executemany(cluster, marker)
    else:
        jdbc_batch(cluster, marker, jdbc_classes)


@pytest.mark.parametrize("client", CLIENTS)
def test_sampled_reports_each_slow_statement_of_a_batch(pg15, start_daemon, jdbc_classes, client):
    daemon = start_daemon(pg15, probes=["sampled"], threshold_ms=200)
    marker = f"batch sampled {client}"
    send(client, pg15, marker, jdbc_classes)
    events = daemon.wait_for_events(marker, len(SLOW))
    logged = postgres_logged(pg15, marker)
    assert len(logged) == len(SLOW), logged  # PostgreSQL's own log: each on its own
    ours = sorted(e["duration_ms"] for e in events)
    # Each timed from its own Execute; the next one's start bounds its end (the last one
    # ends exactly, at the Sync). PostgreSQL's count stops before sending the result.
    for mine, theirs in zip(ours, sorted(logged), strict=True):
        assert theirs - 2 < mine < theirs + 25, (ours, logged)
    assert all(marker in e["query"] for e in events)
    assert daemon.stop() == 0


@pytest.mark.parametrize("client", CLIENTS)
def test_activity_reports_a_batch_as_one_event(pg15, start_daemon, jdbc_classes, client):
    """What `pgslowlog probes` says of it: PostgreSQL reports idle only at the Sync."""
    daemon = start_daemon(pg15, probes=["activity"], threshold_ms=200)
    marker = f"batch activity {client}"
    send(client, pg15, marker, jdbc_classes)
    (event,) = daemon.wait_for_events(marker, 1)
    assert len(postgres_logged(pg15, marker)) == len(SLOW)
    assert event["duration_ms"] >= sum(SLEEPS) * 1000 - 5, event
    assert daemon.stop() == 0
    assert len(daemon.events(marker)) == 1

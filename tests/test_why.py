"""Why a sampled statement was slow: who blocked it, and what it cost.

Real servers of four majors (14 and 15 keep lock queues in SHM_QUEUE, 16 and 18 in
dlist), real sessions that block each other, and PostgreSQL's own answers to compare
with: pg_blocking_pids() asked while the statement waits, and EXPLAIN (ANALYZE,
BUFFERS) and pg_stat_statements for the same work.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from conftest import DEBIAN_PG15
from waiting import wait_until

from pgslowlog.demo import embedded_bindir
from pgslowlog.sampled.source import WALK_EVERY_US
from pgslowlog.testing.cluster import Cluster, free_port

pytestmark = pytest.mark.ebpf  # needs root: it reads the servers' memory

WHEELS = Path(os.environ.get("PGSLOWLOG_WHEELS", "/var/cache/pgslowlog/wheels"))
MAJORS = (14, 15, 16, 18)
SAMPLED = {"probes": ["sampled"], "threshold_ms": 200}
HOLD_S = 0.6  # how long a blocker keeps its lock once the statement waits


def _bindir(major: int) -> Path:
    if major == 15:
        return DEBIAN_PG15
    if major == 18:
        return embedded_bindir()
    (bindir,) = (WHEELS / str(major)).glob("postgresql-*/bin")
    return bindir


@pytest.fixture(scope="module")
def servers() -> Iterator[Callable[[int], Cluster]]:
    """A server per major, with prepared transactions and pg_stat_statements, started
    when a test first asks for it; all stopped after, whatever happened."""
    started: dict[int, Cluster] = {}

    def server(major: int) -> Cluster:
        if major not in started:
            cluster = Cluster(_bindir(major))
            started[major] = cluster
            cluster.start()
            cluster.psql(
                "alter system set max_prepared_transactions = 4",
                "alter system set shared_preload_libraries = 'pg_stat_statements'",
                check=True,
            )
            cluster.restart()
            cluster.psql(
                "create extension pg_stat_statements",
                "create table why_t (id int primary key, v int)",
                "insert into why_t select g, 0 from generate_series(1, 10) g",
                check=True,
            )
        return started[major]

    try:
        yield server
    finally:
        with contextlib.ExitStack() as stops:
            for cluster in started.values():
                stops.callback(cluster.stop)


class Sessions:
    """Client sessions of one test, each closed on every path."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.opened: list[psycopg.Connection[Any]] = []
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def open(self, autocommit: bool = False) -> psycopg.Connection[Any]:
        connection = psycopg.connect(self.cluster.dsn(), autocommit=autocommit)
        self.opened.append(connection)
        return connection

    def in_background(self, connection: psycopg.Connection[Any], sql: str) -> None:
        def run() -> None:
            try:
                connection.execute(sql)
            except BaseException as error:  # reported by join()
                self.errors.append(error)

        thread = threading.Thread(target=run, daemon=True)
        self.threads.append(thread)
        thread.start()

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=20)
            assert not thread.is_alive(), "a blocked statement never finished"
        assert not self.errors, self.errors

    def close(self) -> None:
        for connection in self.opened:
            connection.close()


@contextlib.contextmanager
def sessions(cluster: Cluster) -> Iterator[Sessions]:
    opened = Sessions(cluster)
    try:
        yield opened
    finally:
        opened.close()


def pids_of(**connections: psycopg.Connection[Any]) -> dict[str, int]:
    """Each session's backend pid, kept for after the sessions are closed."""
    return {name: connection.info.backend_pid for name, connection in connections.items()}


def blocking_pids(watcher: psycopg.Connection[Any], pid: int) -> set[int]:
    row = watcher.execute("select pg_blocking_pids(%s)", (pid,)).fetchone()
    assert row is not None
    return set(row[0])


def wait_blocked(watcher: psycopg.Connection[Any], pid: int) -> set[int]:
    """pg_blocking_pids() of a statement once it waits, and again after the looks have
    walked its wait a few times: the answer to compare with."""
    wait_until(lambda: blocking_pids(watcher, pid), what=f"pid {pid} blocked")
    time.sleep(HOLD_S)
    return blocking_pids(watcher, pid)


def direct(event: dict[str, Any]) -> set[int]:
    return {entry["pid"] for entry in event["blocked_by"] if entry["level"] == 1}


@pytest.mark.parametrize("major", MAJORS)
def test_blockers_are_those_pg_blocking_pids_names(servers, start_daemon, major):
    cluster = servers(major)
    port = free_port()
    daemon = start_daemon(
        cluster, **SAMPLED, sinks={"console": {}}, metrics={"listen": f"127.0.0.1:{port}"}
    )
    relation = int(cluster.psql("select 'why_t'::regclass::oid", check=True).stdout.strip())

    # A row lock held by a session idle in its transaction.
    with sessions(cluster) as s:
        watcher, holder, waiter = s.open(True), s.open(), s.open(True)
        pids = pids_of(holder=holder, waiter=waiter)
        holder.execute("update why_t set v = v + 1 where id = 1 /* why holder */")
        s.in_background(waiter, "update why_t set v = v + 1 where id = 1 /* why row */")
        expected = wait_blocked(watcher, waiter.info.backend_pid)
        holder.commit()
        s.join()
    (row,) = daemon.wait_for_events("why row", 1)
    assert expected == {pids["holder"]}
    assert direct(row) == expected, row["blocked_by"]
    (entry,) = row["blocked_by"]
    # As the last walk saw it: idle after its update, or (a walk during the COMMIT that
    # freed the waiter) committing. Never the one's state with the other's text.
    assert (entry["state"], entry["query"]) in (
        ("idle in transaction", "update why_t set v = v + 1 where id = 1 /* why holder */"),
        ("active", "COMMIT"),
    ), entry
    assert entry["xact_age_s"] >= HOLD_S - 2 * WALK_EVERY_US / 1e6  # at the last walk
    assert entry["blocks"] == pids["waiter"] and entry["waiting"] is False
    assert entry["lock"]["type"] == "transactionid"
    assert (entry["lock"]["mode"], entry["lock"]["granted"]) == ("ExclusiveLock", True)
    assert isinstance(entry["lock"]["transactionid"], int)
    # The wait began after the statement did, and before it ended.
    assert row["lock_wait_start"] is not None and row["lock_wait_start"] >= row["ts"]
    # /metrics counts it by the wait it was seen in most.
    scraped = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    # (prometheus-client writes the labels in alphabetical order)
    series = 'pgslowlog_slow_statements_by_wait_total{container="",target="target0",'
    assert series + 'wait_event_type="Lock"}' in scraped

    # LOCK TABLE: a relation lock, named by its oid.
    with sessions(cluster) as s:
        watcher, holder, waiter = s.open(True), s.open(), s.open(True)
        pids = pids_of(holder=holder)
        holder.execute("lock table why_t in access exclusive mode")
        s.in_background(waiter, "select count(*) from why_t /* why table */")
        expected = wait_blocked(watcher, waiter.info.backend_pid)
        holder.commit()
        s.join()
    (table,) = daemon.wait_for_events("why table", 1)
    assert direct(table) == expected == {pids["holder"]}
    lock = table["blocked_by"][0]["lock"]
    assert (lock["type"], lock["relation"], lock["mode"]) == (
        "relation",
        relation,
        "AccessExclusiveLock",
    )

    # A chain of three: C waits for B, which waits for A.
    with sessions(cluster) as s:
        watcher, a, b, c = s.open(True), s.open(), s.open(), s.open(True)
        pids = pids_of(a=a, b=b, c=c)
        a.execute("update why_t set v = v + 1 where id = 3")
        b.execute("update why_t set v = v + 1 where id = 4")
        s.in_background(b, "update why_t set v = v + 1 where id = 3 /* why middle */")
        wait_until(lambda: blocking_pids(watcher, pids["b"]), what="b blocked")
        s.in_background(c, "update why_t set v = v + 1 where id = 4 /* why chain */")
        expected = wait_blocked(watcher, pids["c"])
        expected_b = blocking_pids(watcher, pids["b"])
        a.commit()
        wait_until(lambda: not blocking_pids(watcher, pids["b"]), what="b free")
        s.threads[0].join(timeout=10)
        b.commit()
        s.join()
    (chain,) = daemon.wait_for_events("why chain", 1)
    assert expected == {pids["b"]} and expected_b == {pids["a"]}
    levels = [(e["pid"], e["level"], e["blocks"], e["waiting"]) for e in chain["blocked_by"]]
    assert levels == [(pids["b"], 1, pids["c"], True), (pids["a"], 2, pids["b"], False)]
    assert "why middle" in chain["blocked_by"][0]["query"]

    # An advisory lock, held by a session between statements.
    with sessions(cluster) as s:
        watcher, holder, waiter = s.open(True), s.open(True), s.open(True)
        pids = pids_of(holder=holder)
        holder.execute("select pg_advisory_lock(4242)")
        s.in_background(waiter, "select pg_advisory_lock(4242) /* why advisory */")
        expected = wait_blocked(watcher, waiter.info.backend_pid)
        holder.execute("select pg_advisory_unlock(4242)")
        s.join()
        waiter.execute("select pg_advisory_unlock(4242)")
    (advisory,) = daemon.wait_for_events("why advisory", 1)
    assert direct(advisory) == expected == {pids["holder"]}
    (entry,) = advisory["blocked_by"]
    assert entry["state"] == "idle"
    assert (entry["lock"]["type"], entry["lock"]["objid"]) == ("advisory", 4242)

    # A prepared transaction: no backend, pid 0, found by its xid.
    with sessions(cluster) as s:
        watcher, holder, waiter = s.open(True), s.open(), s.open(True)
        holder.execute("update why_t set v = v + 1 where id = 5")
        try:
            holder.execute("prepare transaction 'why_gid'")
            xid = watcher.execute(
                "select transaction::text::bigint from pg_prepared_xacts where gid = 'why_gid'"
            ).fetchone()
            s.in_background(waiter, "update why_t set v = v + 1 where id = 5 /* why prepared */")
            expected = wait_blocked(watcher, waiter.info.backend_pid)
        finally:
            # Never left behind on the module's server, whatever failed above.
            left = "select 1 from pg_prepared_xacts where gid = 'why_gid'"
            if watcher.execute(left).fetchone():
                watcher.execute("commit prepared 'why_gid'")
        s.join()
    (prepared,) = daemon.wait_for_events("why prepared", 1)
    assert direct(prepared) == expected == {0}
    (entry,) = prepared["blocked_by"]
    assert entry["prepared"] == {"transaction": xid[0], "gid": None}
    assert entry["state"] is None and entry["query"] is None

    # A statement that never waited on a lock: [] (seen, nothing blocked it).
    cluster.psql("select pg_sleep(0.3) /* why free */", check=True)
    (free,) = daemon.wait_for_events("why free", 1)
    assert free["blocked_by"] == [] and free["lock_wait_start"] is None
    assert daemon.stop() == 0
    # The console's "why" line under the statement's own.
    lines = [entry["line"] for entry in daemon.process.logs if "line" in entry]
    why = lines[lines.index(next(line for line in lines if "why row" in line)) + 1]
    assert why.strip().startswith("why: waited "), why
    assert f"Lock:transactionid, blocked by pid {row['blocked_by'][0]['pid']} (idle in " in why


@pytest.mark.parametrize("major", (15, 18))
def test_a_parallel_query_s_workers_block_as_its_lock_group(servers, start_daemon, major):
    cluster = servers(major)
    cluster.psql(
        "create table if not exists why_par as select g from generate_series(1, 1200) g",
        "create or replace function why_slow() returns bool language plpgsql parallel safe"
        " as $$ begin perform pg_sleep(0.004); return true; end $$",
        check=True,
    )
    daemon = start_daemon(cluster, **SAMPLED)
    seen: set[int] = set()
    with sessions(cluster) as s:
        watcher, leader, waiter = s.open(True), s.open(True), s.open()  # LOCK: a transaction
        for setting in (
            "parallel_setup_cost = 0",
            "parallel_tuple_cost = 0",
            "min_parallel_table_scan_size = 0",
            "max_parallel_workers_per_gather = 2",
        ):
            leader.execute(f"set {setting}")
        s.in_background(leader, "select count(*) from why_par where why_slow()")
        pid = leader.info.backend_pid
        wait_until(
            lambda: watcher.execute(
                "select array_agg(pid) from pg_stat_activity where leader_pid = %s and pid <> %s",
                (pid, pid),
            ).fetchone()[0],
            what="parallel workers started",
        )
        s.in_background(waiter, "lock table why_par in access exclusive mode /* why parallel */")
        wait_until(lambda: blocking_pids(watcher, waiter.info.backend_pid), what="waiter blocked")
        while (now := blocking_pids(watcher, waiter.info.backend_pid)) and len(seen) < 3:
            seen |= now
            time.sleep(0.05)
        s.join()
        waiter.commit()
    (event,) = daemon.wait_for_events("why parallel", 1)
    # pg_blocking_pids() names the leader for its workers' locks too ("client-visible
    # process IDs"); blocked_by names each process, a worker with its leader.
    assert seen == {pid}
    entries = event["blocked_by"]
    assert {entry.get("lock_group_leader", entry["pid"]) for entry in entries} == {pid}
    assert pid in {entry["pid"] for entry in entries}, entries
    assert all(entry["level"] == 1 for entry in entries)
    assert daemon.stop() == 0


def _statements_figures(cluster: Cluster, marker: str) -> dict[str, int]:
    columns = "shared_blks_hit, shared_blks_read, temp_blks_written, wal_records"
    out = cluster.psql(
        f"select {columns} from pg_stat_statements where query like '%{marker}%'"
        " and query not like '%pg_stat_statements%'",
        check=True,
    ).stdout.strip()
    values = [int(value) for value in out.split("|")]
    return dict(zip(columns.split(", "), values))


def _explain(cluster: Cluster, sql: str, *settings: str) -> dict[str, Any]:
    with psycopg.connect(cluster.dsn(), autocommit=True) as connection:
        for setting in settings:
            connection.execute(f"set {setting}")
        row = connection.execute(f"explain (analyze, buffers, format json) {sql}").fetchone()
    assert row is not None
    plan: dict[str, Any] = row[0][0]["Plan"]
    return plan


def within(ours: float, theirs: float, share: float = 0.10) -> bool:
    return abs(ours - theirs) <= share * theirs


@pytest.mark.parametrize("major", (15, 18))
def test_resources_agree_with_postgresql_s_own_figures(servers, start_daemon, major):
    cluster = servers(major)
    # Each piece of work comes after a sleep: the baseline (the first look) is then
    # taken before it starts, and the statement's figures are all of the work's.
    cluster.psql(
        "create table if not exists why_scan as"
        " select g, repeat('x', 200) pad from generate_series(1, 20000) g",
        "vacuum analyze why_scan",
        "create table if not exists why_wal (g int)",
        "create or replace function why_after_sleep(sql text) returns bigint"
        " language plpgsql as $$ declare n bigint; begin perform pg_sleep(0.3);"
        " execute sql into n; return n; end $$",
        "create or replace function why_insert(n int) returns void language plpgsql"
        " as $$ begin perform pg_sleep(0.3);"
        " insert into why_wal select generate_series(1, n); end $$",
        check=True,
    )
    pages = int(
        cluster.psql("select relpages from pg_class where relname = 'why_scan'").stdout.strip()
    )
    daemon = start_daemon(cluster, **SAMPLED)
    scan = "select count(*) from why_scan"
    sort = "select count(*) from (select g from why_scan order by pad, g desc offset 0) s"
    cluster.psql("select pg_stat_statements_reset()", check=True)
    # One connection that stays, as an application's pool would: its end is read while
    # the backend lives (psql's backend exits at once; the last test here is its case).
    with psycopg.connect(cluster.dsn(), autocommit=True) as connection:
        # Warm the backend's catalog caches: planning a first query reads the catalogs.
        connection.execute(f"{scan}; {sort}")
        connection.execute(f"select why_after_sleep('{scan}') /* why scan */")
        connection.execute("set work_mem = '64kB'")
        # Another shape than the scan's: pg_stat_statements keeps one entry per shape.
        connection.execute(f"select 0, why_after_sleep('{sort}') /* why sort */")
        connection.execute("reset work_mem")
        connection.execute("select why_insert(5000) /* why wal */")
        connection.execute(
            "do $$ declare i int := 0; begin while i < 8000000 loop i := i + 1; end loop;"
            " end $$ /* why cpu */"
        )
        connection.execute("select pg_sleep(0.5) /* why sleep */")
        time.sleep(0.1)  # idle: the last statement's end is seen before the backend goes
    by_marker = {
        marker: daemon.wait_for_events(f"why {marker}", 1)[0]
        for marker in ("scan", "sort", "wal", "cpu", "sleep")
    }
    for event in by_marker.values():
        assert event["resources_exact"] is False, event
        assert None not in event["resources"].values(), event

    scanned = by_marker["scan"]["resources"]
    touched = scanned["shared_blks_hit"] + scanned["shared_blks_read"]
    assert within(touched, pages), (scanned, pages)
    plan = _explain(cluster, scan)
    assert within(touched, plan["Shared Hit Blocks"] + plan["Shared Read Blocks"]), plan
    theirs = _statements_figures(cluster, "why scan")
    assert within(touched, theirs["shared_blks_hit"] + theirs["shared_blks_read"]), theirs

    sorted_ = by_marker["sort"]["resources"]
    plan = _explain(cluster, sort, "work_mem = '64kB'")
    assert plan["Temp Written Blocks"] > 0, plan
    assert within(sorted_["temp_blks_written"], plan["Temp Written Blocks"]), (sorted_, plan)
    assert sorted_["temp_blks_read"] > 0, sorted_
    theirs = _statements_figures(cluster, "why sort")
    assert within(sorted_["temp_blks_written"], theirs["temp_blks_written"]), theirs

    wal = by_marker["wal"]["resources"]
    assert wal["wal_records"] >= 5000 and wal["wal_bytes"] > 5000 * 20, wal
    theirs = _statements_figures(cluster, "why wal")
    assert within(wal["wal_records"], theirs["wal_records"]), theirs

    cpu = by_marker["cpu"]
    # On a CPU for 70% of it at least, or runnable and waiting for one (the machine is
    # shared: the run queue is not the statement's doing).
    spent = cpu["resources"]["cpu_ms"] + cpu["resources"]["cpu_wait_ms"]
    assert spent >= 0.7 * cpu["duration_ms"] and cpu["resources"]["cpu_ms"] > 0, cpu
    sleep = by_marker["sleep"]
    assert sleep["resources"]["cpu_ms"] < 0.1 * sleep["duration_ms"], sleep

    # psql disconnects as soon as its statement is done: a look rarely finds the
    # backend alive at the end. The figures are then those of the last reading while
    # it ran, a lower bound like the rest.
    cluster.psql("select why_insert(3000) /* why gone */", check=True)
    (gone,) = daemon.wait_for_events("why gone", 1)
    assert gone["resources_exact"] is False
    figures = gone["resources"]
    assert figures is not None, gone
    assert figures["wal_records"] is not None and figures["cpu_ms"] is not None, figures
    assert daemon.stop() == 0


@pytest.mark.parametrize("major", (15, 18))
def test_workers_blocked_while_their_leader_waits_for_them(servers, start_daemon, major):
    """With parallel_leader_participation off only the workers run the scan, and the
    function in it reads a table another session has locked: the workers wait on the
    lock, the leader in IPC. pg_blocking_pids() of the leader names the holder, and so
    does blocked_by, from a worker's walk."""
    cluster = servers(major)
    cluster.psql(
        "create table if not exists why_par as select g from generate_series(1, 1200) g",
        "create table if not exists why_side (v int)",
        "create or replace function why_peek() returns bool language plpgsql parallel safe"
        " as $$ begin perform 1 from why_side limit 1; return true; end $$",
        check=True,
    )
    daemon = start_daemon(cluster, **SAMPLED)
    with sessions(cluster) as s:
        watcher, holder, leader = s.open(True), s.open(), s.open(True)
        pids = pids_of(holder=holder, leader=leader)
        for setting in (*FORCED_PARALLEL, "parallel_leader_participation = off"):
            leader.execute(f"set {setting}")
        holder.execute("lock table why_side in access exclusive mode")
        s.in_background(leader, "select count(*) from why_par where why_peek() /* why workers */")
        expected = wait_blocked(watcher, pids["leader"])
        holder.commit()
        s.join()
        (event,) = daemon.wait_for_events("why workers", 1)
    assert expected == {pids["holder"]}
    assert not any(wait.startswith("Lock:") for wait in event["waits"]), event["waits"]
    assert direct(event) == expected, event["blocked_by"]
    entry = event["blocked_by"][0]
    assert entry["blocks"] != pids["leader"]  # a worker's pid: the one that waited
    assert (entry["lock"]["type"], entry["lock"]["mode"]) == ("relation", "AccessExclusiveLock")
    assert daemon.stop() == 0


FORCED_PARALLEL = (
    "parallel_setup_cost = 0",
    "parallel_tuple_cost = 0",
    "min_parallel_table_scan_size = 0",
    "max_parallel_workers_per_gather = 2",
)


@pytest.mark.parametrize("major", (15, 18))
def test_a_parallel_leader_counts_its_workers_buffers_once_they_finish(
    servers, start_daemon, major
):
    """The workers' buffer counters reach the leader's when the Gather ends: the
    statement's figures then hold the whole scan. Their CPU is their own processes'."""
    cluster = servers(major)
    cluster.psql(
        "create table if not exists why_scan as"
        " select g, repeat('x', 200) pad from generate_series(1, 20000) g",
        "vacuum analyze why_scan",
        check=True,
    )
    pages = int(
        cluster.psql("select relpages from pg_class where relname = 'why_scan'").stdout.strip()
    )
    forced = (
        "parallel_setup_cost = 0",
        "parallel_tuple_cost = 0",
        "min_parallel_table_scan_size = 0",
        "max_parallel_workers_per_gather = 2",
    )
    scan = "select count(*) from why_scan"
    plan = _explain(cluster, scan, *forced)
    assert plan["Plans"][0]["Workers Launched"] > 0, plan
    daemon = start_daemon(cluster, **SAMPLED)
    # The statement first waits for a lock (the looks take its baseline meanwhile),
    # then plans and runs the parallel scan: all of its work comes after the baseline.
    with sessions(cluster) as s:
        watcher, holder, leader = s.open(True), s.open(), s.open(True)
        for setting in forced:
            leader.execute(f"set {setting}")
        pids = pids_of(holder=holder)
        holder.execute("lock table why_scan in access exclusive mode")
        s.in_background(leader, f"{scan} /* why gather */")
        wait_blocked(watcher, leader.info.backend_pid)
        holder.commit()
        s.join()
        # The session stays until the event is out: its end figures are read while
        # the backend lives (see the "why gone" case above for one that does not).
        (event,) = daemon.wait_for_events("why gather", 1)
    figures = event["resources"]
    assert within(figures["shared_blks_hit"] + figures["shared_blks_read"], pages), figures
    assert direct(event) == {pids["holder"]}
    assert daemon.stop() == 0


def test_postgresql_18_s_io_workers_read_for_the_backend(start_daemon):
    """io_method = worker (18's default): the backend counts the blocks it asked for,
    but I/O workers do the reads, so its own read_bytes are a small part of them;
    io_method = sync: the backend reads itself. The page cache is dropped before each
    scan, and the server restarted, so both are cold reads from disk. Dropping the page
    cache is felt by the whole machine (the next reads of every program go to disk):
    a test VM's, once or twice per run."""
    cluster = Cluster(embedded_bindir())
    try:
        cluster.start()
        cluster.psql(
            "create table why_cold as"
            " select g, repeat('x', 200) pad from generate_series(1, 100000) g",
            "create function why_after_sleep(sql text) returns bigint language plpgsql as"
            " $$ declare n bigint; begin perform pg_sleep(0.3); execute sql into n;"
            " return n; end $$",
            # Hint bits set now and written out: the scans below dirty no page, so no
            # page of the table is left in the OS cache for drop_caches to keep.
            "vacuum (freeze, analyze) why_cold",
            "checkpoint",
            check=True,
        )
        pages = int(
            cluster.psql("select pg_relation_size('why_cold') / 8192", check=True).stdout.strip()
        )
        figures = {}
        for method in ("worker", "sync"):
            cluster.psql(f"alter system set io_method = '{method}'", check=True)
            cluster.restart()
            daemon = start_daemon(cluster, **SAMPLED)
            with psycopg.connect(cluster.dsn(), autocommit=True) as connection:
                connection.execute("select 1")  # the catalogs, before the cache is dropped
                subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=True)
                connection.execute(
                    f"select why_after_sleep('select count(*) from why_cold') /* why {method} */"
                )
                (event,) = daemon.wait_for_events(f"why {method}", 1)
            assert daemon.stop() == 0
            figures[method] = event["resources"]
    finally:
        cluster.stop()
    for method, resources in figures.items():
        assert within(resources["shared_blks_read"], pages), (method, resources, pages)
    size = pages * 8192
    # sync: the backend read (most of) the table itself; worker: a small part of that.
    assert figures["sync"]["read_bytes"] >= 0.6 * size, figures
    assert figures["worker"]["read_bytes"] < 0.5 * figures["sync"]["read_bytes"], figures


def test_with_explain_a_blocking_relation_lock_names_its_table(servers, start_daemon):
    """[explain]'s connection to the statement's database names the relation of a
    lock by EXPLAIN (VERBOSE) alone; the event has its plan besides."""
    cluster = servers(15)
    daemon = start_daemon(cluster, **SAMPLED, explain={"user": "postgres"})
    with sessions(cluster) as s:
        watcher, holder, waiter = s.open(True), s.open(), s.open(True)
        holder.execute("lock table why_t in access exclusive mode")
        s.in_background(waiter, "select count(*) from why_t /* why named */")
        wait_blocked(watcher, waiter.info.backend_pid)
        holder.commit()
        s.join()
        (event,) = daemon.wait_for_events("why named", 1)
    (entry,) = event["blocked_by"]
    assert (entry["lock"]["type"], entry["lock"]["relation_name"]) == ("relation", "why_t")
    assert event["plan"][0]["Plan"]["Node Type"] == "Aggregate", event["plan_error"]
    assert event["fingerprint"]
    assert daemon.stop() == 0

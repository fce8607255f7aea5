"""The `sampled` definition against real servers: no trap, statements found by looking.

Debian's stripped PostgreSQL 15 and the embedded PostgreSQL 18, with real psql,
psycopg (extended protocol, a pipeline, a transaction) and two connections that
block each other on a row lock.
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from waiting import wait_until

pytestmark = pytest.mark.ebpf  # needs root: it reads the servers' memory

SAMPLED = {"probes": ["sampled"], "threshold_ms": 200}


def test_short_lived_connections_are_each_reported(cluster, start_daemon):
    daemon = start_daemon(cluster, **SAMPLED)
    for n in range(3):
        cluster.psql(f"select pg_sleep(0.3) /* sampled short {n} */", check=True)
    # A connection per statement, the next at once: its backend often takes the slot
    # before a look has read how the last statement ended.
    for n in range(3, 8):
        with psycopg.connect(cluster.dsn(), autocommit=True) as connection:
            connection.execute(f"select pg_sleep(0.3) /* sampled short {n} */")
    cluster.psql("select pg_sleep(0.05) /* sampled fast */", check=True)
    events = daemon.wait_for_events("sampled short", 8)
    for event in events:
        assert event["probe"] == "sampled", event
        # Ended before the client left, even where the slot went first: the backend's
        # proc_exit(0) says so.
        assert (event["outcome"], event["backend_exited"]) == ("ok", False), event
        if event["duration_exact"]:
            assert abs(event["duration_ms"] - 300) < 15, event
        else:
            # The end is then the backend's exit, an upper bound.
            assert 299 < event["duration_ms"] < 340, event
        assert (event["user"], event["database"]) == ("postgres", "postgres")
        assert max(event["waits"], key=event["waits"].get) == "Timeout:PgSleep", event
    assert sorted(e["query"] for e in events) == sorted(
        f"select pg_sleep(0.3) /* sampled short {n} */" for n in range(8)
    )
    assert daemon.stop() == 0
    assert daemon.events("sampled fast") == []


def test_extended_protocol_in_a_transaction_and_an_error_in_it(cluster, start_daemon):
    daemon = start_daemon(cluster, **SAMPLED)
    with psycopg.connect(cluster.dsn()) as connection:  # not autocommit: a transaction
        connection.execute("select pg_sleep(%s) /* sampled bound */", (0.25,))
        # Idle in transaction for 10 looks, not a next statement at once: the end is exact.
        time.sleep(0.1)
        with pytest.raises(psycopg.errors.RaiseException):
            connection.execute(
                "do $$ begin perform pg_sleep(0.3); raise exception 'boom'; end $$"
                " /* sampled failing */"
            )
        time.sleep(0.1)  # idle in the failed transaction before it ends, as above
    (bound,) = daemon.wait_for_events("sampled bound", 1)
    (failed,) = daemon.wait_for_events("sampled failing", 1)
    assert bound["query"] == "select pg_sleep($1) /* sampled bound */"
    assert abs(bound["duration_ms"] - 250) < 15 and bound["duration_exact"] is True
    assert failed["outcome"] == "error" and 290 < failed["duration_ms"] < 330


def test_outcomes_come_from_the_failure_uprobes(cluster, start_daemon):
    """Outside a transaction block PostgreSQL leaves no mark to read: the uprobes on
    the error and cancel paths tell ok, error and cancelled apart (with proc_exit's)."""
    daemon = start_daemon(cluster, **SAMPLED)
    # AbortCurrentTransaction, StatementCancelHandler and proc_exit: compiled and
    # attached while the looks began, before "ready"
    assert daemon.process.wait_for_log("outcome_uprobes_attached")["uprobes"] == 3
    cluster.psql("select pg_sleep(0.3) /* sampled fine */", check=True)
    failing = "do $$ begin perform pg_sleep(0.3); raise exception 'boom'; end $$ /* sampled err */"
    assert cluster.psql(failing).returncode != 0
    timed_out = cluster.psql(
        "set statement_timeout = 300", "select pg_sleep(1) /* sampled timeout */"
    )
    assert "statement timeout" in timed_out.stderr
    with psycopg.connect(cluster.dsn(), autocommit=True) as connection:
        pid = connection.info.backend_pid
        cancel = threading.Timer(
            0.3, lambda: cluster.psql(f"select pg_cancel_backend({pid})", check=True)
        )
        cancel.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            connection.execute("select pg_sleep(2) /* sampled cancel */")
        cancel.join()
        connection.execute("select pg_sleep(0.25) /* sampled after cancel */")
    outcomes = {
        marker: daemon.wait_for_events(marker, 1)[0]["outcome"]
        for marker in ("fine", "err", "timeout", "cancel", "after cancel")
        for marker in [f"sampled {marker}"]
    }
    assert outcomes == {
        "sampled fine": "ok",
        "sampled err": "error",
        "sampled timeout": "cancelled",
        "sampled cancel": "cancelled",
        "sampled after cancel": "ok",
    }, outcomes


def test_each_statement_of_a_pipeline_on_its_own(cluster, start_daemon):
    daemon = start_daemon(cluster, **SAMPLED)
    sleeps = [0, 0.3, 0, 0.25, 0.01]
    with psycopg.connect(cluster.dsn(), autocommit=True) as connection:
        with connection.pipeline():
            for n, seconds in enumerate(sleeps):
                connection.execute(f"select pg_sleep(%s) /* sampled pipe {n} */", (seconds,))
    first = daemon.wait_for_events("sampled pipe 1", 1)[0]
    second = daemon.wait_for_events("sampled pipe 3", 1)[0]
    # Each is timed from its own Execute; the next one's start bounds its end.
    assert 300 <= first["duration_ms"] < 340 and first["duration_exact"] is False
    assert 250 <= second["duration_ms"] < 290
    assert [e for e in daemon.events("sampled pipe") if e not in (first, second)] == []


def test_a_lock_wait_shows_as_lock(cluster, start_daemon):
    daemon = start_daemon(cluster, **SAMPLED)
    cluster.psql("create table if not exists sampled_lock (id int primary key)", check=True)
    cluster.psql("insert into sampled_lock values (1) on conflict do nothing", check=True)
    holder = psycopg.connect(cluster.dsn())
    try:
        holder.execute("select * from sampled_lock where id = 1 for update")
        release = threading.Timer(1.0, holder.commit)
        release.start()
        cluster.psql("update sampled_lock set id = 1 where id = 1 /* sampled blocked */")
        release.join()
    finally:
        holder.close()
    (event,) = daemon.wait_for_events("sampled blocked", 1)
    waits = event["waits"]
    assert waits.get("Lock:transactionid", 0) > 0.8 * sum(waits.values()), waits
    assert 950 < event["duration_ms"] < 1200


def test_query_id_is_postgresql_s_own(cluster, start_daemon):
    daemon = start_daemon(cluster, **SAMPLED)
    seen: list[int] = []
    with psycopg.connect(cluster.dsn(), autocommit=True) as connection:
        connection.execute("set compute_query_id = on")
        pid = connection.info.backend_pid

        def ask() -> None:
            with psycopg.connect(cluster.dsn(), autocommit=True) as other:

                def query_id() -> int | None:
                    row = other.execute(
                        "select query_id from pg_stat_activity where pid = %s and state = "
                        "'active' and query like '%%sampled_query_id%%'",  # not the marker
                        (pid,),
                    ).fetchone()
                    return row[0] if row else None

                seen.append(wait_until(query_id, 5, "the statement's query_id in pg_stat_activity"))

        asking = threading.Thread(target=ask)
        asking.start()
        connection.execute("select pg_sleep(0.5) /* sampled query id */")
        asking.join()
    (event,) = daemon.wait_for_events("sampled query id", 1)
    assert seen, "the statement's query_id was never seen in pg_stat_activity"
    assert event["query_id"] == seen[0]


def test_auto_switches_live_with_the_threshold_and_loses_nothing(cluster, start_daemon):
    """auto picks sampled at 200 ms and activity under its floor of 50 ms; a SIGHUP that
    crosses the line switches while statements run across it: each reported once."""
    daemon = start_daemon(cluster, threshold_ms=200)  # probes = ["auto"]
    assert daemon.process.wait_for_log("ready")["probes"] == ["sampled@target0"]

    def running(marker: str) -> bool:
        """Whether a statement with `marker` is under way. The question does not hold
        the marker itself (LIKE's _ stands for the spaces), so it is never one of ours."""
        pattern = marker.replace(" ", "_")
        sql = (
            "select 1 from pg_stat_activity where state = 'active' and "
            f"pid <> pg_backend_pid() and query like '%{pattern}%'"
        )
        return cluster.psql(sql, check=True).stdout.strip() == "1"

    def across(marker: str) -> threading.Thread:
        # Under way when the switch begins, still running when it ends (loading the new
        # definition's BPF program takes a second or two).
        thread = threading.Thread(target=cluster.psql, args=(f"select pg_sleep(5) /* {marker} */",))
        thread.start()
        wait_until(lambda: running(marker), 5, f"{marker!r} running in pg_stat_activity")
        return thread

    long_one = across("switch down across")
    daemon.write_config(threshold_ms=15)
    daemon.process.reload()
    down = daemon.process.wait_for_log("reloaded")
    assert down["probes_switched"] == ["activity@target0"], down
    cluster.psql("select pg_sleep(0.1) /* switch down after */", check=True)
    long_one.join()
    handed = daemon.process.wait_for_log("probe_handed_over")
    assert (handed["probe"], handed["target"]) == ("sampled", "target0")
    second = across("switch up across")
    daemon.write_config(threshold_ms=200)
    daemon.process.reload()
    up = daemon.process.wait_for_log("reloaded", count=2)
    assert up["probes_switched"] == ["sampled@target0"], up
    cluster.psql("select pg_sleep(0.3) /* switch up after */", check=True)
    second.join()
    expected = {
        "switch down across": "sampled",  # began before the switch: the old one's
        "switch down after": "activity",
        "switch up across": "sampled",  # ends after the switch: the new one's
        "switch up after": "sampled",
    }
    for marker, probe in expected.items():
        (event,) = daemon.wait_for_events(marker, 1)
        assert event["probe"] == probe, event
    assert daemon.stop() == 0  # drained: a second report of one would be in the file now
    for marker in expected:
        assert len(daemon.events(marker)) == 1, daemon.events(marker)


def test_statements_at_1_2_times_the_threshold_are_all_caught(cluster, start_daemon):
    """Recall at threshold + 2 intervals (220 ms here) is 100%: 240 ms statements, one
    after the other on one connection and each on a connection of its own."""
    daemon = start_daemon(cluster, **SAMPLED)
    with psycopg.connect(cluster.dsn(), autocommit=True) as connection:
        for n in range(8):
            connection.execute(f"select pg_sleep(0.24) /* recall extended {n} */")
    for n in range(4):
        cluster.psql(f"select pg_sleep(0.24) /* recall simple {n} */", check=True)
    assert len(daemon.wait_for_events("/* recall extended", 8)) == 8
    assert len(daemon.wait_for_events("/* recall simple", 4)) == 4
    for event in daemon.events("/* recall "):
        assert 239 < event["duration_ms"] < 260, event


def test_a_busy_scan_reports_cpu_or_io(cluster, start_daemon):
    daemon = start_daemon(cluster, **SAMPLED)
    cluster.psql("select count(*) from generate_series(1, 4000000) /* sampled busy */", check=True)
    (event,) = daemon.wait_for_events("sampled busy", 1)
    waits = event["waits"]
    assert waits.get("CPU", 0) > 0.5 * sum(waits.values()), waits
    assert all(name == "CPU" or name.startswith("IO:") for name in waits), waits

"""The opt-in `backend_status` definition: one trap per statement, read from PostgreSQL.

Real servers (Debian 15 stripped, PyPI 18), real probes, real psql and psycopg. The entry
read is the backend's own pg_stat_activity row (PgBackendStatus).
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import psycopg
import pytest
from conftest import bindir

from pgslowlog.elf import inspect_binary
from pgslowlog.plugins.activity_probe import ACTIVITY
from pgslowlog.plugins.backend_status_probe import BACKEND_STATUS
from pgslowlog.probes import select_probes, wanted_symbols

# Each test that attaches is marked ebpf; the last one only reads a binary (no root).

PROBE = ["backend_status"]
FAILING = "do $$ begin perform pg_sleep(0.3); raise exception 'boom'; end $$ /* {marker} */"


@pytest.mark.ebpf
def test_simple_statement_timed_from_postgresql_own_timestamps(cluster, start_daemon):
    daemon = start_daemon(cluster, probes=PROBE)
    before = datetime.now(timezone.utc)
    slow = "select extract(epoch from statement_timestamp())::text, pg_sleep(0.3) /* bs slow */"
    output = cluster.psql("select 1 /* bs fast */", slow, check=True).stdout
    (event,) = daemon.wait_for_events("/* bs slow */", 1)
    assert event["query"] == slow
    assert abs(event["duration_ms"] - 300) < 20
    assert (event["probe"], event["outcome"], event["protocol"]) == ("backend_status", "ok", None)
    assert (event["user"], event["database"], event["application_name"]) == (
        "postgres",
        "postgres",
        "psql",
    )
    assert event["query_truncated"] is False and event["backend_exited"] is False
    started = datetime.fromisoformat(event["ts"])
    assert before - timedelta(seconds=1) < started < datetime.now(timezone.utc)
    # The start is PostgreSQL's own, to the microsecond: no clock was converted and back.
    stamped = Decimal(output.splitlines()[-1].split("|")[0])
    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
    assert (started - epoch) // timedelta(microseconds=1) == int(stamped * 1_000_000)
    assert daemon.stop() == 0
    assert daemon.events("/* bs fast */") == []


@pytest.mark.ebpf
def test_extended_protocol_and_a_cycle_without_a_statement(cluster, start_daemon):
    daemon = start_daemon(cluster, probes=PROBE)
    with psycopg.connect(cluster.dsn() + " application_name=shop-api", autocommit=True) as conn:
        pid = conn.info.backend_pid
        conn.execute("select pg_sleep(%s) /* bs extended */", (0.3,))
        # A Bind that fails before any statement starts: the next ready must not
        # report the previous statement again.
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            conn.execute("execute nonexistent")
        conn.pgconn.send_query_prepared(b"nonexistent", None)
        while conn.pgconn.get_result() is not None:
            pass
        conn.execute("select 1")
    (event,) = daemon.wait_for_events("/* bs extended */", 1)
    assert event["query"] == "select pg_sleep($1) /* bs extended */"
    assert (event["pid"], event["application_name"], event["outcome"]) == (pid, "shop-api", "ok")
    assert 290 < event["duration_ms"] < 330
    assert daemon.stop() == 0
    assert len(daemon.events("/* bs extended */")) == 1


@pytest.mark.ebpf
def test_failed_and_cancelled_statements(cluster, start_daemon):
    daemon = start_daemon(cluster, probes=PROBE)
    cluster.psql(FAILING.format(marker="bs failing"))
    cluster.psql("begin", FAILING.format(marker="bs failing in block"), "rollback")
    cluster.psql("set statement_timeout = 250", "select pg_sleep(3) /* bs cancelled */")
    cluster.psql("select pg_sleep(0.25) /* bs fine after */", check=True)
    (failed,) = daemon.wait_for_events("/* bs failing */", 1)
    (in_block,) = daemon.wait_for_events("/* bs failing in block */", 1)
    (cancelled,) = daemon.wait_for_events("/* bs cancelled */", 1)
    (fine,) = daemon.wait_for_events("/* bs fine after */", 1)
    assert failed["outcome"] == in_block["outcome"] == "error"
    assert 290 < failed["duration_ms"] < 400
    assert cancelled["outcome"] == "cancelled" and 245 < cancelled["duration_ms"] < 350
    assert fine["outcome"] == "ok"


@pytest.mark.ebpf
def test_cancel_while_idle_does_not_label_the_next_error(cluster, start_daemon):
    daemon = start_daemon(cluster, probes=PROBE)
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        cluster.psql(f"select pg_cancel_backend({conn.info.backend_pid})", check=True)
        with pytest.raises(psycopg.errors.RaiseException):
            conn.execute(FAILING.format(marker="bs error after idle cancel"))
    (event,) = daemon.wait_for_events("/* bs error after idle cancel */", 1)
    assert event["outcome"] == "error"


@pytest.mark.ebpf
def test_backend_connected_before_the_daemon(cluster, start_daemon):
    with psycopg.connect(cluster.dsn(), autocommit=True) as early:
        early.execute("select pg_sleep(0.3) /* bs before attach */")
        daemon = start_daemon(cluster, probes=PROBE)
        early.execute("select pg_sleep(0.25) /* bs after attach */")
        (event,) = daemon.wait_for_events("/* bs after attach */", 1)
        assert event["pid"] == early.info.backend_pid
    assert daemon.stop() == 0
    assert daemon.events("/* bs before attach */") == []


@pytest.mark.ebpf
def test_statements_postgresql_kept_no_record_of_are_counted(pg15, start_daemon):
    daemon = start_daemon(pg15, probes=PROBE)
    pg15.psql("set track_activities = off", "select pg_sleep(0.25) /* bs off */", check=True)
    warning = daemon.process.wait_for_log("statements_unrecorded")
    assert warning["count"] >= 1
    assert warning["fix"] == "turn track_activities on, or use the activity probe"
    assert daemon.stop() == 0
    assert daemon.events("/* bs off */") == []


@pytest.mark.ebpf
def test_text_is_cut_where_postgresql_cut_it(cluster, start_daemon):
    daemon = start_daemon(cluster, probes=PROBE, query_max_bytes=4096)
    query = "select pg_sleep(0.25) /* bs long " + "x" * 2000 + " */"
    cluster.psql(query, check=True)
    (event,) = daemon.wait_for_events("/* bs long", 1)
    size = int(cluster.psql("show track_activity_query_size", check=True).stdout.split("kB")[0])
    assert event["query"] == query[: size * 1024 - 1]
    assert event["query_truncated"] is True


# Debian's stripped 15 exports MyBEEntry in its dynamic symbols; the wheel's 18 keeps
# its whole symbol table. Both have a layout pgslowlog knows.
@pytest.mark.parametrize(
    ("server", "major"), [pytest.param("pg15", 15, marks=pytest.mark.system), ("pg18", 18)]
)
def test_offered_where_the_layout_is_known_and_never_picked_by_auto(server, major):
    wanted = wanted_symbols([ACTIVITY, BACKEND_STATUS])
    binary = inspect_binary(str(bindir(server) / "postgres"), wanted)
    assert binary.major == major
    assert BACKEND_STATUS.unsupported_reason(binary) is None
    older = dataclasses.replace(binary, major=14)
    assert BACKEND_STATUS.unsupported_reason(older) == (
        "backend_status is tested on PostgreSQL 15-18, not 14; use the activity probe"
    )
    no_entry = dataclasses.replace(binary, objects={})
    assert "no exported global MyBEEntry" in str(BACKEND_STATUS.unsupported_reason(no_entry))
    available = {"activity": ACTIVITY, "backend_status": BACKEND_STATUS}
    assert select_probes(["auto"], available, binary, "t") == [ACTIVITY]
    assert select_probes(["backend_status"], available, binary, "t") == [BACKEND_STATUS]

"""Third-party plugins as users install them: the example package, and broken ones."""

from __future__ import annotations

import json
import os
import sqlite3

import psycopg
import pytest
from receivers import WebhookReceiver, start_rsyslog

pytestmark = pytest.mark.ebpf


def test_example_third_party_sink_receives_events(pg18, start_daemon, tmp_path):
    database = tmp_path / "slow.db"
    daemon = start_daemon(pg18, sinks={"sqlite": {"path": str(database)}})
    pg18.psql("select pg_sleep(0.25) /* to sqlite */", check=True)
    (expected,) = daemon.wait_for_events("to sqlite", 1)
    assert daemon.stop() == 0
    with sqlite3.connect(database) as connection:
        rows = connection.execute("select query, pid, user from slow_queries").fetchall()
    assert rows == [(expected["query"], expected["pid"], "postgres")]


def test_plugins_that_fail_to_import_or_start_are_named_and_the_rest_runs(
    pg18, start_daemon, tmp_path
):
    # A distribution whose entry point names a module that does not exist.
    site = tmp_path / "site"
    info = site / "broken_plugin-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[pgslowlog]\nbroken = no_such_module_for_pgslowlog\n")
    daemon = start_daemon(
        pg18,
        env={"PYTHONPATH": f"{site}:{os.environ.get('PYTHONPATH', '')}"},
        # the sqlite sink cannot open a database in a directory that does not exist
        sinks={"sqlite": {"path": str(tmp_path / "missing" / "slow.db")}},
    )
    pg18.psql("select pg_sleep(0.25) /* despite broken plugins */", check=True)
    assert len(daemon.wait_for_events("despite broken plugins", 1)) == 1
    assert daemon.stop() == 0
    failures = [e for e in daemon.process.logs if e["event"] == "plugin_failed"]
    assert any("plugin broken" in e["message"] for e in failures)
    (sink_failure,) = [e for e in daemon.process.logs if e["event"] == "sink_start_failed"]
    assert sink_failure["sink"] == "sqlite"
    assert daemon.process.wait_for_log("ready")["sinks"] == ["file"]


def test_a_thousand_events_reach_every_healthy_sink(pg18, start_daemon, tmp_path):
    (tmp_path / "rsyslog").mkdir()
    rsyslog = start_rsyslog(tmp_path / "rsyslog")
    webhook = WebhookReceiver()
    try:
        daemon = start_daemon(
            pg18,
            threshold_ms=1,
            sinks={
                "syslog": {"address": f"tcp://127.0.0.1:{rsyslog.tcp_port}"},
                "webhook": {"url": webhook.url, "max_batch": 200, "max_delay_ms": 100},
                "console": {},
                "sqlite": {"path": str(tmp_path / "slow.db")},
            },
        )
        with psycopg.connect(pg18.dsn(), autocommit=True) as connection:
            for n in range(1000):
                connection.execute(f"select pg_sleep(0.002) /* thousand {n} */")
        assert len(daemon.wait_for_events("thousand", 1000, timeout=30)) == 1000
        assert len(webhook.wait_for("thousand", 1000, timeout=30)) == 1000
        assert len(rsyslog.wait_for("thousand", 1000, timeout=30)) == 1000
        assert daemon.stop() == 0
        stopped = daemon.process.wait_for_log("stopped")["sinks"]
        # Drained: each receiver gets exactly what its sink delivered, then nothing more.
        pid, delivered = daemon.process.process.pid, stopped["syslog"]["delivered"]
        messages = rsyslog.wait_for_sender(pid, delivered, timeout=30)
        assert len(messages) == delivered
        assert len(webhook.events) == stopped["webhook"]["delivered"]
    finally:
        webhook.stop()
        rsyslog.stop()
    # Each statement once in every sink.
    expected = sorted(f"select pg_sleep(0.002) /* thousand {n} */" for n in range(1000))
    assert sorted(e["query"] for e in daemon.events("thousand")) == expected
    assert sorted(e["query"] for e in webhook.events if "thousand" in e["query"]) == expected
    syslogged = [m["event"]["query"] for m in messages if "thousand" in m["event"]["query"]]
    assert sorted(syslogged) == expected
    console = [e["line"] for e in daemon.process.logs if "thousand" in e.get("line", "")]
    assert len(console) == 1000
    with sqlite3.connect(tmp_path / "slow.db") as connection:
        (rows,) = connection.execute("select count(*) from slow_queries").fetchone()
    assert rows == 1000
    for name, stats in stopped.items():
        assert stats["delivered"] >= 1000, (name, stats)
        assert stats["failed"] == stats["dropped"] == 0, (name, json.dumps(stats))


def test_example_third_party_probe_definition(cluster, start_daemon):
    daemon = start_daemon(cluster, probes=["utility"])
    cluster.psql("do $$ begin perform pg_sleep(0.3); end $$ /* via utility */", check=True)
    cluster.psql("select pg_sleep(0.3) /* not a utility statement */", check=True)
    (event,) = daemon.wait_for_events("via utility", 1)
    assert event["probe"] == "utility"
    assert abs(event["duration_ms"] - 300) < 25
    assert daemon.stop() == 0
    assert daemon.events("not a utility statement") == []


def test_example_third_party_definition_that_is_not_a_bpf_program(pg18, start_daemon):
    """tests/example_source: a source that asks pg_stat_activity over SQL, written against
    what `pgslowlog` exports and loaded through the same hook as the shipped ones."""
    daemon = start_daemon(pg18, probes=["activity_sql"])
    attached = daemon.process.wait_for_log("probe_attached")
    assert attached["probe"] == "activity_sql" and attached["connections"] >= 1
    # The connection stays open until the event is written: the example sees a statement
    # end only while its backend lives (its docstring says so).
    with psycopg.connect(pg18.dsn(), autocommit=True) as connection:
        connection.execute("select pg_sleep(0.3) /* over sql */")
        connection.execute("select 1 /* quick over sql */")
        (event,) = daemon.wait_for_events("/* over sql */", 1)
    assert (event["probe"], event["user"], event["database"]) == (
        "activity_sql",
        "postgres",
        "postgres",
    )
    assert abs(event["duration_ms"] - 300) < 25  # PostgreSQL's own query_start and state_change
    assert daemon.stop() == 0
    assert daemon.events("quick over sql") == []
    stopped = daemon.process.wait_for_log("stopped")
    counters = stopped["kernel_counters"]["activity_sql@target0"]
    assert counters["emitted"] >= 1 and counters["statements"] >= counters["emitted"]

"""[explain]: what may be explained, the fingerprint, and plans from real servers.

Pure logic first (which texts are plannable, the fingerprint, finding a server's
socket). Then the Explainer against Debian's PostgreSQL 15 (the PREPARE path for
texts with $n) and the wheel's PostgreSQL 18: plans, errors, limits, delivery.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog
from conftest import SERVERS, bindir
from events import slow
from waiting import wait_for_count, wait_until

from pgslowlog.config import ExplainConfig
from pgslowlog.event import SlowQuery
from pgslowlog.explain import APPLICATION_NAME, OWN_PIDS
from pgslowlog.explain.explainer import Explainer
from pgslowlog.explain.statements import Plannable, fingerprint, plannable
from pgslowlog.testing.cluster import Cluster


@pytest.mark.parametrize(
    ("text", "kind", "parameters"),
    [
        ("select * from t where id = 5", "SELECT", 1),
        ("values (1, 'a')", "SELECT", 2),
        ("table t", "SELECT", 0),
        ("with a as (select 1) select * from a", "SELECT", 1),
        ("insert into t values ($1, 'x')", "INSERT", 2),
        ("update t set v = v + 1 where id = $1", "UPDATE", 2),
        ("delete from t where id = $3", "DELETE", 3),
        ("merge into t using s on t.id = s.id when matched then delete", "MERGE", 0),
        ("with d as (delete from t returning *) select * from d", "SELECT", 0),
        ("/* a comment */ select 1;", "SELECT", 1),
    ],
)
def test_plannable_statements(text: str, kind: str, parameters: int) -> None:
    result = plannable(text)
    assert isinstance(result, Plannable)
    assert (result.kind, result.parameters) == (kind, parameters)
    assert "'" not in result.text and "5" not in result.text  # constants are $n


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("select 1; commit", "2 statements in one text"),
        ("select 1; drop table t", "2 statements in one text"),
        ("create table x (a int)", "CreateStmt is not a plannable statement"),
        ("vacuum t", "VacuumStmt is not a plannable statement"),
        ("begin", "TransactionStmt is not a plannable statement"),
        ("set work_mem = '1GB'", "VariableSetStmt is not a plannable statement"),
        ("explain analyze delete from t", "ExplainStmt is not a plannable statement"),
        ("copy t to stdout", "CopyStmt is not a plannable statement"),
        ("declare c cursor for select 1", "DeclareCursorStmt is not a plannable statement"),
        ("select 1 into x", "SELECT INTO creates a table"),
        ("", "0 statements in one text"),
        ("select (", "the text does not parse: syntax error at end of input"),
    ],
)
def test_unplannable_statements_say_why(text: str, reason: str) -> None:
    result = plannable(text)
    assert isinstance(result, str)
    assert result.startswith(f"not explained: {reason}")


def test_hostile_text_costs_no_event() -> None:
    assert fingerprint("\udcff select") is None  # a lone surrogate
    assert (
        plannable("\udcff select") == "not explained: the text cannot be parsed: UnicodeEncodeError"
    )
    assert plannable("select 1\x00; drop table t") == (
        "not explained: the text holds a NUL character"
    )
    deep = "select " + "(" * 100_000 + "1" + ")" * 100_000
    assert fingerprint(deep) is None
    assert plannable(deep) == (
        'not explained: the text does not parse: memory exhausted at or near "("'
    )


def test_cut_text_is_not_explained() -> None:
    assert plannable("select 1", truncated=True) == (
        "not explained: the text was cut at query_max_bytes"
    )


def test_fingerprint_ignores_constants_placeholders_and_layout() -> None:
    a = fingerprint("select * from t where id = 1")
    assert a is not None and len(a) == 16
    assert fingerprint("SELECT *\n  FROM t /* x */ WHERE id = $1") == a
    assert fingerprint("select * from t where id = 'x'") == a
    assert fingerprint("select * from u where id = 1") != a
    assert fingerprint("select * from t where (") is None  # cut text: none


def test_enricher_gives_every_event_a_fingerprint_and_drops_its_own_explains() -> None:
    from pgslowlog.enrichment import Enricher
    from pgslowlog.explain import APPLICATION_NAME
    from pgslowlog.records import RawStatement

    enricher = Enricher("activity", "/bin/postgres", "main", False, 16)
    statement = RawStatement(
        start_unix_ns=1, duration_ns=2, pid=999_999_999, query="select 1", application_name="x"
    )
    event = enricher.enrich(statement)
    assert event is not None and event.fingerprint == fingerprint("select 2")
    from pgslowlog.explain import OWN_PIDS

    OWN_PIDS.add(999_999_998)  # an explain connection's backend
    try:
        own = RawStatement(start_unix_ns=1, duration_ns=2, pid=999_999_998, query="select 1")
        assert enricher.enrich(own) is None
    finally:
        OWN_PIDS.discard(999_999_998)
    assert enricher.own == 1
    # Dropped by pid: a client that takes the explain connections' name is still seen.
    named = RawStatement(
        start_unix_ns=1,
        duration_ns=2,
        pid=999_999_997,
        query="select 1",
        application_name=APPLICATION_NAME,
    )
    assert enricher.enrich(named) is not None


# --------------------------------------------------------------------------------
# The [explain] table


def config_with(explain: dict[str, object] | None) -> dict[str, object]:
    data: dict[str, object] = {
        "target": [{"binary": "/usr/lib/postgresql/15/bin/postgres"}],
        "sinks": {"file": {"path": "/tmp/x"}},
    }
    if explain is not None:
        data["explain"] = explain
    return data


def test_explain_is_on_when_its_table_is_present() -> None:
    from pgslowlog.config import parse_config

    assert not parse_config(config_with(None)).explaining
    config = parse_config(config_with({}))
    assert config.explaining and config.explain is not None
    assert (config.explain.user, config.explain.passfile) == ("pgslowlog", None)
    assert not parse_config(config_with({"enabled": False})).explaining


@pytest.mark.parametrize(
    ("explain", "message"),
    [
        (
            {"statement_timeout_ms": 2000},
            "explain.statement_timeout_ms = 2000 is not below timeout_ms = 2000: events would "
            "stop waiting before EXPLAIN does; lower statement_timeout_ms or raise timeout_ms",
        ),
        ({"lock_timeout_ms": 1500}, "explain.lock_timeout_ms = 1500 is above"),
        ({"passfile": "pgpass"}, "explain.passfile = 'pgpass' is not an absolute path"),
        ({"user": "a'b"}, 'explain.user = "a\'b" has a quote'),
        ({"user": ""}, "explain.user: expected `str` of length >= 1"),
        ({"password": "x"}, "unknown key explain.password"),
        ({"max_per_second": 0}, "explain.max_per_second: expected `float` > 0.0"),
    ],
)
def test_explain_mistakes_are_one_line_errors(explain: dict[str, object], message: str) -> None:
    from pgslowlog.config import parse_config
    from pgslowlog.errors import UserError

    with pytest.raises(UserError) as raised:
        parse_config(config_with(explain))
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_change_of_explain_waits_for_a_restart() -> None:
    from pgslowlog.config import parse_config
    from pgslowlog.live_config import needs_restart

    before, after = parse_config(config_with({})), parse_config(config_with({"user": "x"}))
    assert needs_restart(before, after) == ["explain"]


def test_check_says_when_explain_is_set_but_psycopg_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    from pgslowlog.config import parse_config
    from pgslowlog.preflight import explain_finding

    config = parse_config(config_with({}))
    assert explain_finding(config).ok
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg raises ImportError
    finding = explain_finding(config)
    assert not finding.ok
    assert "psycopg is missing; install the extra: pip install 'pgslowlog[explain]'" in str(finding)
    missing = parse_config(config_with({"passfile": "/nonexistent/pgpass"}))
    monkeypatch.delitem(sys.modules, "psycopg")
    assert "explain.passfile /nonexistent/pgpass is not readable" in str(explain_finding(missing))


# --------------------------------------------------------------------------------
# Finding a backend's server


def test_postmaster_pid_gives_the_socket_directory_and_port() -> None:
    from pgslowlog.explain.servers import Server, parse_postmaster_pid

    text = (
        "13818\n/d/data\n1796620032\n57543\n/run/postgresql\n127.0.0.1\n  2147437 524343\nready\n"
    )
    assert parse_postmaster_pid(text, 13818) == Server(13818, "/run/postgresql", 57543)
    no_socket = text.replace("/run/postgresql", "")
    assert parse_postmaster_pid(no_socket, 13818) == Server(13818, "127.0.0.1", 57543)
    assert parse_postmaster_pid(no_socket.replace("127.0.0.1", "*"), 13818).host == "127.0.0.1"
    with pytest.raises(ValueError, match="not this postmaster's"):
        parse_postmaster_pid(text, 4242)


def test_a_gone_backend_has_no_server() -> None:
    from pgslowlog.explain.servers import server_of

    with pytest.raises(ValueError, match="backend 999999999 exited before its server"):
        server_of(999_999_999)


# --------------------------------------------------------------------------------
# The Explainer against real servers: PostgreSQL 15 (Debian's) and 18 (the wheel's)

SETUP = (
    "create role pgslowlog login",
    "create role app login",
    "create database shop owner app",
    "create database locked",
    "revoke connect on database locked from public",
)
SHOP_SETUP = (
    "create table t (id int primary key, v int not null)",
    "insert into t select g, 0 from generate_series(1, 1000) g",
    "analyze t",
    "create table secret (a int)",
    "create table p (id int, v int) partition by range (id)",
    "create table p1 partition of p for values from (0) to (100)",
    "create table p2 partition of p for values from (100) to (200)",
    "grant select on p to pgslowlog",
    "grant select, update on t to pgslowlog",
    # planning folds immutable functions of constants: it runs them, as the explain role
    "create function slow_immutable() returns int immutable language plpgsql"
    " as $$ begin perform pg_sleep(5); return 1; end $$",
    "create function failing_immutable() returns int immutable language plpgsql as $$ begin"
    " raise exception E'secret line one\\nsecret line two' using detail = 'secret detail'; end $$",
    # which statements the explain connections send, in the server's log
    "alter system set log_line_prefix = '%m [%p] %a: '",
    "alter role pgslowlog set log_statement = 'all'",
    "select pg_reload_conf()",
)


class Served:
    """A server set up for explaining, and a live backend on `shop` for events' pid."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster
        cluster.psql(*SETUP, check=True)
        cluster.psql(*SHOP_SETUP, check=True, dsn=cluster.dsn("shop"))
        self.app = psycopg.connect(cluster.dsn("shop", "app"), autocommit=True)
        self.pid = self.app.info.backend_pid
        self.admin = psycopg.connect(cluster.dsn("shop"), autocommit=True)

    def event(self, query: str, **fields: Any) -> SlowQuery:
        return slow(
            **{"pid": self.pid, "database": "shop", "user": "app", "query": query, **fields}
        )

    def close(self) -> None:
        self.app.close()
        self.admin.close()


class Collected:
    """The dispatcher's side: what the Explainer hands on, batch by batch."""

    def __init__(self) -> None:
        self.batches: list[list[SlowQuery]] = []

    def dispatch_many(self, events: list[SlowQuery]) -> None:
        self.batches.append(list(events))

    @property
    def events(self) -> list[SlowQuery]:
        return [event for batch in self.batches for event in batch]


def explain_all(
    batches: list[list[SlowQuery]], **config: Any
) -> tuple[list[SlowQuery], dict[str, int]]:
    collected = Collected()
    explainer = Explainer(ExplainConfig(**config), collected).start()
    for batch in batches:
        explainer.dispatch_many(batch)
    stats = explainer.close()
    return collected.events, stats


@pytest.fixture(scope="module", params=SERVERS)
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    cluster = Cluster(bindir(request.param)).start()
    try:
        server = Served(cluster)
        yield server
        server.close()
    finally:
        cluster.stop()


def top_plan(event: SlowQuery) -> dict[str, Any]:
    assert event.plan is not None, event.plan_error
    plan: dict[str, Any] = event.plan[0]["Plan"]
    return plan


@pytest.mark.system
def test_a_select_with_constants_gets_a_generic_plan(served: Served) -> None:
    (event, plain), stats = explain_all(
        [[served.event("select * from t where id = 42"), served.event("select count(*) from t")]]
    )
    plan = top_plan(event)
    assert (plan["Node Type"], plan["Relation Name"]) == ("Index Scan", "t")
    assert plan["Index Cond"] == "(id = $1)"  # the redacted text's placeholder, not 42
    assert event.plan_error is None
    assert top_plan(plain)["Node Type"] == "Aggregate"
    assert stats["explained"] == 2


@pytest.mark.system
def test_a_generic_plan_shows_every_partition(served: Served) -> None:
    # with NULLs for $1, run-time pruning would have removed both and shown none
    (event,), _ = explain_all([[served.event("select * from p where id = 150")]])
    plan = top_plan(event)
    assert plan["Node Type"] == "Append"
    assert sorted(scan["Relation Name"] for scan in plan["Plans"]) == ["p1", "p2"]


@pytest.mark.system
def test_captured_values_give_a_custom_plan(served: Served) -> None:
    query = "select * from t where id = $1"
    (event, redacted), _ = explain_all(
        [
            [
                served.event(query, protocol="extended", params=["7"]),
                served.event(query + " ", protocol="extended", params=["\\x07"]),  # binary
            ]
        ],
        per_fingerprint_interval_s=0,
    )
    assert top_plan(event)["Index Cond"] == "(id = 7)"
    assert top_plan(redacted)["Index Cond"] == "(id = $1)"  # not sent back: generic


def server_statements(cluster: Cluster) -> list[str]:
    """What the explain connections sent, as log_statement = all logged it."""
    sent = []
    for line in cluster.logfile.read_text().splitlines():
        if f"{APPLICATION_NAME}: LOG:  " in line:
            message = line.split(f"{APPLICATION_NAME}: LOG:  ", 1)[1]
            sent.append(message.split(": ", 1)[1] if ": " in message else message)
    return sent


ALLOWED = (
    *("BEGIN READ ONLY", "SET LOCAL ", "EXPLAIN (FORMAT JSON) ", "PREPARE ", "DEALLOCATE "),
    "EXPLAIN (VERBOSE, FORMAT JSON) SELECT '",  # a blocker's relation named: see below
)


@pytest.mark.system
def test_an_update_is_planned_and_never_run(served: Served) -> None:
    before = served.admin.execute("select v, xmin::text from t where id = 7").fetchone()
    (event,), _ = explain_all([[served.event("update t set v = v + 1 where id = 7")]])
    plan = top_plan(event)
    assert (plan["Node Type"], plan["Operation"]) == ("ModifyTable", "Update")
    assert served.admin.execute("select v, xmin::text from t where id = 7").fetchone() == before
    sent = server_statements(served.cluster)
    # a generic plan: PREPARE's $n, planned for any value (NULLs given to EXECUTE)
    assert "PREPARE pgslowlog_explain AS update t set v = v + $1 where id = $2" in sent
    assert "EXPLAIN (FORMAT JSON) EXECUTE pgslowlog_explain(NULL, NULL)" in sent
    assert sent and all(s.startswith(ALLOWED) or s == "ROLLBACK" for s in sent), sent


@pytest.mark.system
def test_a_blocker_s_relation_is_named_by_explain_verbose_alone(served: Served) -> None:
    """blocked_by names a relation lock by oid; with [explain] the connection to the
    statement's database names it too: EXPLAIN (VERBOSE) shows a regclass constant by
    its name, and runs nothing."""
    row = served.admin.execute("select 't'::regclass::oid::bigint").fetchone()
    assert row is not None
    oid = row[0]
    lock = {"type": "relation", "database": 1, "relation": oid, "relation_name": None}
    blocker = {"pid": 1, "level": 1, "blocks": served.pid, "lock": lock}
    gone = {**blocker, "pid": 2, "lock": {**lock, "relation": 4_000_000_000}}  # no such
    xact = {**blocker, "pid": 3, "lock": {"type": "transactionid", "transactionid": 5}}
    (event,), stats = explain_all(
        [[served.event("vacuum t /* named */", blocked_by=[blocker, gone, xact])]]
    )
    assert event.blocked_by is not None
    assert [entry["lock"].get("relation_name") for entry in event.blocked_by] == ["t", None, None]
    assert event.plan_error == "not explained: VacuumStmt is not a plannable statement"
    assert stats["relations_named"] == 1
    sent = server_statements(served.cluster)
    assert f"EXPLAIN (VERBOSE, FORMAT JSON) SELECT '{oid}'::regclass, '4000000000'::regclass" in (
        sent
    )
    assert all(s.startswith(ALLOWED) or s == "ROLLBACK" for s in sent), sent


@pytest.mark.system
def test_what_cannot_be_planned_says_why(served: Served) -> None:
    (utility, denied, failing, slow_function), stats = explain_all(
        [
            [
                served.event("create table x (a int)"),
                served.event("select * from secret"),
                served.event("select failing_immutable()"),
                served.event("select slow_immutable()"),
            ]
        ],
        statement_timeout_ms=300,
    )
    assert utility.plan is None
    assert utility.plan_error == "not explained: CreateStmt is not a plannable statement"
    assert denied.plan_error == "42501: permission denied for table secret"
    # a function's error: its SQLSTATE and first line, never the rest
    assert failing.plan_error == "P0001: secret line one"
    assert slow_function.plan_error == "57014: canceling statement due to statement timeout"
    assert (stats["explained"], stats["failed"]) == (0, 3)


@pytest.mark.system
def test_explain_gives_up_behind_a_lock(served: Served) -> None:
    with psycopg.connect(served.cluster.dsn("shop")) as holder:
        holder.execute("lock table t in access exclusive mode")
        started = time.monotonic()
        (event,), _ = explain_all([[served.event("select * from t where id = 3")]])
        waited = time.monotonic() - started
        holder.rollback()
    assert event.plan_error == "55P03: canceling statement due to lock timeout"
    assert waited < 1.0  # lock_timeout_ms = 100, not the event's 2 s


@pytest.mark.system
def test_connection_failures_warn_once_per_cause(served: Served) -> None:
    with structlog.testing.capture_logs() as logs:
        events, _ = explain_all(
            [
                [
                    served.event("select 1 from t"),
                    served.event("select 2 from t limit 1"),
                ]
            ],
            user="nobody_here",
        )
        (other_database, locked), _ = explain_all(
            [
                [
                    served.event("select 3", database="nosuch"),
                    served.event("select 4", database="locked"),
                ]
            ]
        )
    assert [event.plan_error for event in events] == [
        'cannot connect as nobody_here: role "nobody_here" does not exist'
    ] * 2
    assert other_database.plan_error == (
        'cannot connect as pgslowlog: database "nosuch" does not exist'
    )
    assert locked.plan_error is not None
    assert "permission denied for database" in locked.plan_error
    warnings = [
        (entry["cause"], entry["database"]) for entry in logs if entry["log_level"] == "warning"
    ]
    # one per cause and explainer: the second event of the unknown role is not said again
    assert warnings == [("role", "shop"), ("database", "nosuch")], logs


@pytest.mark.system
def test_fingerprint_interval_rate_and_queue_bound_the_explains(served: Served) -> None:
    same = [served.event(f"select * from t where id = {n}") for n in range(3)]
    events, stats = explain_all([same])
    assert [top_plan(event)["Node Type"] for event in events] == ["Index Scan"] * 3
    assert (stats["explained"], stats["shared"]) == (1, 2)

    distinct = [served.event(f"select {n} from t where id = 1") for n in ("id", "v", "id, v")]
    events, stats = explain_all([distinct], max_per_second=1, per_fingerprint_interval_s=0)
    assert events[0].plan is not None
    assert [e.plan_error for e in events[1:]] == [
        "not explained: explain.max_per_second was reached"
    ] * 2

    events, stats = explain_all([distinct], queue_size=1, per_fingerprint_interval_s=0)
    assert [e.plan_error for e in events[1:]] == [
        "not explained: the explain queue was full (explain.queue_size)"
    ] * 2


@pytest.mark.system
def test_events_wait_at_most_the_timeout_and_keep_their_order(served: Served) -> None:
    first = [
        served.event("select slow_immutable()"),
        served.event("select slow_immutable() from t"),
    ]
    second = [served.event("vacuum t")]  # needs no plan, but comes after the first batch
    started = time.monotonic()
    events, stats = explain_all(
        [first, second], timeout_ms=400, statement_timeout_ms=300, lock_timeout_ms=100
    )
    assert time.monotonic() - started < 2
    assert [event.query for event in events] == [event.query for event in first + second]
    assert events[0].plan_error == "57014: canceling statement due to statement timeout"
    assert events[1].plan_error == "no plan within explain.timeout_ms (400 ms)"  # queued
    assert events[2].plan_error == "not explained: VacuumStmt is not a plannable statement"
    assert stats["timed_out"] == 1


@pytest.mark.system
def test_a_server_at_max_connections_costs_no_event() -> None:
    # 5 connections, 3 of them kept for superusers: Served's two sessions fill the rest
    cluster = Cluster(bindir("pg15"), max_connections=5).start()
    try:
        served = Served(cluster)
        with structlog.testing.capture_logs() as logs:
            (event,), _ = explain_all([[served.event("select * from t")]])
        served.close()
    finally:
        cluster.stop()
    assert event.plan_error is not None
    assert event.plan_error.startswith("cannot connect as pgslowlog: remaining connection slots")
    assert [entry["cause"] for entry in logs if entry["log_level"] == "warning"] == [
        "max_connections"
    ]


@pytest.mark.system
def test_password_from_a_passfile(served: Served, tmp_path: Path) -> None:
    hba = served.cluster.data / "pg_hba.conf"
    trusting = hba.read_text()
    served.admin.execute("alter role pgslowlog password 'right'")
    hba.write_text("local all pgslowlog scram-sha-256\n" + trusting)
    served.admin.execute("select pg_reload_conf()")
    try:
        results = {}
        for password in ("wrong", "right"):
            passfile = tmp_path / password
            passfile.write_text(f"*:*:*:pgslowlog:{password}\n")
            passfile.chmod(0o600)
            (results[password],), _ = explain_all(
                [[served.event("select * from t where id = 1")]], passfile=str(passfile)
            )
    finally:
        hba.write_text(trusting)
        served.admin.execute("select pg_reload_conf()")
    assert results["wrong"].plan_error == (
        'cannot connect as pgslowlog: password authentication failed for user "pgslowlog"'
    )
    assert top_plan(results["right"])["Node Type"] == "Index Scan"


@pytest.mark.system
def test_the_pipeline_holds_events_for_their_plans_and_loses_none(
    served: Served, tmp_path: Path
) -> None:
    """Collector, enricher, explainer, dispatcher: a fake source's statements of a real
    backend, stopped in the daemon's order (probes drained, then the explainer, then
    the sinks). The enricher reads the backend's real process title."""
    from test_supervisor import FakeSource, ListSink
    from test_supervisor import target as fake_target

    from pgslowlog.config import DaemonConfig
    from pgslowlog.dispatcher import Dispatcher
    from pgslowlog.probe_set import ProbeSet
    from pgslowlog.probes import ProbeDefinition
    from pgslowlog.records import RawStatement

    sink = ListSink()
    dispatcher = Dispatcher()
    dispatcher.add_sink("list", sink, 1000, 5.0)
    dispatcher.start()
    explainer = Explainer(ExplainConfig(), dispatcher).start()
    failures: list[str] = []
    probes = ProbeSet(explainer, DaemonConfig(), failures.append)
    opened: list[FakeSource] = []

    def open_fake(definition: ProbeDefinition, target: Any, daemon: Any) -> FakeSource:
        opened.append(FakeSource(definition, target))
        return opened[-1]

    try:
        probes.start(fake_target(tmp_path), [ProbeDefinition("fake", "fake", open_fake)])
        (source,) = opened
        source.emit("select v from t where id = 5 /* one */", pid=served.pid)
        source.emit("vacuum t /* two */", pid=served.pid)
        OWN_PIDS.add(999_999_998)  # an explain connection's backend: never reported
        with source.reader().lock:
            source.reader().records.append(
                RawStatement(
                    start_unix_ns=0,
                    duration_ns=300_000_000,
                    pid=999_999_998,
                    query="EXPLAIN (FORMAT JSON) select 1",
                    application_name=APPLICATION_NAME,
                )
            )
        source.emit("select count(*) from t /* three */", pid=served.pid)
    finally:
        probes.stop_all()  # its collector drains: the explain record is enriched by now
        OWN_PIDS.discard(999_999_998)
        stats = explainer.close()
        dispatcher.close()
        for fake in opened:
            fake.reader().close()
    assert not failures
    events = sink.events
    assert [event.query.rsplit("/* ", 1)[1] for event in events] == ["one */", "two */", "three */"]
    assert [(event.user, event.database) for event in events] == [("app", "shop")] * 3
    assert top_plan(events[0])["Node Type"] == "Index Scan"
    assert events[1].plan_error == "not explained: VacuumStmt is not a plannable statement"
    assert top_plan(events[2])["Node Type"] == "Aggregate"
    assert all(event.fingerprint for event in events)
    assert stats["explained"] == 2


# --------------------------------------------------------------------------------
# End to end through the daemon (root, real probes): run by the eBPF lane only

E2E_SETUP = (
    "create role pgslowlog login",
    "create table counter (id int primary key, n int not null)",
    "insert into counter values (1, 0)",
    "grant select, update on counter to pgslowlog",
)


@pytest.mark.ebpf
def test_daemon_plans_a_slow_update_that_ran_once(
    own_pg15: Callable[..., Cluster], start_daemon: Callable[..., Any]
) -> None:
    server = own_pg15(*E2E_SETUP)
    daemon = start_daemon(
        server,
        threshold_ms=0,  # every statement: the explain connection's own would show here
        probes=["activity"],
        target_pid=server.postmaster_pid,
        explain={"timeout_ms": 3000},
    )
    marker = "explain-e2e-update"
    # The connection stays open until the event is written: its backend names the
    # server (other clusters of this binary may run in the suite).
    with psycopg.connect(server.dsn(), autocommit=True) as connection:
        connection.execute(
            "update counter set n = n + 1 where id = 1 and pg_sleep(0.3) is not null"
            f" /* {marker} */"
        )
        daemon.wait_for_events(marker, 1)
    assert daemon.stop() == 0
    (event,) = daemon.events(marker)  # once: the explain connection's PREPARE is not here
    assert event["plan_error"] is None, event
    plan = event["plan"][0]["Plan"]
    assert (plan["Node Type"], plan["Operation"]) == ("ModifyTable", "Update")
    assert event["fingerprint"]
    assert server.psql("select n from counter", check=True).stdout.strip() == "1"  # ran once
    assert not [e for e in daemon.events() if e["application_name"] == APPLICATION_NAME]


@pytest.mark.ebpf
def test_daemon_jsonlog_plan_line_is_read_by_pgbadger(
    own_pg15: Callable[..., Cluster], start_daemon: Callable[..., Any], tmp_path: Path
) -> None:
    from test_pgbadger import pgbadger_json, slowest

    server = own_pg15(*E2E_SETUP)
    log = tmp_path / "log" / "slow.jsonlog"
    daemon = start_daemon(
        server,
        threshold_ms=200,
        probes=["activity"],
        target_pid=server.postmaster_pid,
        file_path=log,
        file_options={"format": "jsonlog"},
        explain={},
    )
    marker = "explain-e2e-jsonlog"

    def lines() -> list[str]:
        return (
            [line for line in log.read_text().splitlines() if marker in line]
            if log.exists()
            else []
        )

    with psycopg.connect(server.dsn(), autocommit=True) as connection:  # open: as above
        connection.execute(f"select n, pg_sleep(0.3) from counter where id = 1 /* {marker} */")
        connection.execute(f"vacuum counter /* {marker} */")  # fast: under the threshold
        wait_for_count(lines, 1, f"jsonlog lines with {marker!r}", 15)
    assert daemon.stop() == 0
    (line,) = [json.loads(text) for text in lines()]
    assert line["message"].startswith("duration: ")
    assert 'ms  plan:\n{\n  "Query Text": "select n, pg_sleep(0.3) from counter' in line["message"]
    # The redacted text's plan (an index or a sequential scan: the table has one row)
    assert 'Cond": "(id = $2)"' in line["message"] or '"Filter": "(id = $2)"' in line["message"]
    report = pgbadger_json(log, tmp_path)
    assert report["overall_stat"]["queries_number"] == 1
    ((_, query, database, _),) = slowest(report)
    assert '"Node Type": "' in query and "(id = $2)" in query and database == "postgres"


def test_run_refuses_explain_without_psycopg_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from pgslowlog.config import parse_config
    from pgslowlog.errors import UserError
    from pgslowlog.explain.start import explainer_for

    assert explainer_for(parse_config(config_with(None))) is None
    assert callable(explainer_for(parse_config(config_with({}))))
    monkeypatch.setitem(sys.modules, "psycopg", None)
    monkeypatch.delitem(sys.modules, "pgslowlog.explain.explainer")
    with pytest.raises(UserError, match=r"\[explain\] is set but psycopg is missing; pip install"):
        explainer_for(parse_config(config_with({})))


# 13 and 17 run chrooted (Debian 11 and 13 trees), which needs root: the root lane's,
# as in test_versions.py.
CHROOTED = pytest.mark.ebpf


@pytest.mark.system  # the servers .ci/bootstrap provides: wheels, Debian trees
@pytest.mark.parametrize(
    "major",
    [pytest.param(13, marks=CHROOTED), 14, 15, 16, pytest.param(17, marks=CHROOTED), 18],
)
def test_every_major_gets_generic_and_plain_plans(major: int) -> None:
    """13 and 17 run chrooted in a mount namespace of their own: their socket directory
    is reached through /proc/<postmaster>/root."""
    from test_versions import _start

    cluster = _start(major)
    try:
        served = Served(cluster)
        try:
            generic, plain, update = explain_all(
                [
                    [
                        served.event("select * from t where id = 5"),
                        served.event("select count(*) from t"),
                        served.event("update t set v = 1 where id = 5"),
                    ]
                ]
            )[0]
            row = served.admin.execute("select v from t where id = 5").fetchone()
        finally:
            served.close()
    finally:
        cluster.stop()
    assert top_plan(generic)["Index Cond"] == "(id = $1)"
    assert top_plan(plain)["Node Type"] == "Aggregate"
    assert top_plan(update)["Operation"] == "Update"
    assert row == (0,)  # planned, never run


@pytest.mark.system  # Debian's pgBadger
def test_real_plans_reach_pgbadger_once_each(served: Served, tmp_path: Path) -> None:
    from test_pgbadger import pgbadger_json, slowest

    from pgslowlog.jsonlog import jsonlog_lines

    events, _ = explain_all(
        [
            [
                served.event("select * from t where id = 42 /* planned */", duration_ms=900),
                served.event("update t set v = v + 1 where id = 7", duration_ms=650),
                served.event("vacuum t /* utility */", duration_ms=400),
            ]
        ]
    )
    log = tmp_path / "slow.jsonlog"
    log.write_bytes(jsonlog_lines(events))
    report = pgbadger_json(log, tmp_path)
    assert report["overall_stat"]["queries_number"] == 3
    (planned, *_), (update, *_), (utility, *_) = (row[1:] for row in slowest(report))
    assert '"Index Cond": "(id = $2)"' in update  # the only $n its plan shows
    # the event's text (redact_literals is off); the plan's, redacted: $1 kept whole
    assert '"Query Text": "select * from t where id = 42 /* planned */"' in planned
    assert '"Index Cond": "(id = $1)"' in planned
    assert utility == "vacuum t /* utility */;"


@pytest.mark.system
def test_a_short_connections_statement_finds_the_one_server_of_its_binary(
    served: Served, tmp_path: Path
) -> None:
    """The backend is gone when its event arrives: the one process running the event's
    binary is taken for its postmaster. Other clusters of the same binaries may run on
    this machine (another engineer's tests), so the "binary" here is a copy of sh of its
    own, whose postmaster.pid names the served cluster's socket and port. Like a real
    postmaster it has a child: a process of the binary without one (initdb's single-user
    postgres) is no server."""
    import shutil
    import subprocess

    from pgslowlog.sampled.procfs import children_of

    binary = tmp_path / "postgres"
    shutil.copy("/bin/sh", binary)
    data = tmp_path / "data"
    data.mkdir()
    # A session of its own: the kill at the end takes the sleep with it.
    postmaster = subprocess.Popen(
        [str(binary), "-c", "sleep 60 & wait"], cwd=data, start_new_session=True
    )
    try:
        wait_until(lambda: children_of(postmaster.pid), what="the sleep under the postmaster")
        cluster = served.cluster
        (data / "postmaster.pid").write_text(
            f"{postmaster.pid}\n{data}\n0\n{cluster.port}\n{cluster.base}\n127.0.0.1\n"
        )
        gone = 999_999_999  # the backend exited before the event reached the explainer
        (found, nowhere), _ = explain_all(
            [
                [
                    served.event("select * from t where id = 1", pid=gone, binary=str(binary)),
                    served.event("select v from t", pid=gone, binary="/nonexistent/postgres"),
                ]
            ]
        )
    finally:
        os.killpg(postmaster.pid, signal.SIGKILL)
        postmaster.wait()
    assert top_plan(found)["Node Type"] == "Index Scan"
    assert nowhere.plan_error == (
        f"not explained: backend {gone} exited before its server could be found, "
        "and 0 servers run /nonexistent/postgres"
    )


@pytest.mark.system
def test_a_thousand_events_in_forty_batches_arrive_once_each_in_order(served: Served) -> None:
    batches = [
        [
            served.event(
                f"select {n} as c{n} from t where id = 1" if n % 3 else f"vacuum t /* {n} */"
            )
            for n in range(start, start + 25)
        ]
        for start in range(0, 1000, 25)
    ]
    events, stats = explain_all(batches, max_per_second=20)
    assert [event.query for event in events] == [e.query for batch in batches for e in batch]
    assert all(event.plan is not None or event.plan_error for event in events)
    assert stats["explained"] >= 20  # a burst of max_per_second, then one each 50 ms
    assert stats["rate_limited"] + stats["explained"] + stats["not_plannable"] == 1000


@pytest.mark.system
def test_a_failure_after_prepare_leaves_nothing_for_the_next_explain(served: Served) -> None:
    # PREPARE only parses; planning at EXPLAIN EXECUTE runs the function, which fails
    (failed, planned), _ = explain_all(
        [
            [
                served.event("select failing_immutable() where 1 = 1"),
                served.event("select * from t where id = 9 and v = 0"),
            ]
        ]
    )
    assert failed.plan_error == "P0001: secret line one"
    assert top_plan(planned)["Node Type"] == "Index Scan"  # no "already exists"
    sent = server_statements(served.cluster)
    last_begin = max(i for i, s in enumerate(sent) if s == "BEGIN READ ONLY")
    assert sent[last_begin : last_begin + 5] == [
        "BEGIN READ ONLY",
        "SET LOCAL statement_timeout = 1000",
        "SET LOCAL lock_timeout = 100",
        "DEALLOCATE pgslowlog_explain",  # the failed one's, inside the read-only transaction
        "PREPARE pgslowlog_explain AS select * from t where id = $1 and v = $2",
    ]


@pytest.mark.ebpf  # needs root (a mount namespace), as the root lane does; no probe
def test_a_socket_in_a_tmp_hidden_from_the_daemon_is_reached_through_proc(served: Served) -> None:
    """systemd's PrivateTmp (the unit sets it) hides the host's /tmp from the daemon;
    the test servers' sockets are there. A process whose view has an empty directory
    where the socket is still finds the server, through /proc/<postmaster>/root, and
    connects. (Only the socket's directory is hidden, not all of /tmp: the checkout
    running this test, its venv included, may be under /tmp.)"""
    import subprocess
    import sys

    inner = (
        "import sys, psycopg; from pgslowlog.explain.servers import server_of; "
        "s = server_of(int(sys.argv[1])); print(s.host); "
        "c = psycopg.connect(host=s.host, port=s.port, user='postgres', dbname='shop'); "
        "print(c.execute('select 1').fetchone()[0])"
    )
    result = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            f'mount -t tmpfs none {served.cluster.base} && exec "$0" -c "{inner}" {served.pid}',
            sys.executable,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    host, one = result.stdout.split()
    postmaster = served.cluster.postmaster_pid
    assert host == f"/proc/{postmaster}/root{served.cluster.base}"
    assert one == "1"

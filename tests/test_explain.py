"""[explain]: what may be explained, the fingerprint, and plans from real servers.

Pure logic first (which texts are plannable, the fingerprint, finding a server's
socket). Then the Explainer against Debian's PostgreSQL 15 (the PREPARE path for
texts with $n) and the wheel's PostgreSQL 18: plans, errors, limits, delivery.
"""

from __future__ import annotations

import pytest

from pgslowlog.explain.statements import Plannable, fingerprint, plannable


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
        # a constant where only a literal may stand is no longer SQL once redacted
        ("select a::varchar(10) from t", "the redacted text does not parse"),
    ],
)
def test_unplannable_statements_say_why(text: str, reason: str) -> None:
    result = plannable(text)
    assert isinstance(result, str)
    assert result.startswith(f"not explained: {reason}")


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
    own = RawStatement(
        start_unix_ns=1, duration_ns=2, pid=1, query="select 1", application_name=APPLICATION_NAME
    )
    assert enricher.enrich(own) is None
    assert enricher.own == 1


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

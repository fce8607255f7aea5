"""[sinks.file] format = "jsonlog": PostgreSQL's own jsonlog lines, read by Debian's pgBadger.

The encoding is pure logic (first half); then Debian's pgBadger 12 reads lines made
here, and at the end a file the daemon wrote for a real PostgreSQL 15 that ran slow
statements of two users in two databases, both protocols and a failing one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
from events import slow
from waiting import wait_for_count

from pgslowlog.event import SlowQuery, json_lines
from pgslowlog.jsonlog import jsonlog_lines
from pgslowlog.machine import machine_findings
from pgslowlog.plugins.file_sink import FileSink, FileSinkOptions
from pgslowlog.testing.cluster import Cluster

PGBADGER = "/usr/bin/pgbadger"  # Debian's package `pgbadger` (12.0)


def line_of(event: SlowQuery) -> dict[str, Any]:
    encoded = jsonlog_lines([event])
    assert encoded.endswith(b"\n") and encoded.count(b"\n") == 1
    decoded: dict[str, Any] = json.loads(encoded)
    return decoded


def test_simple_statement_is_postgresqls_duration_line() -> None:
    event = slow(query_id=-8441324848661855122)
    assert list(line_of(event).items()) == [
        ("timestamp", "2026-12-03 15:34:51.478 UTC"),  # the end: start + 300.5 ms
        ("user", "alice"),
        ("dbname", "shop"),
        ("pid", 4242),
        ("remote_host", "10.1.2.3"),
        ("remote_port", 50312),
        ("error_severity", "LOG"),
        ("message", "duration: 300.500 ms  statement: select pg_sleep(0.3)"),
        ("application_name", "psql"),
        ("query_id", -8441324848661855122),
        ("id", event.id),  # pgslowlog's own, after PostgreSQL's keys: pgBadger ignores it
    ]


def test_timestamp_is_the_end_with_milliseconds_truncated() -> None:
    # PostgreSQL writes log_time with its milliseconds cut, not rounded
    assert line_of(slow(duration_ms=0.9))["timestamp"] == "2026-12-03 15:34:51.178 UTC"  # .1788
    late = slow(ts=datetime(2026, 12, 31, 23, 59, 59, 999_500, tzinfo=timezone.utc), duration_ms=1)
    assert line_of(late)["timestamp"] == "2027-01-01 00:00:00.000 UTC"


@pytest.mark.parametrize(
    ("name", "expected"), [(None, "execute <unnamed>"), ("_pg3_0", "execute _pg3_0")]
)
def test_extended_statement_is_an_execute_line(name: str | None, expected: str) -> None:
    event = slow(protocol="extended", statement_name=name, query="select pg_sleep($1)")
    assert line_of(event)["message"] == f"duration: 300.500 ms  {expected}: select pg_sleep($1)"


def test_unknown_protocol_is_a_statement_line() -> None:
    # the sampled definition does not tell the protocol
    assert line_of(slow(protocol=None))["message"].startswith("duration: 300.500 ms  statement: ")


def test_bound_values_are_postgresqls_parameters_detail() -> None:
    event = slow(protocol="extended", query="select $1, $2, $3", params=["0.3", "o'k", None])
    assert line_of(event)["detail"] == "parameters: $1 = '0.3', $2 = 'o''k', $3 = NULL"
    assert "detail" not in line_of(slow(protocol="extended", params=[]))
    assert "detail" not in line_of(slow())


@pytest.mark.parametrize(
    ("query", "detail"),
    [
        ("select $1 where $2 = $1", "parameters: $1 = $1, $2 = $2"),
        ("select $2", None),  # not $1..$n: no detail, whatever the numbers
        ("select $1 /* $99999 */", None),
        ("select 'US$ 5'", None),
    ],
)
def test_placeholders_without_values_map_to_themselves(query: str, detail: str | None) -> None:
    # pgBadger puts detail's values in place of $n, empty strings when there are none
    assert line_of(slow(protocol="extended", query=query)).get("detail") == detail


@pytest.mark.parametrize("outcome", ["error", "cancelled"])
def test_failed_statement_keeps_its_duration_line_and_outcome(outcome: str) -> None:
    line = line_of(slow(outcome=outcome))
    assert (line["error_severity"], line["outcome"]) == ("LOG", outcome)
    assert line["message"] == "duration: 300.500 ms  statement: select pg_sleep(0.3)"
    assert "outcome" not in line_of(slow())  # "ok" needs no key, as PostgreSQL's lines have none
    # Nor an outcome the definition could not tell (sampled without its failure uprobes).
    assert "outcome" not in line_of(slow(outcome="unknown"))


def test_redacted_constants_beyond_the_captured_values_map_to_themselves() -> None:
    # capture_params with redact_literals: constants are numbered after the bound values.
    line = line_of(
        slow(
            protocol="extended",
            query="select * from t where id = $1 limit $2",
            params=["<redacted>"],
        )
    )
    assert line["detail"] == "parameters: $1 = '<redacted>', $2 = $2"


def test_exited_backend_has_no_user_database_or_client_keys() -> None:
    line = line_of(slow(user=None, database=None, client=None, application_name=None))
    assert not {"user", "dbname", "remote_host", "remote_port", "application_name"} & set(line)
    assert "query_id" not in line  # not read by the definition: no key, never a made-up 0


def test_local_client_has_a_host_and_no_port() -> None:
    line = line_of(slow(client="[local]"))
    assert (line["remote_host"], "remote_port" in line) == ("[local]", False)


def test_truncated_text_is_marked() -> None:
    assert line_of(slow(query_truncated=True))["query_truncated"] is True
    assert "query_truncated" not in line_of(slow())


AWKWARD = "select '{\"a\":\"b\"}'::jsonb, 'it''s', e'\\\\' /* \"x\" */\n-- two\tlines\r\x01\x7f\x85"


def test_awkward_text_stays_one_line_exact_and_terminal_safe() -> None:
    encoded = jsonlog_lines(
        [slow(query=AWKWARD), slow(query=AWKWARD + '"}'), slow(query='select "a","b",', user='x",')]
    )
    assert encoded.count(b"\n") == 3
    for raw in encoded.splitlines():
        assert not any(byte < 0x20 or byte == 0x7F for byte in raw)
        assert b"\xc2\x85" not in raw  # C1 control, escaped as in json_lines
        # pgBadger ends a value at an escaped quote followed by "}", or by "," and the
        # closing quote: that "}" or "," is escaped instead
        assert b'\\"}' not in raw[:-2]
        assert b'\\","' not in raw
    first, second, third = (json.loads(raw) for raw in encoded.splitlines())
    assert first["message"] == "duration: 300.500 ms  statement: " + AWKWARD
    assert second["message"].endswith(AWKWARD + '"}')
    assert third["message"].endswith(' select "a","b",') and third["user"] == 'x",'


def test_batch_is_one_line_per_event_in_order() -> None:
    events = [slow(pid=n, query=f"select {n}") for n in range(100)]
    lines = jsonlog_lines(events).splitlines()
    assert [json.loads(line)["pid"] for line in lines] == list(range(100))


def test_file_sink_writes_jsonlog_only_when_asked(tmp_path: Path) -> None:
    events = [slow(), slow(pid=7)]
    for name, options, encode in (
        ("default", FileSinkOptions(path=str(tmp_path / "a")), json_lines),  # unchanged
        ("json", FileSinkOptions(path=str(tmp_path / "b"), format="json"), json_lines),
        ("jsonlog", FileSinkOptions(path=str(tmp_path / "c"), format="jsonlog"), jsonlog_lines),
    ):
        sink = FileSink(options)
        sink.write(events)
        sink.close()
        assert Path(options.path).read_bytes() == encode(events), name


def write_config(tmp_path: Path, binary: Path, file_options: str) -> Path:
    config = tmp_path / "pgslowlog.toml"
    config.write_text(
        f'[daemon]\nthreshold_ms = 200\n\n[[target]]\nbinary = "{binary}"\n\n'
        f'[sinks.file]\npath = "{tmp_path / "slow.jsonlog"}"\n{file_options}\n'
    )
    config.chmod(0o600)
    return config


def test_bad_format_is_a_one_line_config_error(tmp_path: Path, embedded_postgres: Path) -> None:
    config = write_config(tmp_path, embedded_postgres, 'format = "pgbadger"')
    result = subprocess.run(
        [sys.executable, "-m", "pgslowlog", "check", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    errors = [line for line in result.stdout.splitlines() if line.startswith("error: ")]
    # What the machine lacks for `run` (root, kernel headers: as this user sees it) is
    # said too; apart from that, the bad format is the one error.
    machine = {str(finding) for finding in machine_findings() if not finding.ok}
    assert [line for line in errors if line not in machine] == [
        f"error: config {config}: sinks.file: format = 'pgbadger' is not a format; use "
        '"json" or "jsonlog"; correct the value (see etc/pgslowlog.toml for every key)'
    ]


def pgbadger_json(log: Path, workdir: Path) -> dict[str, Any]:
    """pgBadger's figures for a jsonlog file, as its -x json report has them."""
    assert Path(PGBADGER).exists(), "pgBadger is missing: apt-get install -y pgbadger"
    out = workdir / "pgbadger.json"
    result = subprocess.run(
        [PGBADGER, "-q", "-f", "jsonlog", "-x", "json", "-o", str(out), str(log)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def pgbadger_html(log: Path, workdir: Path) -> str:
    """pgBadger's HTML report of a jsonlog file (kept as report.html in `workdir`)."""
    html = workdir / "report.html"
    result = subprocess.run(
        [PGBADGER, "-q", "-f", "jsonlog", "-o", str(html), str(log)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return html.read_text()


def slowest(report: dict[str, Any]) -> list[tuple[float, str, str | None, str | None]]:
    """(duration, query, database, user) of pgBadger's slowest queries, slowest first."""
    # pgBadger files everything under "postgres" unless asked for a report per database
    return [(float(row[0]), row[2], row[3], row[4]) for row in report["top_slowest"]["postgres"]]


JSONB = """select '{"a":"b"}'::jsonb where true"""


@pytest.mark.system  # Debian's pgBadger
def test_pgbadger_reads_the_lines_as_slow_queries(tmp_path: Path) -> None:
    """What pgBadger makes of each kind of line: counted, named, values put back in."""
    events = [
        slow(duration_ms=250, query="select pg_sleep(0.25) /* simple */"),
        slow(
            duration_ms=500,
            pid=4243,
            user="bob",
            database="crm",
            protocol="extended",
            query="select pg_sleep($1), $2::text /* bound */",
            params=["0.5", "o'k"],
        ),
        slow(duration_ms=900, pid=4244, query=JSONB, outcome="error", user=None),
        slow(duration_ms=700, pid=4245, database=None, outcome="cancelled", query="select 2"),
        slow(duration_ms=600, pid=4246, protocol="extended", query="select $1::int /* unbound */"),
    ]
    log = tmp_path / "slow.jsonlog"
    log.write_bytes(jsonlog_lines(events))
    report = pgbadger_json(log, tmp_path)
    assert report["overall_stat"]["queries_number"] == 5
    assert report["overall_stat"]["errors_number"] == 0  # no ERROR line is made up
    assert slowest(report) == [
        # the jsonb literal is whole; pgBadger shows the "}" as the \u007d it does not undo
        (900.0, 'select \'{"a":"b"\\u007d\'::jsonb where true;', "shop", None),
        (700.0, "select 2;", None, "alice"),
        (600.0, "select $1::int /* unbound */;", "shop", "alice"),  # not "select ::int"
        (500.0, "select pg_sleep('0.5'), 'o''k'::text /* bound */;", "crm", "bob"),
        (250.0, "select pg_sleep(0.25) /* simple */;", "shop", "alice"),
    ]
    # an exited backend's user or database is pgBadger's "unknown"
    assert sorted(report["user_info"]["postgres"]) == ["alice", "bob", "unknown"]
    assert sorted(report["database_info"]["postgres"]) == ["crm", "shop", "unknown"]


# ---------------------------------------------------------------------------------
# End to end: a real PostgreSQL 15, the daemon, the file, pgBadger's JSON and HTML.

THRESHOLD_MS = 200
MARKER = "pgbadger-e2e"


@pytest.fixture
def pg15_of_alice_and_bob(own_pg15: Callable[..., Cluster]) -> Cluster:
    return own_pg15(
        "create role alice login",
        "create database shop owner alice",
        "create role bob login",
        "create database crm owner bob",
    )


def jsonlog_events(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    return [line for line in lines if MARKER in line["message"]]


def run_workload(server: Cluster) -> list[tuple[str, str, str, str]]:
    """Slow statements of two users in two databases: (user, database, protocol, text)."""
    ran = []
    for user, database, seconds in (("alice", "shop", 0.25), ("bob", "crm", 0.3)):
        text = f"select pg_sleep({seconds}) /* {MARKER} simple {user} */"
        server.psql(text, check=True, dsn=server.dsn(database, user))
        ran.append((user, database, "simple", text))
    top = f"select pg_sleep(0.6) /* {MARKER} top */"
    server.psql(top, check=True, dsn=server.dsn("shop", "bob"))
    ran.append(("bob", "shop", "simple", top))
    with psycopg.connect(server.dsn("shop", "alice"), autocommit=True) as connection:
        connection.execute(f"select pg_sleep(%s) /* {MARKER} unnamed */", (0.35,))
        ran.append(("alice", "shop", "extended", f"select pg_sleep($1) /* {MARKER} unnamed */"))
    with psycopg.connect(server.dsn("crm", "bob"), autocommit=True) as connection:
        for _ in range(2):
            text = f"select pg_sleep(%s) /* {MARKER} prepared */"
            connection.execute(text, (0.25,), prepare=True)
            ran.append(("bob", "crm", "extended", text.replace("%s", "$1")))
    failing = f"select 1/(pg_sleep(0.3) is null)::int /* {MARKER} failing */"
    result = server.psql(failing, dsn=server.dsn("crm", "alice"))
    assert "division by zero" in result.stderr
    ran.append(("alice", "crm", "simple", failing))
    return ran


@pytest.mark.ebpf
def test_pgbadger_reports_what_ran(
    pg15_of_alice_and_bob: Cluster, start_daemon: Callable[..., Any], tmp_path: Path
) -> None:
    log = tmp_path / "log" / "slow.jsonlog"
    daemon = start_daemon(
        pg15_of_alice_and_bob,
        threshold_ms=THRESHOLD_MS,
        probes=["activity"],  # it tells the protocols apart, so pgBadger gets execute lines
        target_pid=pg15_of_alice_and_bob.postmaster_pid,
        file_path=log,
        file_options={"format": "jsonlog"},
    )
    ran = run_workload(pg15_of_alice_and_bob)
    wait_for_count(lambda: jsonlog_events(log), len(ran), f"jsonlog lines with {MARKER!r}", 15)
    assert daemon.stop() == 0  # drained: a duplicate on its way is in the file now
    lines = jsonlog_events(log)
    assert len(lines) == len(ran)  # each once
    by_text = {line["message"].split(": ", 2)[2]: line for line in lines}
    for user, database, protocol, text in ran:
        line = by_text[text]
        assert (line["user"], line["dbname"], line["error_severity"]) == (user, database, "LOG")
        action = "statement" if protocol == "simple" else "execute <unnamed>"
        assert line["message"].split(": ", 2)[1].endswith(f"ms  {action}")
    assert [line["outcome"] for line in lines if "outcome" in line] == ["error"]

    report = pgbadger_json(log, tmp_path)
    assert report["overall_stat"]["queries_number"] == len(ran)
    # every statement with its text as it ran, placeholders included
    assert sorted(query for _, query, _, _ in slowest(report)) == sorted(f"{t};" for *_, t in ran)
    top_duration, top_query, top_database, top_user = slowest(report)[0]
    assert (top_query, top_database, top_user) == (f"{ran[2][3]};", "shop", "bob")
    assert 600 <= top_duration < 700
    users = {user for user, *_ in ran}
    databases = {database for _, database, *_ in ran}
    assert set(report["user_info"]["postgres"]) == users
    assert set(report["database_info"]["postgres"]) == databases
    for user in users:
        ran_by = sum(1 for who, *_ in ran if who == user)
        assert report["user_info"]["postgres"][user]["count"] == ran_by
    assert report["overall_stat"]["errors_number"] == 0
    assert set(report["host_info"]["postgres"]) == {"127.0.0.1"}

    assert f"{MARKER} top" in pgbadger_html(log, tmp_path)
    if keep := os.environ.get("PGSLOWLOG_KEEP_PGBADGER"):  # to look at it in a browser
        shutil.copytree(tmp_path, keep, dirs_exist_ok=True)


def test_log_time_rounds_through_the_float_exactly() -> None:
    # every microsecond of a second at today's epoch comes back as itself
    base = datetime(2026, 12, 3, 15, 34, 51, tzinfo=timezone.utc)
    for us in range(0, 1_000_000, 997):
        start = base + timedelta(microseconds=us)
        expected = f"{start:%Y-%m-%d %H:%M:%S}.{us // 1000:03d} UTC"
        assert line_of(slow(ts=start, duration_ms=0))["timestamp"] == expected


# ---------------------------------------------------------------------------------
# [explain]: an event with its plan is auto_explain's line (log_format = json)

PLAN = [
    {
        "Plan": {
            "Node Type": "Index Scan",
            "Index Name": "t_pkey",
            "Relation Name": "t",
            "Startup Cost": 0.28,
            "Total Cost": 8.29,
            "Index Cond": "(id = $1)",
        }
    }
]


def test_a_planned_statement_is_auto_explains_json_line() -> None:
    event = slow(query="select * from t where id = $1", plan=PLAN, fingerprint="0a42922fab0bd73f")
    line = line_of(event)
    head, plan = line["message"].split("\n", 1)
    assert head == "duration: 300.500 ms  plan:"
    # as auto_explain writes it: one object, "Query Text" first, indented by two
    assert json.loads(plan) == {"Query Text": "select * from t where id = $1", **PLAN[0]}
    assert plan.startswith('{\n  "Query Text": "select * from t where id = $1",\n  "Plan": {\n')
    assert "plan_error" not in line
    # $n map to themselves: pgBadger would put values (or empty strings) into the plan
    bound = slow(protocol="extended", query="select $1", params=["7"], plan=PLAN)
    assert line_of(bound)["detail"] == line["detail"] == "parameters: $1 = $1"
    # the plan's $n too, where the event's text has its constants (redact_literals off)
    assert line_of(slow(query="select * from t where id = 42", plan=PLAN))["detail"] == (
        "parameters: $1 = $1"
    )
    # a plan shows only the $n its nodes use: gaps are usual
    gap = [{"Plan": {"Node Type": "Index Scan", "Index Cond": "(id = $2)"}}]
    assert line_of(slow(query="update t set v = v + 1 where id = 7", plan=gap))["detail"] == (
        "parameters: $1 = $1, $2 = $2"
    )
    assert "detail" not in line_of(slow(query="select 1 /* $99999 */", plan=gap))


def test_a_statement_without_its_plan_says_why() -> None:
    line = line_of(slow(query="vacuum t", plan_error="not explained: VacuumStmt is not ..."))
    assert line["message"] == "duration: 300.500 ms  statement: vacuum t"
    assert line["plan_error"] == "not explained: VacuumStmt is not ..."


@pytest.mark.system  # Debian's pgBadger
def test_pgbadger_counts_a_planned_statement_once_and_shows_its_plan(tmp_path: Path) -> None:
    """pgBadger 12 reads auto_explain's JSON lines in jsonlog as the statement's text:
    the report shows the query text and the plan together, as it does for
    PostgreSQL's own auto_explain lines (log_destination = jsonlog)."""
    events = [
        slow(duration_ms=700, query="select * from t where id = $1 /* planned */", plan=PLAN),
        slow(duration_ms=300, pid=4244, query="vacuum t", plan_error="not explained: ..."),
    ]
    log = tmp_path / "slow.jsonlog"
    log.write_bytes(jsonlog_lines(events))
    report = pgbadger_json(log, tmp_path)
    assert report["overall_stat"]["queries_number"] == 2  # once each
    (planned, *_), (utility, *_) = (row[1:] for row in slowest(report))
    assert '"Query Text": "select * from t where id = $1 /* planned */"' in planned
    assert '"Node Type": "Index Scan"' in planned and '"Index Cond": "(id = $1)"' in planned
    assert utility == "vacuum t;"
    assert "Index Scan" in pgbadger_html(log, tmp_path)

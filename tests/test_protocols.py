"""Every client against every build and probe definition that supports its protocol.

Builds: Debian PostgreSQL 15 (stripped, USDT), PyPI PostgreSQL 18 (symbols, -O2) and
PostgreSQL 15 at -O0 (exec_*_message kept). Each slow statement must be seen exactly
once, with its text, duration, protocol and outcome, and with capture_params its
parameter values.
"""

from __future__ import annotations

import asyncio
import struct
import subprocess

import asyncpg
import psycopg
import pytest

pytestmark = pytest.mark.ebpf

SLEEP = 0.05  # seconds; the threshold is 25 ms
PGBENCH = "/usr/lib/postgresql/15/bin/pgbench"
PGBENCH_RUNS = 3

# (build fixture, definition): which protocols the definition sees
COMBINATIONS = {
    ("pg15", "activity"): {"simple", "extended"},
    ("pg15", "usdt"): {"simple"},
    ("pg18", "activity"): {"simple", "extended"},
    ("pg18", "simple_query"): {"simple"},
    ("pg15_O0", "extended"): {"simple", "extended"},
    ("pg15_O0", "activity"): {"simple", "extended"},
    ("pg15_O0", "simple_query"): {"simple"},
}


def run_psql(server, marker):
    server.psql(f"select pg_sleep({SLEEP}) /* {marker} */", check=True)
    return [dict(query=f"select pg_sleep({SLEEP}) /* {marker} */", protocol="simple")]


FLOAT8 = "\\x" + struct.pack(">d", SLEEP).hex()  # how psycopg 3 and asyncpg send a float


def run_psycopg(server, marker):
    with psycopg.connect(server.dsn(), autocommit=True) as connection:
        connection.execute(f"select pg_sleep(%s) /* {marker} */", (SLEEP,))
        connection.execute(f"select pg_sleep(%s::text::float8) /* {marker} */", (str(SLEEP),))
    text = f"select pg_sleep($1) /* {marker} */"
    as_text = f"select pg_sleep($1::text::float8) /* {marker} */"
    return [
        dict(query=text, protocol="extended", params=[FLOAT8]),
        dict(query=as_text, protocol="extended", params=[str(SLEEP)]),
    ]


def run_psycopg_prepared(server, marker):
    with psycopg.connect(server.dsn(), autocommit=True) as connection:
        for _ in range(2):
            connection.execute(f"select pg_sleep(%s) /* {marker} */", (SLEEP,), prepare=True)
    text = f"select pg_sleep($1) /* {marker} */"
    return [dict(query=text, protocol="extended", params=[FLOAT8], named=True)] * 2


def run_asyncpg(server, marker):
    async def work() -> None:
        connection = await asyncpg.connect(
            host="127.0.0.1", port=server.port, user="postgres", database="postgres"
        )
        try:
            await connection.fetchval(f"select pg_sleep($1) /* {marker} */", SLEEP)
        finally:
            await connection.close()

    asyncio.run(work())
    text = f"select pg_sleep($1) /* {marker} */"
    return [dict(query=text, protocol="extended", params=[FLOAT8], named=True)]


def pgbench(mode):
    def run(server, marker):
        script = server.base / f"{marker}.sql"
        script.write_text(f"select pg_sleep({SLEEP}) /* {marker} */;\n")
        subprocess.run(
            [PGBENCH, "-n", "-M", mode, "-t", str(PGBENCH_RUNS), "-f", str(script), server.dsn()],
            check=True,
            capture_output=True,
        )
        protocol = "simple" if mode == "simple" else "extended"
        # pgbench sends the script's line as it is, semicolon included, in every mode
        text = f"select pg_sleep({SLEEP}) /* {marker} */;"
        expected = dict(query=text, protocol=protocol)
        if mode == "prepared":
            expected["named"] = True
        return [expected] * PGBENCH_RUNS

    return run


CLIENTS = {
    "psql": ("simple", run_psql),
    "psycopg": ("extended", run_psycopg),
    "psycopg-prepared": ("extended", run_psycopg_prepared),
    "asyncpg": ("extended", run_asyncpg),
    "pgbench-simple": ("simple", pgbench("simple")),
    "pgbench-extended": ("extended", pgbench("extended")),
    "pgbench-prepared": ("extended", pgbench("prepared")),
}


@pytest.mark.parametrize(("build", "definition"), sorted(COMBINATIONS))
def test_clients_by_build_and_definition(request, start_daemon, build, definition):
    server = request.getfixturevalue(build)
    daemon = start_daemon(server, threshold_ms=25, probes=[definition], capture_params=True)
    expected = {}
    for client, (protocol, run) in CLIENTS.items():
        if protocol in COMBINATIONS[(build, definition)]:
            expected[client] = run(server, f"{client} via {definition} on {build}")
    assert daemon.stop() == 0
    for client, statements in expected.items():
        seen = daemon.events(f"{client} via {definition} on {build}")
        assert len(seen) == len(statements), (client, seen)
        for event, want in zip(seen, statements, strict=True):
            assert event["query"] == want["query"], client
            assert event["protocol"] == want["protocol"], (client, event)
            assert event["outcome"] == "ok"
            assert SLEEP * 1000 - 1 < event["duration_ms"] < SLEEP * 1000 + 40, (client, event)
            assert event["probe"] == definition
            if definition != "extended":
                # only the extended definition sees Bind messages
                assert event["params"] is None and event["statement_name"] is None
                continue
            if "params" in want:
                assert event["params"] == want["params"], (client, event)
            if want.get("named"):
                assert event["statement_name"], (client, event)
            elif want["protocol"] == "extended":
                assert event["statement_name"] is None, (client, event)


def test_params_are_not_captured_unless_asked(pg15_O0, start_daemon):
    daemon = start_daemon(pg15_O0, threshold_ms=25, probes=["extended"])
    with psycopg.connect(pg15_O0.dsn(), autocommit=True) as connection:
        connection.execute("select pg_sleep(%s) /* no capture */", (SLEEP,), prepare=True)
    (event,) = daemon.wait_for_events("no capture", 1)
    assert event["params"] is None
    assert event["statement_name"].startswith("_pg3_")
    assert event["protocol"] == "extended"


def test_two_targets_at_once_name_their_events(pg15, pg18, start_daemon):
    daemon = start_daemon(
        pg18,
        threshold_ms=25,
        target_name="pypi18",
        extra_targets=[{"name": "debian15", "binary": str(pg15.postgres)}],
    )
    pg15.psql(f"select pg_sleep({SLEEP}) /* two targets */", check=True)
    pg18.psql(f"select pg_sleep({SLEEP}) /* two targets */", check=True)
    daemon.wait_for_events("two targets", 2)
    assert daemon.stop() == 0  # drained: counted once nothing more can come
    assert sorted((e["target"], e["binary"]) for e in daemon.events("two targets")) == [
        ("debian15", str(pg15.postgres)),
        ("pypi18", str(pg18.postgres)),
    ]


def test_redact_literals_before_any_sink(pg15_O0, start_daemon):
    """Literals in the text and bound values never reach a sink with redact_literals."""
    daemon = start_daemon(
        pg15_O0, threshold_ms=25, probes=["extended"], capture_params=True, redact_literals=True
    )
    with psycopg.connect(pg15_O0.dsn(), autocommit=True) as connection:
        connection.execute(
            "select pg_sleep(0.05), 'alice@example.com', 4111111111111111 /* redact simple */",
            prepare=False,
        )
        connection.execute(
            "select pg_sleep(%s), %s::text, 'bob' /* redact extended */",
            (SLEEP, "carol@example.com"),
            prepare=True,
        )
    assert daemon.stop() == 0
    (simple,) = daemon.events("redact simple")
    assert simple["query"] == "select pg_sleep($1), $2, $3 /* redact simple */"
    (extended,) = daemon.events("redact extended")
    assert extended["query"] == "select pg_sleep($1), $2::text, $3 /* redact extended */"
    assert extended["params"] == ["<redacted>", "<redacted>"]
    everything = daemon.log.read_text()
    for secret in ("alice@example.com", "4111111111111111", "carol@example.com", "bob"):
        assert secret not in everything

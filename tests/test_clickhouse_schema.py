"""The clickhouse sink's parts that need no server: the tables it writes, an event as
a row, the spool, event ids. The modern DDL and the docs' queries run on chdb
(ClickHouse embedded); tests/test_clickhouse.py runs the rest on Debian's 18.16."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from events import slow

from pgslowlog.event import SlowQuery, new_event_id
from pgslowlog.plugins.clickhouse_schema import LAYOUTS, ddl, layout_of, mismatches, rows
from pgslowlog.plugins.clickhouse_spool import Spool, SpoolInUse

DOCS = Path(__file__).parent.parent / "docs" / "clickhouse.md"


def doc_queries() -> list[str]:
    """The SELECTs of docs/clickhouse.md: the questions a DBA asks across a fleet."""
    blocks = re.findall(r"```sql\n(.*?)```", DOCS.read_text(), re.S)
    assert len(blocks) == 3, blocks
    return blocks


def full_event(**fields: Any) -> SlowQuery:
    """An event with every field set, as a sampled statement with a plan has it."""
    now = datetime(2026, 12, 3, 15, 34, 51, 177900, tzinfo=timezone.utc)
    return slow(
        **{
            "ts": now,
            "host": "db1",
            "waits": {"CPU": 3, "Lock:transactionid": 2},
            "resources": {"shared_blks_hit": 5.0, "cpu_ms": None},
            "resources_exact": False,
            "blocked_by": [{"pid": 7, "query": "update t set v = 1"}],
            "lock_wait_start": now + timedelta(milliseconds=5),
            "plan": [{"Plan": {"Node Type": "Seq Scan"}}],
            "params": ["1", None],
            "fingerprint": "abc",
            "container": "docker://x",
            **fields,
        }
    )


def test_event_ids_are_uuid7_sorted_by_time_and_unique() -> None:
    ids = [new_event_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    parsed = [uuid.UUID(i) for i in ids]
    assert {(u.version, u.variant) for u in parsed} == {(7, uuid.RFC_4122)}
    # The first 48 bits are milliseconds: sorted, and now.
    millis = [u.int >> 80 for u in parsed]
    assert millis == sorted(millis)
    assert abs(millis[-1] / 1000 - datetime.now().timestamp()) < 5
    assert slow().id != slow().id  # each event its own


def test_every_sink_s_json_carries_the_id_and_host() -> None:
    event = full_event()
    decoded = json.loads(event.to_json())
    assert (decoded["id"], decoded["host"]) == (event.id, "db1")


def test_rows_name_every_column_of_each_layout_and_leave_out_nulls() -> None:
    event = full_event(user=None)
    legacy = json.loads(rows("legacy", [event]))
    assert "user" not in legacy  # NULL in the table: 18.16 reads no null in JSONEachRow
    known = {c.name for c in LAYOUTS["legacy"] if c.value(event) is not None}
    assert set(legacy) == known and {"id", "host", "target", "ts_us"} <= known
    assert (legacy["ts"], legacy["ts_us"]) == ("2026-12-03 15:34:51", 177900)
    assert (legacy["waits.name"], legacy["waits.looks"]) == (["CPU", "Lock:transactionid"], [3, 2])
    # A figure not known is left out of the arrays, not written as 0.
    assert (legacy["resources.name"], legacy["resources.value"]) == (["shared_blks_hit"], [5.0])
    assert json.loads(legacy["blocked_by"]) == event.blocked_by
    modern = json.loads(rows("modern", [event]))
    assert modern["ts"] == "2026-12-03 15:34:51.177900"
    assert modern["resources"] == {"shared_blks_hit": 5.0, "cpu_ms": None}
    assert modern["plan"] == {"Plan": {"Node Type": "Seq Scan"}}


def test_a_table_of_other_columns_is_named_column_by_column() -> None:
    columns = {c.name: c.type for c in LAYOUTS["legacy"]}
    assert layout_of(columns) == "legacy" and mismatches("legacy", columns) == []
    columns["duration_ms"] = "String"
    del columns["host"]
    assert mismatches("legacy", columns) == [
        "column host is missing (pgslowlog writes String)",
        "column duration_ms is String, pgslowlog writes Float64",
    ]
    assert layout_of({"ts": "DateTime64(6, 'UTC')"}) == "modern"


def test_schema_command_prints_statements_each_ending_in_a_semicolon() -> None:
    def schema(*arguments: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "pgslowlog", "schema", "clickhouse", *arguments]
        return subprocess.run(command, capture_output=True, text=True, check=False)

    single = schema().stdout
    assert single.count(";\n") == 2 and "Distributed" not in single
    sharded = schema("--cluster", "fleet", "--table", "logs.slow").stdout
    assert "CREATE TABLE IF NOT EXISTS logs.slow_local (" in sharded
    assert "ENGINE = Distributed(fleet, logs, slow_local, cityHash64(toString(id)))" in sharded
    refused = schema("--table", "a;drop table x")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and "not a ClickHouse name" in refused.stderr


def test_the_modern_table_and_the_docs_questions_on_today_s_clickhouse(tmp_path: Path) -> None:
    """chdb is today's ClickHouse, embedded: the --modern DDL makes a table the sink
    would write (layout modern, no mismatch), its rows go in, a row sent twice is one
    with FINAL, and the docs' three questions answer."""
    chdb_session = pytest.importorskip("chdb.session", reason="chdb-core: the test extra")
    session = chdb_session.Session(str(tmp_path / "chdb"))
    try:
        for statement in ddl(modern=True).split(";\n"):
            if statement.strip():
                session.query(statement)
        described = session.query("DESCRIBE TABLE pgslowlog.slow_queries", "JSONEachRow")
        columns = {
            (column := json.loads(line))["name"]: column["type"]
            for line in described.bytes().decode().splitlines()
        }
        assert layout_of(columns) == "modern" and mismatches("modern", columns) == []
        now = datetime.now(timezone.utc)
        events = [
            full_event(ts=now - timedelta(hours=n), duration_ms=100.0 + n, host=f"db{n % 3}")
            for n in range(30)
        ]
        for batch in (events, events[:10]):  # the first ten sent twice
            data = rows("modern", batch).decode()
            session.query(f"INSERT INTO pgslowlog.slow_queries FORMAT JSONEachRow {data}")

        def answer(sql: str) -> list[list[Any]]:
            result = session.query(sql, "JSONCompactEachRow").bytes().decode()
            return [json.loads(line) for line in result.splitlines()]

        assert answer("SELECT count() FROM pgslowlog.slow_queries FINAL") == [[30]]
        slowest, slower, blocking = doc_queries()
        ((fingerprint, example, calls, total, p95, hosts),) = answer(slowest)
        assert (fingerprint, example, calls, hosts) == ("abc", events[0].query, 30, 3)
        assert total == round(sum(e.duration_ms for e in events))
        assert 126 <= p95 <= 129
        assert sorted(answer(blocking)) == [
            [f"db{h}", 10, round(sum(e.duration_ms for e in events if e.host == f"db{h}"))]
            for h in range(3)
        ]
        # Tuesday's deploy: one statement three times as slow after it, one the same.
        deploy = datetime(2026, 12, 1, 12, tzinfo=timezone.utc)
        around = [
            full_event(ts=deploy + timedelta(hours=hours), duration_ms=ms, fingerprint=name)
            for name, before_ms, after_ms in (("slower", 100.0, 400.0), ("same", 100.0, 100.0))
            for hours, ms in ((-30, before_ms), (-20, before_ms), (20, after_ms), (30, after_ms))
        ]
        data = rows("modern", around).decode()
        session.query(f"INSERT INTO pgslowlog.slow_queries FORMAT JSONEachRow {data}")
        assert [row[:1] + row[2:] for row in answer(slower)] == [
            ["slower", 100, 400, 2],
            ["same", 100, 100, 2],
        ]
    finally:
        session.close()


def test_the_spool_keeps_batches_in_order_across_a_restart_and_drops_the_oldest(
    tmp_path: Path,
) -> None:
    batches = [[slow(query=f"select {n}.{i}") for i in range(n + 1)] for n in range(5)]
    spool = Spool(tmp_path / "spool", max_bytes=10**6)
    for batch in batches[:3]:
        spool.append(batch)
    with pytest.raises(SpoolInUse, match="give each daemon on a machine a spool_dir"):
        Spool(tmp_path / "spool", max_bytes=10**6)  # a second daemon on the same directory
    spool.close()
    (tmp_path / "spool" / "000000000009-1.jsonl.tmp").write_text("half a batch")
    (tmp_path / "spool" / "notes.txt").write_text("not ours")
    again = Spool(tmp_path / "spool", max_bytes=10**6)  # the next start
    assert again.events == 1 + 2 + 3 and not list((tmp_path / "spool").glob("*.tmp"))
    assert (tmp_path / "spool" / "notes.txt").exists()
    (first,) = again.take_oldest(1)
    assert first.read() == batches[0]
    again.remove(first)
    again.append(batches[3])
    order = []
    while again:
        (oldest,) = again.take_oldest(1)
        order.append([e.query for e in oldest.read()])
        again.remove(oldest)
    assert order == [[e.query for e in b] for b in (batches[1], batches[2], batches[3])]
    # Sent in one go: the oldest batches that hold max_events at most, one at least.
    for batch in batches:
        again.append(batch)
    taken = again.take_oldest(6)
    assert [b.events for b in taken] == [1, 2, 3]
    for batch in taken:  # not sent: given back, one by one, the caller's list intact
        again.give_back(batch)
    assert len(taken) == 3
    assert [b.events for b in again.take_oldest(0)] == [1]
    while again:
        again.remove(again.take_oldest(100)[0])
    assert list((tmp_path / "spool").glob("*.jsonl")) == []
    again.close()


def test_a_full_spool_drops_the_oldest_but_never_the_batch_being_sent(tmp_path: Path) -> None:
    batches = [[slow(query=f"select {n}.{i}") for i in range(n + 1)] for n in range(5)]
    small = Spool(tmp_path / "small", max_bytes=len(slow().to_json()) * 6)
    small.append(batches[0])
    (sending,) = small.take_oldest(10)
    for batch in batches[1:]:
        small.append(batch)
    # Kept: the batch being sent (1 event) and the newest (5); 2 + 3 + 4 dropped.
    assert (small.events, small.dropped) == (1 + 5, 2 + 3 + 4)
    assert sending.read() == batches[0]
    small.remove(sending)
    small.remove(sending)  # twice: nothing happens
    assert small.events == 5
    small.close()


def test_a_spooled_file_shorter_than_its_name_says_is_unreadable(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=10**6)
    spool.append([slow(), slow()])
    (batch,) = spool.take_oldest(1)
    batch.path.write_bytes(slow().to_json() + b"\n")  # a power loss, a hand's edit
    with pytest.raises(ValueError, match="holds 1 events, not 2"):
        batch.read()
    spool.close()

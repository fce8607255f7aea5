"""The ClickHouse tables the clickhouse sink writes, and an event as a row of them.

Two layouts, one per column list below:
- `legacy`, for ClickHouse 18.16 (Debian 12's `clickhouse-server`) and every later
  one: no DateTime64, Map, JSON or TTL there. The start is `ts` (DateTime, UTC) plus
  `ts_us`; `waits` and `resources` are Nested columns (parallel arrays); `blocked_by`,
  `params` and `plan` are JSON text.
- `modern` (`pgslowlog schema clickhouse --modern`), for today's ClickHouse: DateTime64,
  Map, JSON, LowCardinality and a TTL.

Both are ReplacingMergeTree tables whose sorting key ends in the event's `id`: a batch
sent again after a timeout (it may have landed) leaves one row per event once parts
merge, and queries that must count exactly use FINAL. Rows are partitioned by day, so
retention drops whole days (docs/clickhouse.md). On a cluster, a Distributed table
shards by cityHash64(toString(id)) (18.16 hashes no UUID): a retried row lands on the
shard that has it already.

The sink reads the table's columns (DESCRIBE TABLE) and writes the layout it finds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

import msgspec

from pgslowlog.event import SlowQuery

DEFAULT_TABLE = "pgslowlog.slow_queries"
_encoder = msgspec.json.Encoder()
_encode, _encode_lines = _encoder.encode, _encoder.encode_lines
RETENTION_DAYS = 30  # the modern layout's TTL; the legacy one drops partitions instead


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    value: Callable[[SlowQuery], Any]
    comment: str = ""


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is timezone.utc else moment.astimezone(timezone.utc)


def _seconds(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return _utc(moment).isoformat(" ", "seconds")[:19]  # isoformat: 10 times strftime's speed


def _microseconds(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return _utc(moment).isoformat(" ", "microseconds")[:26]


def _json_text(value: Any) -> str | None:
    return None if value is None else _encode(value).decode()


def _known(figures: dict[str, float | None] | None) -> dict[str, float]:
    return {name: value for name, value in (figures or {}).items() if value is not None}


def _flag(value: bool | None) -> int | None:
    return None if value is None else int(value)


_NULLABLE_TEXTS = (
    *("container", "pod_uid", "container_hostname", "user", "database", "client"),
    *("application_name", "protocol", "statement_name", "fingerprint", "plan_error"),
)


def _common(low_cardinality: str) -> list[Column]:
    """Columns both layouts write the same way; `low_cardinality` wraps repeated texts."""

    def field(name: str) -> Callable[[SlowQuery], Any]:
        return lambda event: getattr(event, name)

    columns = [
        Column("host", low_cardinality.format("String"), lambda e: e.host or ""),
        Column("target", low_cardinality.format("String"), field("target")),
        Column("duration_ms", "Float64", field("duration_ms")),
        Column("duration_exact", "UInt8", lambda e: int(e.duration_exact)),
        Column("outcome", low_cardinality.format("String"), field("outcome")),
        Column("query", "String", field("query")),
        Column("query_truncated", "UInt8", lambda e: int(e.query_truncated)),
        Column("query_id", "Nullable(Int64)", field("query_id")),
        Column("pid", "Nullable(Int32)", field("pid")),
        Column("host_pid", "Nullable(Int32)", field("host_pid")),
        Column("probe", low_cardinality.format("String"), field("probe")),
        Column("binary", "String", field("binary")),
        Column("backend_exited", "UInt8", lambda e: int(e.backend_exited)),
        Column("resources_exact", "Nullable(UInt8)", lambda e: _flag(e.resources_exact)),
    ]
    columns += [Column(name, "Nullable(String)", field(name)) for name in _NULLABLE_TEXTS]
    return columns


LEGACY: list[Column] = [
    Column("id", "UUID", lambda e: e.id),
    Column("ts", "DateTime('UTC')", lambda e: _seconds(e.ts), "the statement's start"),
    Column("ts_us", "UInt32", lambda e: e.ts.microsecond, "microseconds after ts"),
    *_common("{}"),
    Column("params", "Nullable(String)", lambda e: _json_text(e.params), "a JSON array"),
    Column("waits.name", "Array(String)", lambda e: list((e.waits or {}).keys())),
    Column("waits.looks", "Array(UInt32)", lambda e: list((e.waits or {}).values())),
    Column("blocked_by", "Nullable(String)", lambda e: _json_text(e.blocked_by), "JSON"),
    Column("lock_wait_start", "Nullable(DateTime('UTC'))", lambda e: _seconds(e.lock_wait_start)),
    Column(
        "lock_wait_start_us",
        "Nullable(UInt32)",
        lambda e: e.lock_wait_start.microsecond if e.lock_wait_start else None,
    ),
    # Only the figures known: 18.16 reads no null inside an array.
    Column("resources.name", "Array(String)", lambda e: list(_known(e.resources))),
    Column("resources.value", "Array(Float64)", lambda e: list(_known(e.resources).values())),
    Column("plan", "Nullable(String)", lambda e: _json_text(e.plan), "EXPLAIN's JSON"),
]

MODERN: list[Column] = [
    Column("id", "UUID", lambda e: e.id),
    Column("ts", "DateTime64(6, 'UTC')", lambda e: _microseconds(e.ts)),
    *_common("LowCardinality({})"),
    Column("params", "Array(Nullable(String))", lambda e: e.params or []),
    Column("waits", "Map(String, UInt32)", lambda e: e.waits or {}),
    Column("blocked_by", "Nullable(String)", lambda e: _json_text(e.blocked_by)),
    Column(
        "lock_wait_start",
        "Nullable(DateTime64(6, 'UTC'))",
        lambda e: _microseconds(e.lock_wait_start),
    ),
    Column("resources", "Map(String, Nullable(Float64))", lambda e: e.resources or {}),
    Column("plan", "JSON", lambda e: e.plan[0] if e.plan else {}),
]

LAYOUTS = {"legacy": LEGACY, "modern": MODERN}


def layout_of(columns: dict[str, str]) -> str:
    """Which layout a table of these columns (name -> type, as DESCRIBE says) has."""
    return "modern" if columns.get("ts", "").startswith("DateTime64") else "legacy"


def mismatches(layout: str, columns: dict[str, str]) -> list[str]:
    """What keeps the sink from writing this table: missing columns, other types."""
    problems = []
    for column in LAYOUTS[layout]:
        found = columns.get(column.name)
        if found is None:
            problems.append(f"column {column.name} is missing (pgslowlog writes {column.type})")
        elif _normal(found) != _normal(column.type):
            problems.append(f"column {column.name} is {found}, pgslowlog writes {column.type}")
    return problems


def _normal(type_name: str) -> str:
    return type_name.replace(" ", "").replace('"', "'")


def rows(layout: str, events: list[SlowQuery]) -> bytes:
    """JSONEachRow: one object per event, keys as the table's columns. A null is left
    out: 18.16 reads none in JSONEachRow, and a column left out is NULL (Nullable)."""
    columns = [(column.name, column.value) for column in LAYOUTS[layout]]
    return _encode_lines(
        [
            {name: value for name, read in columns if (value := read(event)) is not None}
            for event in events
        ]
    )


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def valid_name(name: str, dotted: bool = False) -> bool:
    """A name the statements can hold unquoted: NAME, or DATABASE.NAME if `dotted`."""
    parts = name.split(".") if dotted else [name]
    return len(parts) <= 2 and all(_NAME.fullmatch(part) for part in parts)


def _split(table: str) -> tuple[str, str]:
    database, _, name = table.rpartition(".")
    return database or "default", name


def ddl(table: str = DEFAULT_TABLE, cluster: str | None = None, modern: bool = False) -> str:
    """The statements an operator runs on every shard, each ending in ";\\n"."""
    database, name = _split(table)
    columns = MODERN if modern else LEGACY
    nested: dict[str, list[Column]] = {}
    body = []
    for column in columns:
        parent, dot, child = column.name.partition(".")
        if dot:
            if parent not in nested:
                nested[parent] = []
                body.append(f"    {parent} Nested({{{parent}}})")
            nested[parent].append(Column(child, column.type[len("Array(") : -1], column.value))
            continue
        comment = f" COMMENT '{column.comment}'" if column.comment and modern else ""
        body.append(f"    `{column.name}` {column.type}{comment}")
    text = ",\n".join(body)
    for parent, children in nested.items():
        text = text.replace(
            f"{{{parent}}}", ", ".join(f"{child.name} {child.type}" for child in children)
        )
    local = f"{name}_local" if cluster else name
    key = "(toStartOfHour(ts), ifNull(fingerprint, ''), id)"
    ttl = f"\nTTL toDateTime(ts) + INTERVAL {RETENTION_DAYS} DAY DELETE" if modern else ""
    statements = [
        f"CREATE DATABASE IF NOT EXISTS {database}",
        f"CREATE TABLE IF NOT EXISTS {database}.{local} (\n{text}\n)\n"
        f"ENGINE = ReplacingMergeTree()\nPARTITION BY toDate(ts)\nORDER BY {key}{ttl}",
    ]
    if cluster:
        statements.append(
            f"CREATE TABLE IF NOT EXISTS {database}.{name} AS {database}.{local}\n"
            f"ENGINE = Distributed({cluster}, {database}, {local}, cityHash64(toString(id)))"
        )
    return "".join(statement + ";\n" for statement in statements)

"""Example third-party sink: slow statements into a SQLite table.

[sinks.sqlite]
path = "/var/lib/pgslowlog/slow.db"
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Annotated

import msgspec

from pgslowlog import BaseSink, RegisterSink, SinkType, SlowQuery, hookimpl


class SqliteOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    path: str
    table: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")] = "slow_queries"


class SqliteSink(BaseSink):
    def __init__(self, options: SqliteOptions) -> None:
        self.table = options.table
        # Opened here, used by the sink's own thread only.
        self.connection = sqlite3.connect(options.path, check_same_thread=False)
        self.connection.execute(
            f"create table if not exists {self.table} (ts text, duration_ms real, query text, "
            "query_truncated integer, pid integer, user text, database text, client text)"
        )

    def write(self, events: Sequence[SlowQuery]) -> None:
        with self.connection:  # one transaction per batch
            self.connection.executemany(
                f"insert into {self.table} values (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        e.ts.isoformat(),
                        e.duration_ms,
                        e.query,
                        e.query_truncated,
                        e.pid,
                        e.user,
                        e.database,
                        e.client,
                    )
                    for e in events
                ],
            )

    def close(self) -> None:
        self.connection.close()


@hookimpl
def pgslowlog_register_sinks(register: RegisterSink) -> None:
    register(
        SinkType(
            name="sqlite",
            description="example: slow statements into a SQLite table",
            options=SqliteOptions,
            create=SqliteSink,
        )
    )

"""PostgreSQL's timestamps: microseconds since 2000-01-01, wall-clock time."""

from __future__ import annotations

import time

PG_EPOCH_UNIX_US = 946_684_800 * 1_000_000  # 2000-01-01, PostgreSQL's timestamp zero


def pg_now_us() -> int:
    """Now, in PostgreSQL's microseconds since 2000-01-01."""
    return time.time_ns() // 1000 - PG_EPOCH_UNIX_US


def pg_us(unix_ns: int) -> int:
    """A Unix time in ns as PostgreSQL's microseconds."""
    return unix_ns // 1000 - PG_EPOCH_UNIX_US


def unix_ns(pg_us: int) -> int:
    """PostgreSQL's microseconds as a Unix time in ns."""
    return (pg_us + PG_EPOCH_UNIX_US) * 1000

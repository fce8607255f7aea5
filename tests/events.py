"""A slow-statement event for tests of what sinks and metrics make of one."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from pgslowlog.event import SlowQuery

START = datetime(2026, 12, 3, 15, 34, 51, 177_900, tzinfo=timezone.utc)


def slow(**fields: Any) -> SlowQuery:
    """A statement of alice's on shop, over psql, fields overridden as given."""
    event: dict[str, Any] = dict(
        ts=START,
        duration_ms=300.5,
        query="select pg_sleep(0.3)",
        query_truncated=False,
        pid=4242,
        user="alice",
        database="shop",
        client="10.1.2.3(50312)",
        application_name="psql",
        protocol="simple",
        probe="activity",
        binary="/usr/lib/postgresql/15/bin/postgres",
    )
    return SlowQuery(**{**event, **fields})

"""Slow-statement events for tests of what the dispatcher, sinks and metrics make of one.

The one factory of SlowQuery values in the tests: `slow()` is a statement of alice's,
every field as a real one would have it; `numbered(n)` is the n-th of a series, told
apart by its text and backend.
"""

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


def numbered(n: int, **fields: Any) -> SlowQuery:
    """The n-th statement of a series: text "q<n>", backend 1000 + n."""
    return slow(**{"query": f"q{n}", "pid": 1000 + n, **fields})

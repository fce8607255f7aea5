"""What each slow statement costs the daemon after decoding: the file sink's encoders
(`json`, `jsonlog` for pgBadger) and the metrics count (`[metrics]`), in microseconds per
event. Pure Python, no root, no PostgreSQL: interleaved rounds over one batch of
realistic events, medians printed. No assertion: figures.

    .venv/bin/python bench/event_costs.py [--rounds 31] [--batch 4096]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone

from pgslowlog.event import SlowQuery, json_lines
from pgslowlog.jsonlog import jsonlog_lines
from pgslowlog.metrics import SlowStatementCounts


def events(count: int) -> list[SlowQuery]:
    """A mix as a busy server sends it: some bound placeholders, 40 backends, 3 databases."""
    return [
        SlowQuery(
            ts=datetime.now(timezone.utc),
            duration_ms=100 + n % 50,
            query=f"select * from orders where id = $1 /* {n} */"
            if n % 2
            else f"select pg_sleep(0.3) /* {n} */",
            query_truncated=False,
            pid=1000 + n % 40,
            user=f"user{n % 5}",
            database=f"db{n % 3}",
            client=f"10.0.0.{n % 9}({40000 + n % 40})",
            application_name="app",
            protocol="extended" if n % 2 else "simple",
            probe="activity",
            binary="/usr/lib/postgresql/15/bin/postgres",
            target="main",
        )
        for n in range(count)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--batch", type=int, default=4096)
    arguments = parser.parse_args()
    batch = events(arguments.batch)
    counts = SlowStatementCounts(max_databases=20, max_users=20)
    cases: dict[str, Callable[[Sequence[SlowQuery]], object]] = {
        "file sink, format json": json_lines,
        "file sink, format jsonlog": jsonlog_lines,
        "metrics count": counts.observe,
    }
    per_event: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(arguments.rounds):  # interleaved: the machine's noise hits every case
        for name, run in cases.items():
            started = time.perf_counter()
            run(batch)
            per_event[name].append((time.perf_counter() - started) / len(batch) * 1e6)
    print(f"{arguments.rounds} rounds of {arguments.batch} events, µs per event")
    for name, figures in per_event.items():
        print(f"  {name:<28} median {statistics.median(figures):6.2f}  min {min(figures):6.2f}")


if __name__ == "__main__":
    main()

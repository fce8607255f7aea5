"""What the clickhouse sink costs per event, beside the file sink, in one run.

Starts a throwaway ClickHouse 18.16 cluster of two shards (Debian's clickhouse-server)
with the Distributed table of `pgslowlog schema clickhouse --cluster`, then hands the
same batches of realistic events (a sampled statement with waits, resources and a
fingerprint) to three sinks in interleaved rounds, and prints the median CPU time of
the process per event (time.process_time, every thread: noise on this VM moves it
less than wall time) and the wall time per batch until it is delivered:
- `file`: the file sink, JSON lines (the reference);
- `clickhouse`: the clickhouse sink delivering to ClickHouse: the batch to the spool
  (written and synced), then its rows over HTTP from the sink's thread;
- `clickhouse spooled`: the same sink while ClickHouse is away (the spool alone).
ClickHouse's own CPU is not counted: it runs elsewhere in a fleet.

    .venv/bin/python bench/clickhouse_sink.py [--batch 1000] [--rounds 9]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

from pgslowlog.event import SlowQuery
from pgslowlog.plugins.clickhouse_schema import ddl
from pgslowlog.plugins.clickhouse_sink import ClickHouseOptions, ClickHouseSink
from pgslowlog.plugins.file_sink import FileSink, FileSinkOptions
from pgslowlog.testing.clickhouse import ClickHouseCluster


def events(count: int) -> list[SlowQuery]:
    now = datetime.now(timezone.utc)
    return [
        SlowQuery(
            ts=now,
            duration_ms=250.0 + n % 100,
            query=f"select * from orders where customer_id = {n} and status = 'open'",
            query_truncated=False,
            pid=4000 + n % 50,
            user="app",
            database="shop",
            client="10.1.2.3(50312)",
            application_name="api",
            protocol="extended",
            probe="sampled",
            binary="/usr/lib/postgresql/15/bin/postgres",
            target="main",
            host="db1",
            waits={"CPU": 20, "IO:DataFileRead": 5},
            resources={"shared_blks_hit": 1200.0, "shared_blks_read": 30.0, "cpu_ms": 180.0},
            resources_exact=False,
            blocked_by=[],
            fingerprint="5a8e1c5b2f0d3e41",
            host_pid=4000 + n % 50,
        )
        for n in range(count)
    ]


def cost(
    write: Callable[[Sequence[SlowQuery]], object],
    batch: list[SlowQuery],
    done: Callable[[], bool] = lambda: True,
) -> tuple[float, float]:
    """The process's CPU per event (µs: every thread, as the clickhouse sink sends from
    a thread of its own) and the wall time (ms) until `done()` says it is delivered."""
    wall, cpu = time.perf_counter(), time.process_time()
    write(batch)
    while not done():
        time.sleep(0.01)  # few wake-ups: each costs 25-60 µs of CPU on this VM
    return (time.process_time() - cpu) / len(batch) * 1e6, (time.perf_counter() - wall) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=9)
    arguments = parser.parse_args()
    batch = events(arguments.batch)
    with ClickHouseCluster(shards=2) as clickhouse, tempfile.TemporaryDirectory() as scratch:
        for shard in (0, 1):
            for statement in ddl(cluster=clickhouse.cluster_name).split(";\n"):
                if statement.strip():
                    clickhouse.query(statement, shard=shard)
        base = Path(scratch)
        file_sink = FileSink(FileSinkOptions(path=str(base / "slow.jsonl")))
        options = ClickHouseOptions(url=clickhouse.http_url(0), spool_dir=str(base / "spool"))
        delivering = ClickHouseSink(options)
        away = ClickHouseSink(
            ClickHouseOptions(
                url="http://127.0.0.1:9",
                spool_dir=str(base / "spool-away"),
                backoff_initial_s=600,  # no retry during the rounds: only the spooling counts
                backoff_max_s=600,
            )
        )

        def sent() -> bool:
            return delivering.spooled == 0

        figures: dict[str, list[tuple[float, float]]] = {}
        for _ in range(arguments.rounds):
            for name, write, done in (
                ("file", file_sink.write, lambda: True),
                ("clickhouse", delivering.write, sent),
                ("clickhouse spooled", away.write, lambda: True),
            ):
                figures.setdefault(name, []).append(cost(write, batch, done))
        assert delivering.dropped_later == 0 and delivering.spooled == 0
        # Every round sent the same events: one row per id is left with FINAL.
        stored = clickhouse.query("SELECT count() FROM pgslowlog.slow_queries FINAL").strip()
        for sink in (file_sink, delivering, away):
            sink.close()
    print(f"batches of {arguments.batch} events, {arguments.rounds} interleaved rounds, medians")
    print(f"{'sink':<20} {'CPU µs/event':>13} {'ms/batch':>9}")
    for name, values in figures.items():
        cpu = statistics.median(v[0] for v in values)
        wall = statistics.median(v[1] for v in values)
        print(f"{name:<20} {cpu:>13.1f} {wall:>9.1f}")
    print(f"rows in ClickHouse with FINAL: {stored} (the batch's {arguments.batch} events)")


if __name__ == "__main__":
    main()

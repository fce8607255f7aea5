"""What the `sampled` definition costs the daemon: CPU per look, at 100 and 1,000 backends.

The looking thread alone, in this process (bench/daemon_cost.py measures the whole
daemon process). Starts a throwaway Debian PostgreSQL 15 cluster per case
(max_connections = backends + 20), opens the backends, then runs the sampled source's
looks in this process for a while at the default interval and prints the CPU the
looking thread used, as a share of one core, and how many looks a second it managed.
Idle backends are psycopg connections; busy ones are pgbench -S clients, whose entries
change at every look (the worst case: every slot decoded every time), or with --tpcb
pgbench TPC-B clients at scale 1, which queue on the same rows (the worst case for
walking the lock table: many backends seen waiting on a lock at every look).

With --compare-why, each case runs `--rounds` times with the "why" readings (blocked_by
and resources) off and on, interleaved, and prints the medians side by side.

    .venv/bin/python bench/sampler_cost.py [--backends 100 1000] [--seconds 10] \
        [--busy | --tpcb] [--compare-why --rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from pgslowlog.config import DaemonConfig, TargetConfig
from pgslowlog.planner import Planner
from pgslowlog.plugin_manager import Plugins
from pgslowlog.sampled.source import SampledSource
from pgslowlog.testing.cluster import Cluster

BINDIR = Path("/usr/lib/postgresql/15/bin")


def measure(
    cluster: Cluster, seconds: float, interval_ms: float, why: bool = True
) -> tuple[float, float, int]:
    """(share of one core, looks per second, backends seen) for `seconds` of looking."""
    config = TargetConfig(binary=str(cluster.postgres), probes=["sampled"])
    target, (definition,) = Planner(Plugins.load()).resolve(config, 0)
    daemon = DaemonConfig(sample_interval_ms=interval_ms, blocked_by=why, resources=why)
    source = definition.open(definition, target, daemon)
    assert isinstance(source, SampledSource)
    source.attach()  # through the open binary: its failure uprobes
    target.file.close()
    reader = source.reader()
    looks = 0
    for _ in range(3):  # adopt every backend first: the steady state is what runs for months
        reader.wait(1000)
        reader.read(4096)
    cpu_before, started = time.thread_time(), time.monotonic()
    while time.monotonic() - started < seconds:
        reader.wait(20)
        before = source._next_look  # a look happened when the schedule moved on
        reader.read(4096)
        looks += source._next_look != before
    cpu = time.thread_time() - cpu_before
    elapsed = time.monotonic() - started
    seen = sum(len(c.backends) for c in source._discovery.clusters.values())
    source.close()
    return cpu / elapsed, looks / elapsed, seen


def busy_clients(
    cluster: Cluster, clients: int, seconds: float, tpcb: bool = False
) -> subprocess.Popen[bytes]:
    """pgbench -S (or TPC-B) with `clients` connections, once they are all connected."""
    subprocess.run(
        [str(BINDIR / "pgbench"), "-i", "-q", "-s", "1", cluster.dsn()],
        check=True,
        capture_output=True,
    )
    bench = subprocess.Popen(
        [
            str(BINDIR / "pgbench"),
            "-n",
            *([] if tpcb else ["-S"]),
            "-c",
            str(clients),
            "-j",
            "2",
            "-T",
            str(int(seconds)),
            cluster.dsn(),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
        while time.monotonic() < deadline:
            count = admin.execute(
                "select count(*) from pg_stat_activity where application_name = 'pgbench'"
            ).fetchone()
            if count and count[0] >= clients:
                break
            time.sleep(0.2)
    return bench


@contextmanager
def cluster_with_backends(wanted: int, busy: bool, tpcb: bool, seconds: float) -> Iterator[Cluster]:
    """A throwaway cluster with `wanted` backends: idle psycopg connections, or
    pgbench clients (-S, or TPC-B) for `seconds`. Sized as an operator would size it
    (max_connections = backends + 20): a look reads every slot, used or not. Stopped,
    with its clients, on every path."""
    cluster = Cluster(BINDIR, max_connections=wanted + 20).start()
    connections: list[psycopg.Connection] = []
    bench: subprocess.Popen[bytes] | None = None
    try:
        if busy:
            bench = busy_clients(cluster, wanted, seconds, tpcb)
        while not busy and len(connections) < wanted:
            connections.append(psycopg.connect(cluster.dsn(), autocommit=True))
        yield cluster
    finally:
        for connection in connections:
            connection.close()
        if bench is not None:
            bench.kill()
            bench.wait()
        cluster.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", type=int, nargs="*", default=[100, 1000])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--interval-ms", type=float, default=10)
    parser.add_argument("--busy", action="store_true", help="pgbench -S clients, not idle ones")
    parser.add_argument("--tpcb", action="store_true", help="pgbench TPC-B clients, scale 1")
    parser.add_argument("--compare-why", action="store_true", help="why readings off vs on")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of each, interleaved")
    arguments = parser.parse_args()
    busy = arguments.busy or arguments.tpcb
    kind = "TPC-B clients" if arguments.tpcb else "pgbench -S clients" if busy else "idle clients"
    if os.geteuid() != 0:
        print("sampler_cost: needs root (it reads the servers' memory)", file=sys.stderr)
        return 2
    interval = f"{arguments.interval_ms:g} ms"
    settings = [False, True] if arguments.compare_why else [True]
    print(
        f"| backends ({kind}) | max_connections | looked at | why readings "
        f"| CPU of one core (median) | looks/s at {interval} (median) | rounds |"
    )
    print("|---|---|---|---|---|---|---|")
    for wanted in sorted(arguments.backends):
        slots = wanted + 20
        total = (arguments.seconds + 3) * arguments.rounds * len(settings) + 30
        with cluster_with_backends(wanted, busy, arguments.tpcb, total) as cluster:
            figures: dict[bool, list[tuple[float, float, int]]] = {why: [] for why in settings}
            for round_number in range(arguments.rounds):
                # Each round starts with the other setting: neither always runs first.
                order = settings if round_number % 2 == 0 else settings[::-1]
                for why in order:
                    figures[why].append(
                        measure(cluster, arguments.seconds, arguments.interval_ms, why)
                    )
            for why in settings:
                share = statistics.median(f[0] for f in figures[why])
                rate = statistics.median(f[1] for f in figures[why])
                seen = max(f[2] for f in figures[why])
                print(
                    f"| {wanted} | {slots} | {seen} | {'on' if why else 'off'} | {share:.2%} "
                    f"| {rate:.0f} | {arguments.rounds} |"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

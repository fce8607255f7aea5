"""What the `sampled` definition costs the daemon: CPU per look, at 100 and 1,000 backends.

Starts a throwaway Debian PostgreSQL 15 cluster per case (max_connections = backends +
20), opens the backends, then runs the sampled source's looks in this process for a
while at the default interval and prints the CPU the looking thread used, as a share of
one core, and how many looks a second it managed (at 10 ms it should be near 100).
Idle backends are psycopg connections; busy ones are pgbench -S clients, whose entries
change at every look (the worst case: every slot decoded every time).

    .venv/bin/python bench/sampler_cost.py [--backends 100 1000] [--seconds 10] [--busy]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from pgslowlog.config import DaemonConfig, TargetConfig
from pgslowlog.planner import Planner
from pgslowlog.plugin_manager import Plugins
from pgslowlog.sampled.source import SampledSource
from pgslowlog.testing.cluster import Cluster

BINDIR = Path("/usr/lib/postgresql/15/bin")


def measure(cluster: Cluster, seconds: float, interval_ms: float) -> tuple[float, float, int]:
    """(share of one core, looks per second, backends seen) for `seconds` of looking."""
    config = TargetConfig(binary=str(cluster.postgres), probes=["sampled"])
    target, (definition,) = Planner(Plugins.load()).resolve(config, 0)
    daemon = DaemonConfig(sample_interval_ms=interval_ms)
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


def busy_clients(cluster: Cluster, clients: int, seconds: float) -> subprocess.Popen[bytes]:
    """pgbench -S with `clients` connections, once they are all connected."""
    subprocess.run(
        [str(BINDIR / "pgbench"), "-i", "-q", "-s", "1", cluster.dsn()],
        check=True,
        capture_output=True,
    )
    bench = subprocess.Popen(
        [
            str(BINDIR / "pgbench"),
            "-n",
            "-S",
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", type=int, nargs="*", default=[100, 1000])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--interval-ms", type=float, default=10)
    parser.add_argument("--busy", action="store_true", help="pgbench -S clients, not idle ones")
    arguments = parser.parse_args()
    if os.geteuid() != 0:
        print("sampler_cost: needs root (it reads the servers' memory)", file=sys.stderr)
        return 2
    interval = f"{arguments.interval_ms:g} ms"
    print(
        f"| backends ({'pgbench -S clients' if arguments.busy else 'idle clients'}) "
        f"| max_connections | looked at | CPU of one core "
        f"| looks/s at {interval} |"
    )
    print("|---|---|---|---|---|")
    for wanted in sorted(arguments.backends):
        # Sized as an operator would size it: the look copies every slot, used or not.
        slots = wanted + 20
        cluster = Cluster(BINDIR, max_connections=slots).start()
        connections: list[psycopg.Connection] = []
        bench: subprocess.Popen[bytes] | None = None
        try:
            if arguments.busy:
                bench = busy_clients(cluster, wanted, arguments.seconds + 30)
            while not arguments.busy and len(connections) < wanted:
                connections.append(psycopg.connect(cluster.dsn(), autocommit=True))
            share, rate, seen = measure(cluster, arguments.seconds, arguments.interval_ms)
            print(f"| {wanted} | {slots} | {seen} | {share:.1%} | {rate:.0f} |")
        finally:
            for connection in connections:
                connection.close()
            if bench is not None:
                bench.kill()
                bench.wait()
            cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

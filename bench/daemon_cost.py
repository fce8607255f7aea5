"""What the whole daemon costs a machine, and how soon it looks: `pgslowlog run` with
the default config (`sampled` at threshold 200 ms, blocked_by and resources on,
/metrics served, a file sink, [explain] on) against a Debian PostgreSQL 15 cluster.

Per case (backends, idle or busy, threshold), `--rounds` times: starts the daemon,
waits for it to be ready, lets it settle, then measures over `--seconds`:
- its CPU, as a share of one core: every thread's sum_exec_runtime
  (/proc/PID/task/*/schedstat), the kernel's own nanosecond count;
- its wake-ups a second (the same file's timeslice count): on this VM each costs
  tens of microseconds of CPU by itself, whatever the thread then does;
- the looks it took a second (/metrics pgslowlog_looks_total): a sampler that falls
  behind looks cheap, so the rate stands beside every CPU figure;
- its blind time (/metrics pgslowlog_blind_seconds_total).
And from the process's exec (Popen) to its first look ("looking"), to its outcome
uprobes attached, and to "ready".

Idle backends are psycopg connections; busy ones pgbench -S clients (every entry
changes all the time) or, with --tpcb, TPC-B clients at scale 1 (queued on the same
rows: lock waits and lock walks). Needs root.

    .venv/bin/python bench/daemon_cost.py [--backends 100 400 1000] [--seconds 20] \
        [--busy | --tpcb] [--threshold-ms 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx
from sampler_cost import cluster_with_backends

from pgslowlog.testing.cluster import Cluster, free_port

BINDIR = Path("/usr/lib/postgresql/15/bin")
PGSLOWLOG = Path(sys.executable).with_name("pgslowlog")
SETTLE_S = 3.0  # after "ready": the first scans and adoptions are not the steady state


def config_text(cluster: Cluster, port: int, events: Path, threshold_ms: float) -> str:
    return f"""
[daemon]
threshold_ms = {threshold_ms}

[metrics]
listen = "127.0.0.1:{port}"

[explain]
user = "postgres"

[[target]]
name = "bench"
binary = "{cluster.postgres}"

[sinks.file]
path = "{events}"
"""


def task_figures(pid: int) -> tuple[int, int]:
    """(CPU ns, timeslices) summed over the process's threads."""
    cpu = slices = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()
        except OSError:
            continue  # a thread that just ended
        cpu += int(fields[0])
        slices += int(fields[2])
    return cpu, slices


def lines(path: Path) -> int:
    try:
        with path.open("rb") as events:
            return sum(1 for _ in events)
    except FileNotFoundError:
        return 0


def scraped(port: int) -> tuple[float, float]:
    """(looks, blind seconds) from /metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    looks = sum(float(v) for v in re.findall(r"^pgslowlog_looks_total\{[^}]*\} (\S+)", text, re.M))
    blind = sum(
        float(v) for v in re.findall(r"^pgslowlog_blind_seconds_total\{[^}]*\} (\S+)", text, re.M)
    )
    return looks, blind


def log_times(log: Path, started: float) -> dict[str, float | None]:
    """Seconds from exec to each start-up line (None: never logged)."""
    found: dict[str, float | None] = dict.fromkeys(("looking", "outcome_uprobes_attached", "ready"))
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        event = entry.get("event")
        if event in found and found[event] is None:
            found[event] = datetime.fromisoformat(entry["timestamp"]).timestamp() - started
    return found


def one_round(
    cluster: Cluster, threshold_ms: float, seconds: float, workdir: Path
) -> dict[str, float | None]:
    port = free_port()
    config = workdir / "pgslowlog.toml"
    config.write_text(config_text(cluster, port, workdir / "events.jsonl", threshold_ms))
    log = workdir / "daemon.log"
    with log.open("w") as output:
        started = time.time()
        daemon = subprocess.Popen(
            [str(PGSLOWLOG), "run", "-c", str(config)],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while '"event": "ready"' not in log.read_text():
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not get ready:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        time.sleep(SETTLE_S)
        events = workdir / "events.jsonl"
        cpu_before, slices_before = task_figures(daemon.pid)
        looks_before, blind_before = scraped(port)
        events_before = lines(events)
        at = time.monotonic()
        time.sleep(seconds)
        cpu_after, slices_after = task_figures(daemon.pid)
        looks_after, blind_after = scraped(port)
        events_after = lines(events)
        elapsed = time.monotonic() - at
    finally:
        daemon.terminate()
        daemon.wait(60)
    return {
        "cpu": (cpu_after - cpu_before) / 1e9 / elapsed,
        "wakeups": (slices_after - slices_before) / elapsed,
        "looks": (looks_after - looks_before) / elapsed,
        "blind_ms": (blind_after - blind_before) * 1000,
        "events": (events_after - events_before) / elapsed,
        **log_times(log, started),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", type=int, nargs="*", default=[100, 400, 1000])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threshold-ms", type=float, nargs="*", default=[200.0])
    parser.add_argument("--busy", action="store_true", help="pgbench -S clients")
    parser.add_argument("--tpcb", action="store_true", help="pgbench TPC-B clients, scale 1")
    arguments = parser.parse_args()
    if os.geteuid() != 0:
        print("daemon_cost: needs root (it runs the daemon)", file=sys.stderr)
        return 2
    busy = arguments.busy or arguments.tpcb
    kind = "TPC-B" if arguments.tpcb else "pgbench -S" if busy else "idle"
    print(
        "| backends | clients | threshold ms | daemon CPU of one core | looks/s | wake-ups/s "
        "| slow events/s | blind ms | exec → first look s | → outcome uprobes s | → ready s "
        "| rounds |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for wanted in sorted(arguments.backends):
        # The clients run until the cluster is stopped: longer than any round.
        with cluster_with_backends(wanted, busy, arguments.tpcb, 10**6) as cluster:
            rounds: dict[float, list[dict[str, float | None]]] = {
                t: [] for t in arguments.threshold_ms
            }
            for number in range(arguments.rounds):
                order = arguments.threshold_ms[:: 1 if number % 2 == 0 else -1]
                for threshold in order:
                    with tempfile.TemporaryDirectory(prefix="pgslowlog-bench-") as workdir:
                        rounds[threshold].append(
                            one_round(cluster, threshold, arguments.seconds, Path(workdir))
                        )
            for threshold, figures in rounds.items():

                def median(key: str, figures: list[dict[str, float | None]] = figures) -> float:
                    values = [value for f in figures if (value := f[key]) is not None]
                    return statistics.median(values) if values else float("nan")

                print(
                    f"| {wanted} | {kind} | {threshold:g} | {median('cpu'):.2%} "
                    f"| {median('looks'):.0f} | {median('wakeups'):.0f} | {median('events'):.0f} "
                    f"| {median('blind_ms'):.0f} "
                    f"| {median('looking'):.2f} | {median('outcome_uprobes_attached'):.2f} "
                    f"| {median('ready'):.2f} | {len(figures)} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

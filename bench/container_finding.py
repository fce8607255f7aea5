"""What finding containerised servers costs (containers = true): figures, no assertions.

1. The exec notice program (core/bpf/exec_notice.c) runs at every exec on the host.
   An exec storm (`--execs` runs of /bin/true, in `--rounds` interleaved rounds without
   and with the program attached) gives the wall time per fork+exec either way, and
   kernel.bpf_stats_enabled the program's own run time per call.
2. A full /proc scan (what the finder does at start, every 60 s as a safety net, and
   every second where the exec notices cannot load), at the host's process count and
   with `--processes` extra sleeping processes: CPU ms per scan, median of the rounds.

    .venv/bin/python bench/container_finding.py [--execs 2000] [--rounds 7] \
        [--processes 1000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from pathlib import Path

from pgslowlog.container_finder import EXEC_FUNCTION, ExecNotifier, ServerFinder

STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


def exec_storm(count: int) -> float:
    """Microseconds of wall time per fork+exec of /bin/true."""
    started = time.perf_counter()
    for _ in range(count):
        subprocess.run(["/bin/true"], check=True)
    return (time.perf_counter() - started) * 1e6 / count


def program_stats(fd: int) -> tuple[int, int]:
    info = dict(
        line.split(":\t", 1) for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines()
    )
    return int(info["run_cnt"]), int(info["run_time_ns"])


def scan_ms(rounds: int) -> tuple[float, int]:
    """Median CPU ms of one full scan, and the processes it looked at."""
    finder = ServerFinder(lambda: None, notices=False)
    times = []
    try:
        for _ in range(rounds):
            began = time.thread_time()
            finder._scan()  # the scan alone: no server to keep up
            times.append((time.thread_time() - began) * 1000)
    finally:
        finder.close()
    return statistics.median(times), sum(1 for entry in os.listdir("/proc") if entry.isdigit())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--execs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--processes", type=int, default=1000)
    arguments = parser.parse_args()

    stats_before = STATS.read_text()
    STATS.write_text("1")
    try:
        without, with_ = [], []
        runs, run_ns = 0, 0
        for _ in range(arguments.rounds):
            without.append(exec_storm(arguments.execs))
            notifier = ExecNotifier()
            try:
                fd = notifier._compiled.functions[EXEC_FUNCTION]
                count_before, ns_before = program_stats(fd)
                with_.append(exec_storm(arguments.execs))
                count_after, ns_after = program_stats(fd)
                runs += count_after - count_before
                run_ns += ns_after - ns_before
                notifier.pids()
            finally:
                notifier.close()
    finally:
        STATS.write_text(stats_before)
    print(f"fork+exec of /bin/true, median of {arguments.rounds} interleaved rounds:")
    print(f"  without the exec notice program: {statistics.median(without):8.1f} us")
    print(f"  with it attached:                {statistics.median(with_):8.1f} us")
    print(f"  ratio: {statistics.median(with_) / statistics.median(without):.3f}")
    print(f"  the program's own run time: {run_ns / max(runs, 1):.0f} ns per exec ({runs} runs)")

    scan, processes = scan_ms(arguments.rounds)
    print(f"full /proc scan: {scan:.2f} ms CPU at {processes} processes")
    sleepers = [subprocess.Popen(["sleep", "600"]) for _ in range(arguments.processes)]
    try:
        scan, processes = scan_ms(arguments.rounds)
        print(f"full /proc scan: {scan:.2f} ms CPU at {processes} processes")
    finally:
        for sleeper in sleepers:
            sleeper.kill()
        for sleeper in sleepers:
            sleeper.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

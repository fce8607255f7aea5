"""What tracing costs PostgreSQL: pgslowlog against PostgreSQL's own slow log and bcc's dbslower.

    sudo .venv/bin/python bench/pgslowlog_bench.py [--seconds 10] [--rounds 3]

Runs pgbench against a throwaway Debian PostgreSQL 15 cluster under each condition,
interleaved (A B C ... A B C ...) in one run, and prints the median TPS of each and
its ratio to no tracing; then the figures of pgslowlog itself (events at threshold 0,
statement-end-to-file latency, start-up, peak RSS, CPU). No assertion: figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from pgslowlog.elf import inspect_binary
from pgslowlog.loader import libbcc
from pgslowlog.testing.cluster import Cluster
from pgslowlog.testing.daemon_process import RunningDaemon

BINDIR = Path("/usr/lib/postgresql/15/bin")
DBSLOWER = "/usr/sbin/dbslower-bpfcc"
WORKLOADS = {
    "select-only simple": ["-S", "-M", "simple"],
    "select-only prepared": ["-S", "-M", "prepared"],
    "tpc-b simple": ["-M", "simple"],
}
# Statements a pgbench transaction sends: -S one SELECT; TPC-B BEGIN, 3 UPDATEs, a SELECT,
# an INSERT and END.
STATEMENTS_PER_TRANSACTION = {"select-only simple": 1, "select-only prepared": 1, "tpc-b simple": 7}
CLIENTS = 2
# Empty programs where the default (activity) and the one-trap (backend_status)
# definitions trap: the floors their costs are read against.
BARE_UPROBES = {
    "bare uprobe": "pgstat_report_activity",
    "bare uprobe ReadyForQuery": "ReadyForQuery",
}
WARMUP_S = 2  # progress seconds left out at the start of a window
PROGRESS = re.compile(r"^progress: ([\d.]+) s, ([\d.]+) tps")


@dataclass
class Measured:
    tps: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class DaemonFigures:
    startup_s: list[float] = field(default_factory=list)
    peak_rss_mb: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    # (probe, workload) -> statements counted over its threshold-0 runs
    threshold0: dict[tuple[str, str], Counter[str]] = field(default_factory=dict)


@dataclass
class DaemonRun:
    """One pgslowlog run: where its file sink writes, and what pgbench sent meanwhile."""

    log: Path
    workload: str = ""
    issued: int = 0  # statements pgbench completed


def socket_dsn(cluster: Cluster) -> str:
    """Over the Unix socket, as local clients usually connect: TCP costs half the TPS here."""
    return f"host={cluster.base} port={cluster.port} user=postgres dbname=postgres"


def pgbench(cluster: Cluster, options: list[str], seconds: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            str(BINDIR / "pgbench"),
            "-n",
            "-c",
            str(CLIENTS),
            "-j",
            str(CLIENTS),
            "-T",
            str(seconds),
            "-P",
            "1",
            *options,
            socket_dsn(cluster),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def window_tps(output: str, start_after_s: float) -> float:
    """Median of pgbench's per-second progress lines after `start_after_s`."""
    rates = [
        float(match.group(2))
        for line in output.splitlines()
        if (match := PROGRESS.match(line)) and float(match.group(1)) > start_after_s
    ]
    return statistics.median(rates) if rates else 0.0


def transactions(output: str) -> int:
    match = re.search(r"number of transactions actually processed: (\d+)", output)
    return int(match.group(1)) if match else 0


def process_figures(pid: int) -> tuple[float, float]:
    """Peak RSS in MB and CPU seconds of a live process."""
    status = Path(f"/proc/{pid}/status").read_text()
    peak_kb = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime + stime
    return peak_kb / 1024, ticks / os.sysconf("SC_CLK_TCK")


@contextmanager
def pgslowlog(
    cluster: Cluster, threshold_ms: float, probe: str, figures: DaemonFigures, workload: str = ""
) -> Iterator[DaemonRun]:
    directory = Path(tempfile.mkdtemp(prefix="pgslowlog-bench-"))
    run = DaemonRun(directory / "slow.jsonl", workload)
    log = run.log
    config = directory / "pgslowlog.toml"
    config.write_text(
        f'[daemon]\nthreshold_ms = {threshold_ms}\n\n[[target]]\nbinary = "{cluster.postgres}"\n'
        f'probes = ["{probe}"]\n\n[sinks.file]\npath = "{log}"\n'
    )
    started = time.monotonic()
    daemon = RunningDaemon(config)
    daemon.wait_for_log("ready")
    figures.startup_s.append(time.monotonic() - started)
    try:
        yield run
    finally:
        rss, cpu = process_figures(daemon.process.pid)
        figures.peak_rss_mb.append(rss)
        figures.cpu_s.append(cpu)
        daemon.stop()
        stopped = daemon.wait_for_log("stopped")
        if threshold_ms == 0:
            kernel = next(iter(stopped["kernel_counters"].values()))
            written = len(log.read_text().splitlines()) if log.exists() else 0
            totals = figures.threshold0.setdefault((probe, run.workload), Counter())
            totals.update(
                runs=1,
                issued=run.issued,
                emitted=kernel["emitted"],
                written=written,
                ringbuf_full=kernel["ringbuf_full"],
                untracked=kernel["untracked"],
                dropped=stopped["sinks"]["file"]["dropped"],
                background=stopped["filtered_background"],
            )
        shutil.rmtree(directory)  # a threshold-0 run writes hundreds of MB


@contextmanager
def bare_uprobe(cluster: Cluster, symbol: str) -> Iterator[None]:
    """The floor of any tracer that traps at `symbol`: an empty BPF program there.

    Compiled in this process (the benchmark may load LLVM) and attached like the
    daemon attaches, so the difference to "pgslowlog 200ms" is pgslowlog's own work.
    """
    import bcc

    binary = inspect_binary(str(cluster.postgres), frozenset({symbol}))
    program = bcc.BPF(text=b"int on(struct pt_regs *ctx) { return 0; }")
    function = program.load_func(b"on", bcc.BPF.KPROBE)
    offset = binary.functions[symbol].offset
    fd = libbcc().attach_uprobe(
        function.fd, 0, b"pgslowlog_bench", str(cluster.postgres).encode(), offset, -1, 0
    )
    if fd < 0:
        raise RuntimeError(f"attaching the bare uprobe on {symbol} failed")
    try:
        yield
    finally:
        libbcc().close_perf_event(fd)


@contextmanager
def bare_sched_switch() -> Iterator[None]:
    """An empty program on every context switch: the floor of a tracer that reads each
    backend's pg_stat_activity entry when it is switched out, instead of trapping."""
    import bcc

    program = bcc.BPF(text=b"RAW_TRACEPOINT_PROBE(sched_switch) { return 0; }")  # attaches
    try:
        yield
    finally:
        program.detach_raw_tracepoint(b"sched_switch")


@contextmanager
def postgres_log(cluster: Cluster, threshold_ms: int) -> Iterator[None]:
    cluster.psql(f"alter system set log_min_duration_statement = {threshold_ms}", check=True)
    cluster.psql("select pg_reload_conf()", check=True)
    try:
        yield
    finally:
        cluster.psql("alter system reset log_min_duration_statement", check=True)
        cluster.psql("select pg_reload_conf()", check=True)


def plain_tracer(cluster: Cluster, name: str) -> AbstractContextManager[object]:
    """What a condition without figures of its own runs pgbench under."""
    if name == "no tracing":
        return nullcontext()
    if name in BARE_UPROBES:
        return bare_uprobe(cluster, BARE_UPROBES[name])
    if name == "bare sched_switch":
        return bare_sched_switch()
    if name.startswith("log_min_duration_statement"):
        return postgres_log(cluster, int(name.split()[-1]))
    raise ValueError(f"unknown condition {name!r}")


def run_condition(
    cluster: Cluster, name: str, workload: str, seconds: int, figures: DaemonFigures
) -> tuple[float, str]:
    """TPS of one pgbench run under condition `name`, and a note."""
    options = WORKLOADS[workload]
    if name.startswith("pgslowlog"):
        # "pgslowlog 200ms" (the default probe) or "pgslowlog backend_status 200ms"
        words = name.split()
        threshold = float(words[-1].removesuffix("ms"))
        probe = words[1] if len(words) == 3 else "auto"
        with pgslowlog(cluster, threshold, probe, figures, workload) as run:
            output = pgbench(cluster, options, seconds).communicate()[0]
            completed = transactions(output)
            run.issued = completed * STATEMENTS_PER_TRANSACTION[workload]
        return window_tps(output, WARMUP_S), f"{completed} transactions"
    if name.startswith("dbslower"):
        return run_dbslower(cluster, options, seconds)
    with plain_tracer(cluster, name):
        return window_tps(pgbench(cluster, options, seconds).communicate()[0], WARMUP_S), ""


def run_dbslower(cluster: Cluster, options: list[str], seconds: int) -> tuple[float, str]:
    """dbslower needs the backends' pids, so it attaches after pgbench has connected."""
    bench = pgbench(cluster, options, seconds + 8)
    started = time.monotonic()
    pids: list[str] = []
    while len(pids) < CLIENTS and time.monotonic() - started < 10:
        listed = cluster.psql(
            "select pid from pg_stat_activity where application_name = 'pgbench'"
        ).stdout.split()
        pids = listed
        time.sleep(0.1)
    tracer = subprocess.Popen(
        [DBSLOWER, "postgres", "-m", "200", "-p", *pids],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert tracer.stdout is not None
    tracer.stdout.readline()  # "Tracing database queries for pids ..." once attached
    attached_after = time.monotonic() - started
    output = bench.communicate()[0]
    tracer.terminate()
    tracer.wait()
    return window_tps(output, attached_after + 1), f"attached after {attached_after:.1f} s"


def latency(cluster: Cluster, figures: DaemonFigures, statements: int = 40) -> list[float]:
    """Milliseconds from a slow statement's end to its line in the file sink."""
    arrivals: dict[str, float] = {}
    with pgslowlog(cluster, 100, "auto", figures) as run:
        log = run.log
        stop = threading.Event()

        def watch() -> None:
            seen = 0
            while not stop.is_set():
                if log.exists():
                    lines = log.read_text().splitlines()
                    for line in lines[seen:]:
                        arrivals[json.loads(line)["query"]] = time.time()
                    seen = len(lines)
                time.sleep(0.001)

        watcher = threading.Thread(target=watch)
        watcher.start()
        for n in range(statements):
            cluster.psql(f"select pg_sleep(0.12) /* latency {n} */", check=True)
        time.sleep(0.5)
        stop.set()
        watcher.join()
        events = [json.loads(line) for line in log.read_text().splitlines()]
    result = []
    for event in events:
        if event["query"] in arrivals:
            end = datetime.fromisoformat(event["ts"]).timestamp() + event["duration_ms"] / 1000
            result.append((arrivals[event["query"]] - end) * 1000)
    return sorted(result)


CONDITIONS: list[str] = [
    "no tracing",
    "bare uprobe",
    "bare uprobe ReadyForQuery",
    "bare sched_switch",
    "pgslowlog 200ms",
    "pgslowlog 0ms",
    "pgslowlog backend_status 200ms",
    "pgslowlog backend_status 0ms",
    "pgslowlog sampled 200ms",  # no trap per statement; 0 ms is not its use
    "log_min_duration_statement 200",
    "log_min_duration_statement 0",
    "dbslower 200ms",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="pgbench -T per run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument(
        "--conditions",
        nargs="*",
        default=CONDITIONS,
        choices=CONDITIONS,
        help="a subset, for a quicker look (no tracing is always run)",
    )
    arguments = parser.parse_args()
    conditions = ["no tracing", *[c for c in arguments.conditions if c != "no tracing"]]
    if arguments.seconds < WARMUP_S + 2:
        print(f"pgslowlog bench: --seconds must be at least {WARMUP_S + 2}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("pgslowlog bench: needs root (eBPF); run it with sudo", file=sys.stderr)
        return 2

    cluster = Cluster(BINDIR).start()
    figures = DaemonFigures()
    results: dict[tuple[str, str], Measured] = {}
    try:
        subprocess.run(
            [str(BINDIR / "pgbench"), "-i", "-q", "-s", "10", cluster.dsn()],
            check=True,
            capture_output=True,
        )
        for round_number in range(arguments.rounds):
            # Each round starts one condition later: no condition always runs first
            # (after a pause) or last (on tables TPC-B has bloated the most).
            shift = round_number % len(conditions)
            order = conditions[shift:] + conditions[:shift]
            for workload in arguments.workloads:
                for condition in order:
                    tps, note = run_condition(
                        cluster, condition, workload, arguments.seconds, figures
                    )
                    measured = results.setdefault((workload, condition), Measured())
                    measured.tps.append(tps)
                    if note:
                        measured.notes.append(note)
                    print(
                        f"round {round_number + 1} {workload:22} {condition:32} {tps:10.0f} TPS",
                        file=sys.stderr,
                        flush=True,
                    )
        latencies = latency(cluster, figures)
    finally:
        cluster.stop()

    print(
        f"\nMachine: {platform.node()}, {os.cpu_count()} cores, kernel {platform.release()}; "
        f"PostgreSQL 15 (Debian), pgbench -c {CLIENTS} -T {arguments.seconds}, "
        f"{arguments.rounds} interleaved rounds, median TPS\n"
    )
    print("| workload | condition | median TPS | ratio to no tracing | range of rounds |")
    print("|---|---|---|---|---|")
    for workload in arguments.workloads:
        base = statistics.median(results[(workload, "no tracing")].tps)
        for condition in conditions:
            runs = results[(workload, condition)].tps
            tps = statistics.median(runs)
            print(
                f"| {workload} | {condition} | {tps:,.0f} | {tps / base:.2f} | "
                f"{min(runs) / base:.2f}-{max(runs) / base:.2f} |"
            )
    print()
    for (probe, workload), t in figures.threshold0.items():
        print(
            f"- threshold 0 ({probe}, {workload}), runs {t['runs']}: pgbench issued {t['issued']}, "
            f"emitted {t['emitted']}, written {t['written']}, lost in kernel {t['ringbuf_full']} "
            f"(ring buffer full) + {t['untracked']} (untracked), sink drops {t['dropped']}, "
            f"background processes left out {t['background']}"
        )
    for (workload, condition), measured in results.items():
        if condition.startswith("dbslower"):
            print(f"- {condition}, {workload}: {', '.join(measured.notes)}")
    if latencies:
        p50 = latencies[len(latencies) // 2]
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        print(
            f"- statement end to file sink: p50 {p50:.1f} ms, p99 {p99:.1f} ms "
            f"({len(latencies)} statements)"
        )
    print(f"- start-up to probes attached: median {statistics.median(figures.startup_s):.2f} s")
    print(f"- daemon peak RSS: max {max(figures.peak_rss_mb):.0f} MB")
    print(
        f"- daemon CPU per run: median {statistics.median(figures.cpu_s):.2f} s, "
        f"max {max(figures.cpu_s):.2f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

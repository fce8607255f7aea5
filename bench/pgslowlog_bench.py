"""What tracing costs PostgreSQL: pgslowlog against PostgreSQL's own slow log and bcc's dbslower.

    sudo .venv/bin/python bench/pgslowlog_bench.py [--seconds 10] [--rounds 3]

Runs pgbench against a throwaway Debian PostgreSQL 15 cluster under each condition,
interleaved (A B C ... A B C ...) in one run, and prints per condition the median TPS
and its ratio to no tracing, and two figures noise moves less: PostgreSQL's CPU time
per transaction (its backends' utime + stime over the transactions pgbench completed)
and the daemon's own CPU. Then the figures of pgslowlog itself (events at threshold 0,
statement-end-to-file latency, start-up, peak RSS) and, from one extra run each with
kernel.bpf_stats_enabled, each BPF program's run time per call. No assertion: figures.
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

from pgslowlog.bpf.libbcc import libbcc
from pgslowlog.elf import inspect_binary
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
    cpu_per_transaction_us: list[float] = field(default_factory=list)  # PostgreSQL's
    daemon_cpu_share: list[float] = field(default_factory=list)  # of one core, while pgbench ran


@dataclass
class RunResult:
    tps: float
    note: str = ""
    cpu_per_transaction_us: float | None = None
    daemon_cpu_share: float | None = None


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
    daemon_pid: int = 0


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


def reaped_children_cpu_s(pid: int) -> float:
    """CPU seconds of the children `pid` has reaped (cutime + cstime): a postmaster's
    exited backends."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> set[int]:
    return set(map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split()))


def client_backends(pid: int) -> set[int]:
    """The postmaster's children that serve a client over the Unix socket (pgbench's):
    their process title says "[local]". Autovacuum workers come and go on their own."""
    found = set()
    for child in children(pid):
        try:
            title = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"[local]" in title:
            found.add(int(child))
    return found


def pgbench_with_cpu(cluster: Cluster, options: list[str], seconds: int) -> tuple[str, float]:
    """pgbench's output, and PostgreSQL's CPU µs per transaction it completed: the CPU
    its backends used, counted once they exited and the postmaster reaped them."""
    postmaster = cluster.postmaster_pid
    before = reaped_children_cpu_s(postmaster)
    bench = pgbench(cluster, options, seconds)
    time.sleep(1)  # connected by now
    clients = client_backends(postmaster)
    output = bench.communicate()[0]
    deadline = time.monotonic() + 10
    # An exited backend is still a child (a zombie) until the postmaster reaps it.
    while clients & children(postmaster) and time.monotonic() < deadline:
        time.sleep(0.02)
    completed = transactions(output)
    cpu_s = reaped_children_cpu_s(postmaster) - before
    return output, cpu_s * 1e6 / completed if completed else 0.0


def bpf_program_stats(pid: int) -> list[tuple[int, int, int]]:
    """(prog_id, run_cnt, run_time_ns) of each BPF program `pid` holds open, from
    /proc/PID/fdinfo (the counts move only while kernel.bpf_stats_enabled = 1)."""
    found = []
    for fdinfo in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            text = fdinfo.read_text()
        except OSError:
            continue
        info = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
        if "prog_id" in info and "run_cnt" in info:
            found.append((int(info["prog_id"]), int(info["run_cnt"]), int(info["run_time_ns"])))
    return sorted(found, key=lambda stats: -stats[1])


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
    run.daemon_pid = daemon.process.pid
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
    if name in ("no tracing", AGAIN):
        return nullcontext()
    if name in BARE_UPROBES:
        return bare_uprobe(cluster, BARE_UPROBES[name])
    if name == "bare sched_switch":
        return bare_sched_switch()
    if name.startswith("log_min_duration_statement"):
        return postgres_log(cluster, int(name.split()[-1]))
    raise ValueError(f"unknown condition {name!r}")


def pgslowlog_condition(name: str) -> tuple[str, float]:
    """ "pgslowlog 200ms" (the default config: auto) or "pgslowlog backend_status 200ms"."""
    words = name.split()
    return (words[1] if len(words) == 3 else "auto"), float(words[-1].removesuffix("ms"))


def run_condition(
    cluster: Cluster, name: str, workload: str, seconds: int, figures: DaemonFigures
) -> RunResult:
    """One pgbench run under condition `name`."""
    options = WORKLOADS[workload]
    if name.startswith("pgslowlog"):
        probe, threshold = pgslowlog_condition(name)
        with pgslowlog(cluster, threshold, probe, figures, workload) as run:
            daemon_before = process_figures(run.daemon_pid)[1]
            started = time.monotonic()
            output, cpu_us = pgbench_with_cpu(cluster, options, seconds)
            daemon_share = (process_figures(run.daemon_pid)[1] - daemon_before) / (
                time.monotonic() - started
            )
            completed = transactions(output)
            run.issued = completed * STATEMENTS_PER_TRANSACTION[workload]
        return RunResult(
            window_tps(output, WARMUP_S), f"{completed} transactions", cpu_us, daemon_share
        )
    if name.startswith("dbslower"):
        tps, note = run_dbslower(cluster, options, seconds)
        return RunResult(tps, note)
    with plain_tracer(cluster, name):
        output, cpu_us = pgbench_with_cpu(cluster, options, seconds)
        return RunResult(window_tps(output, WARMUP_S), "", cpu_us)


def bpf_run_times(
    cluster: Cluster, conditions: list[str], workloads: list[str], seconds: int
) -> list[str]:
    """Each uprobe definition's BPF programs, run time per call, over one extra pgbench
    run per workload with kernel.bpf_stats_enabled (which itself costs a little: these
    runs are not among the TPS rounds)."""
    lines = []
    stats_file = Path("/proc/sys/kernel/bpf_stats_enabled")
    previous = stats_file.read_text().strip()
    stats_file.write_text("1")
    try:
        for name in conditions:
            probe, threshold = pgslowlog_condition(name)
            for workload in workloads:
                options = WORKLOADS[workload]
                with pgslowlog(cluster, threshold, probe, DaemonFigures(), workload) as run:
                    before = {p: (n, t) for p, n, t in bpf_program_stats(run.daemon_pid)}
                    completed = transactions(pgbench(cluster, options, seconds).communicate()[0])
                    programs = []
                    for prog, calls, ns in bpf_program_stats(run.daemon_pid):
                        calls0, ns0 = before.get(prog, (0, 0))
                        if calls > calls0:
                            per_call = (ns - ns0) / (calls - calls0)
                            programs.append(f"{calls - calls0:,} calls at {per_call:,.0f} ns")
                lines.append(
                    f"- BPF run time, {name}, {workload} ({completed:,} transactions): "
                    + ("; ".join(programs) or "no program ran")
                )
    finally:
        stats_file.write_text(previous)
    return lines


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


# No tracing again, as a condition of its own: its ratio to "no tracing" (A/A) is the
# noise each other ratio is to be read against.
AGAIN = "no tracing again (A/A)"
CONDITIONS: list[str] = [
    "no tracing",
    AGAIN,
    "bare uprobe",
    "bare uprobe ReadyForQuery",
    "bare sched_switch",
    "pgslowlog 200ms",  # the default config: auto, which picks sampled at 200 ms
    "pgslowlog sampled 20ms",  # sampled under auto's floor: a look every 4 ms
    "pgslowlog activity 200ms",  # what auto picks under 50 ms, and picked before sampled
    "pgslowlog 0ms",  # auto: activity
    "pgslowlog backend_status 200ms",
    "pgslowlog backend_status 0ms",
    "log_min_duration_statement 200",
    "log_min_duration_statement 0",
    "dbslower 200ms",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="pgbench -T per run")
    parser.add_argument(
        "--tpcb-seconds",
        type=int,
        default=20,
        help="pgbench -T per TPC-B run: its fsyncs make it noisier, longer runs steady it",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument(
        "--conditions",
        nargs="*",
        default=CONDITIONS,
        choices=CONDITIONS,
        help="a subset, for a quicker look (no tracing and its A/A twin always run)",
    )
    arguments = parser.parse_args()
    conditions = ["no tracing", *[c for c in arguments.conditions if c != "no tracing"]]
    if AGAIN not in conditions:
        conditions.insert(1, AGAIN)  # every ratio is printed beside the noise
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
                    seconds = arguments.tpcb_seconds if "tpc-b" in workload else arguments.seconds
                    result = run_condition(cluster, condition, workload, seconds, figures)
                    measured = results.setdefault((workload, condition), Measured())
                    measured.tps.append(result.tps)
                    if result.note:
                        measured.notes.append(result.note)
                    if result.cpu_per_transaction_us is not None:
                        measured.cpu_per_transaction_us.append(result.cpu_per_transaction_us)
                    if result.daemon_cpu_share is not None:
                        measured.daemon_cpu_share.append(result.daemon_cpu_share)
                    print(
                        f"round {round_number + 1} {workload:22} {condition:32} "
                        f"{result.tps:10.0f} TPS",
                        file=sys.stderr,
                        flush=True,
                    )
        latencies = latency(cluster, figures)
        traced = [c for c in conditions if c.startswith("pgslowlog") and " 0ms" not in c]
        bpf_lines = bpf_run_times(cluster, traced, arguments.workloads, arguments.seconds)
    finally:
        cluster.stop()

    print(
        f"\nMachine: {platform.node()}, {os.cpu_count()} cores, kernel {platform.release()}; "
        f"PostgreSQL 15 (Debian), pgbench -c {CLIENTS} -T {arguments.seconds}, "
        f"{arguments.rounds} interleaved rounds, median TPS\n"
    )
    print(
        "| workload | condition | median TPS | ratio to no tracing | A/A ratio | range of rounds "
        "| PostgreSQL CPU µs/transaction | ratio | A/A ratio | daemon CPU, % of a core |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for workload in arguments.workloads:
        untraced = results[(workload, "no tracing")]
        base = statistics.median(untraced.tps)
        base_cpu = statistics.median(untraced.cpu_per_transaction_us)
        again = results.get((workload, AGAIN))
        noise = noise_cpu = "-"
        if again is not None:  # the same ratios of untraced against untraced
            noise = f"{statistics.median(again.tps) / base:.2f}"
            noise_cpu = f"{statistics.median(again.cpu_per_transaction_us) / base_cpu:.3f}"
        for condition in conditions:
            measured = results[(workload, condition)]
            runs = measured.tps
            tps = statistics.median(runs)
            cpu = cpu_ratio = daemon = "-"
            if measured.cpu_per_transaction_us:
                per_transaction = statistics.median(measured.cpu_per_transaction_us)
                cpu, cpu_ratio = f"{per_transaction:.1f}", f"{per_transaction / base_cpu:.3f}"
            if measured.daemon_cpu_share:
                daemon = f"{statistics.median(measured.daemon_cpu_share):.1%}"
            print(
                f"| {workload} | {condition} | {tps:,.0f} | {tps / base:.2f} | {noise} | "
                f"{min(runs) / base:.2f}-{max(runs) / base:.2f} | {cpu} | {cpu_ratio} "
                f"| {noise_cpu} | {daemon} |"
            )
    print()
    for line in bpf_lines:
        print(line)
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

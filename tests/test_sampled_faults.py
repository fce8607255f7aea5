"""Faults of reading PostgreSQL's memory from outside (`sampled`), on real servers.

Each test runs a Debian PostgreSQL 15 server of its own and the daemon with
`probes = ["sampled"]`: a backend SIGKILLed (the postmaster resets shared memory), a
`pg_ctl restart` under running statements, a backend's pid taken over by another
process, and a 1 MB statement text.

What the daemon reads of a backend's own memory (process_vm_readv by pid: the text,
the usage counters) is counted by a uprobe on libc's process_vm_readv in the daemon's
process (`DaemonReads`): a perf-PMU uprobe, so no tracefs is needed.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from waiting import wait_until

from pgslowlog.bpf.libbcc import libbcc
from pgslowlog.elf import inspect_binary
from pgslowlog.process_memory import load_bias
from pgslowlog.testing.cluster import Cluster, free_port

pytestmark = pytest.mark.ebpf  # root: it reads the servers' memory, and attaches a uprobe

SAMPLED = {"probes": ["sampled"], "threshold_ms": 200}


class Session:
    """One client connection whose statement runs in a thread of its own."""

    def __init__(self, server: Cluster) -> None:
        self.connection = psycopg.connect(server.dsn(), autocommit=True)
        self.pid: int = self.connection.info.backend_pid
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self, sql: str, then_leave: bool = False) -> None:
        """Run `sql`; with `then_leave`, disconnect as soon as it is done (as psql does)."""

        def run() -> None:
            try:
                self.connection.execute(sql)
            except psycopg.Error as error:
                self.error = error
            finally:
                if then_leave:
                    self.connection.close()

        self._thread = threading.Thread(target=run)
        self._thread.start()

    def join(self, timeout: float = 30) -> None:
        assert self._thread is not None
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"backend {self.pid}'s statement still runs"
        self.connection.close()


def running_since(server: Cluster, pids: list[int], at_least_s: float) -> dict[int, float]:
    """When each backend's running statement began (PostgreSQL's query_start, Unix
    seconds: the daemon's start too), once all have run for `at_least_s`. At 0.5 s,
    the looks (every 10 ms) have seen each running fifty times, and read its text (due
    30 ms before the threshold of 200 ms)."""
    with psycopg.connect(server.dsn(), autocommit=True) as watcher:

        def started() -> dict[int, float]:
            rows = watcher.execute(
                "select pid, extract(epoch from query_start)::float8,"
                " extract(epoch from clock_timestamp() - query_start)::float8"
                " from pg_stat_activity where state = 'active' and pid = any(%s)",
                (pids,),
            ).fetchall()
            found = {pid: start for pid, start, age in rows if age >= at_least_s}
            return found if len(found) == len(pids) else {}

        return wait_until(started, 10, f"backends {pids} running for {at_least_s} s")


def start_s(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["ts"]).timestamp()


def end_s(event: dict[str, Any]) -> float:
    return start_s(event) + event["duration_ms"] / 1000


def assert_no_errors_logged(daemon: Any) -> None:
    bad = [e for e in daemon.process.logs if e.get("level") in ("error", "critical")]
    bad += [e for e in daemon.process.logs if "exception" in e or e.get("event") == "unparsed"]
    assert bad == [], bad
    assert "Traceback" not in daemon.process.stderr, daemon.process.stderr


def assert_cut_short(
    event: dict[str, Any], session: Session, started: float, alive_at: float, gone_by: float
) -> None:
    """A statement its backend's end cut short: never "ok", timed from its real start,
    its end an upper bound no earlier than the last moment it surely ran and no later
    than the moment its backend was surely gone."""
    assert event["pid"] == session.pid, event
    assert event["outcome"] != "ok" and event["backend_exited"] is True, event
    assert event["duration_exact"] is False, event
    assert abs(start_s(event) - started) < 0.001, (event, started)
    assert alive_at - 0.01 <= end_s(event) <= gone_by + 0.01, (event, alive_at, gone_by)


# --- what the daemon reads of one process's memory --------------------------------

READS_PROGRAM = r"""
#include <uapi/linux/ptrace.h>

// The reads the daemon (DAEMON, its tgid) makes of each process: libc's
// process_vm_readv(pid, local_iov, liovcnt, remote_iov, riovcnt, flags).
struct reads_t {
    u64 calls;
    u64 bytes;          // over all ranges of all calls (up to 4 ranges a call)
    u64 largest;        // the largest range asked for
    u64 text_bytes;     // one-range calls of another size than a pointer's: a text
    u64 pointer_reads;  // one-range calls of 8 bytes: MyBEEntry, debug_query_string...
    u64 uncounted;      // ranges past the 4th (the postmaster's look, never a backend's)
};
BPF_HASH(reads, u32, struct reads_t, 4096);
// A pid, set by the test: the daemon's next read of its memory stops the daemon once
// the read is made.
BPF_ARRAY(stop_at, u32, 1);
BPF_HASH(stopping, u32, u32, 64);  // threads to stop when their call returns

int count_readv(struct pt_regs *ctx) {
    if ((bpf_get_current_pid_tgid() >> 32) != DAEMON)
        return 0;
    u32 target = PT_REGS_PARM1(ctx);
    u64 remote = PT_REGS_PARM4(ctx);
    u64 count = PT_REGS_PARM5(ctx);
    struct reads_t zero = {};
    struct reads_t *r = reads.lookup_or_try_init(&target, &zero);
    if (!r)
        return 0;
    u64 bytes = 0, largest = 0;
    for (int i = 0; i < 4; i++) {
        if (i >= count)
            break;
        u64 iov[2] = {};  // struct iovec: base, length
        if (bpf_probe_read_user(iov, sizeof(iov), (void *)(remote + 16 * i)) != 0)
            break;
        bytes += iov[1];
        if (iov[1] > largest)
            largest = iov[1];
    }
    __sync_fetch_and_add(&r->calls, 1);
    __sync_fetch_and_add(&r->bytes, bytes);
    if (largest > r->largest)
        r->largest = largest;
    if (count > 4)
        __sync_fetch_and_add(&r->uncounted, count - 4);
    if (count == 1 && bytes == 8)
        __sync_fetch_and_add(&r->pointer_reads, 1);
    else if (count == 1)
        __sync_fetch_and_add(&r->text_bytes, bytes);
    int first = 0;
    u32 *armed = stop_at.lookup(&first);
    if (armed && *armed == target) {
        *armed = 0;
        u32 thread = bpf_get_current_pid_tgid(), yes = 1;
        stopping.update(&thread, &yes);
    }
    return 0;
}

// At the return of process_vm_readv: a signal sent at its entry would stop the
// daemon before the copy is made.
int stop_after_copy(struct pt_regs *ctx) {
    u32 thread = bpf_get_current_pid_tgid();
    if (!stopping.lookup(&thread))
        return 0;
    stopping.delete(&thread);
    bpf_send_signal(19);  // SIGSTOP: the whole daemon
    return 0;
}
"""


def all_stopped(pid: int) -> bool:
    """Whether every thread of `pid` is stopped (SIGSTOP)."""
    states = [
        (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        for task in Path(f"/proc/{pid}/task").iterdir()
    ]
    return all(state in "tT" for state in states)


def libc_function(pid: int, name: str) -> tuple[str, int]:
    """The libc file `pid` maps, and the file offset of its function `name`."""
    from elftools.elf.elffile import ELFFile

    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    path = next(
        line.split()[5] for line in maps if len(line.split()) > 5 and "/libc.so" in line.split()[5]
    )
    with open(path, "rb") as handle:
        elf = ELFFile(handle)
        symbol = elf.get_section_by_name(".dynsym").get_symbol_by_name(name)[0]
        address = symbol["st_value"]
        for segment in elf.iter_segments():
            start = segment["p_vaddr"]
            if segment["p_type"] == "PT_LOAD" and start <= address < start + segment["p_filesz"]:
                return path, address - start + segment["p_offset"]
    raise AssertionError(f"{name} is in no loaded segment of {path}")


class DaemonReads:
    """process_vm_readv calls of one daemon, by the pid they read."""

    def __init__(self, daemon: subprocess.Popen[str]) -> None:
        from bcc import BPF

        daemon_pid = daemon.pid

        self._bpf = BPF(text=READS_PROGRAM.encode(), cflags=[f"-DDAEMON={daemon_pid}"])
        path, offset = libc_function(daemon_pid, "process_vm_readv")
        self._fds: list[int] = []
        for function, retprobe in ((b"count_readv", 0), (b"stop_after_copy", 1)):
            program = self._bpf.load_func(function, BPF.KPROBE)
            # Every process mapping libc gets the breakpoint (a per-task perf event would
            # miss the daemon's other threads); the programs act on the daemon's calls.
            name = f"pgslowlog_test_{os.getpid()}_{retprobe}".encode()
            fd = libbcc().attach_uprobe(program.fd, retprobe, name, path.encode(), offset, -1, 0)
            assert fd >= 0, f"uprobe on {path}:process_vm_readv: {os.strerror(abs(fd))}"
            self._fds.append(fd)
        self._table = self._bpf[b"reads"]
        self._stop_at = self._bpf[b"stop_at"]
        self._daemon = daemon

    def stop_after_next_read(self, pid: int) -> None:
        """SIGSTOP the daemon right after its next read of `pid`'s memory, before it
        reads more of it; the caller waits for `stopped_after_read`."""
        self._stop_at[ctypes.c_int(0)] = ctypes.c_uint32(pid)

    def stopped_after_read(self, pid: int) -> None:
        def stopped() -> bool:
            return self._stop_at[ctypes.c_int(0)].value == 0 and all_stopped(self._daemon.pid)

        wait_until(stopped, 5, f"the daemon stopped after a read of {pid}")

    def of(self, pid: int) -> dict[str, int]:
        """What the daemon read of `pid` so far ({} for nothing)."""
        key = self._table.Key(pid)
        try:
            value = self._table[key]
        except KeyError:
            return {}
        return {name: getattr(value, name) for name, _ in value._fields_}

    def forget(self, pid: int) -> None:
        key = self._table.Key(pid)
        if key in self._table:
            del self._table[key]

    def close(self) -> None:
        self._stop_at[ctypes.c_int(0)] = ctypes.c_uint32(0)
        # Closing the perf event detaches the uprobe (bcc's own detach would write to
        # tracefs, not mounted here).
        for fd in self._fds:
            libbcc().close_perf_event(fd)
        self._bpf.cleanup()
        # Never left stopped by a test that failed half-way (the daemon is stopped after);
        # still our child unwaited for, its pid is its own.
        if self._daemon.poll() is None:
            self._daemon.send_signal(signal.SIGCONT)


@pytest.fixture
def daemon_reads() -> Iterator[Any]:
    opened: list[DaemonReads] = []

    def attach(daemon: Any) -> DaemonReads:
        reads = DaemonReads(daemon.process.process)
        opened.append(reads)
        return reads

    yield attach
    for reads in opened:
        reads.close()


# --- 1. a backend SIGKILLed: crash recovery -------------------------------------


def test_after_a_backend_is_killed_the_reset_cluster_is_read_again(own_pg15, start_daemon):
    """SIGKILL on a backend: the postmaster ends every backend (SIGQUIT: no proc_exit,
    no slot cleared), makes its shared memory anew and starts over. The new segment is
    mapped where the old one was (seen on this kernel): a look either reads it there
    and finds every slot emptied, or catches the moment between the two mappings,
    takes the cluster up from scratch and leaves the old backends to its once-a-second
    scan of the children (about one run in four here). The same daemon goes on with
    the new backends. Each statement the crash cut is reported once, even though the
    daemon is stopped right after the next event (its last look scans the children
    too), cut short: never "ok", its end an upper bound after the kill and within a
    scan of the recovery."""
    server = own_pg15()
    daemon = start_daemon(server, **SAMPLED)
    killed = Session(server)
    others = [Session(server) for _ in range(2)]
    killed.start("select pg_sleep(30) /* crash killed */")
    for n, session in enumerate(others):
        session.start(f"select pg_sleep(30) /* crash other {n} */")
    sessions = {"crash killed": killed} | {f"crash other {n}": s for n, s in enumerate(others)}
    started = running_since(server, [s.pid for s in sessions.values()], 0.5)
    killed_at = time.time()
    os.kill(killed.pid, signal.SIGKILL)
    for session in sessions.values():
        session.join()
        assert isinstance(session.error, psycopg.OperationalError), session.error

    def answers() -> bool:
        return server.psql("select 1").returncode == 0

    wait_until(answers, 30, "the server accepting connections after its crash recovery")
    recovered_at = time.time()
    assert "terminating any other active server processes" in server.logfile.read_text()
    with psycopg.connect(server.dsn(), autocommit=True) as connection:
        new_pid = connection.info.backend_pid
        connection.execute("select pg_sleep(0.3) /* after crash */")
    (after,) = daemon.wait_for_events("after crash", 1, timeout=15)
    assert daemon.process.process.poll() is None
    assert daemon.stop() == 0  # drained: a second report of any would be in the file now
    assert after["pid"] == new_pid and after["outcome"] == "ok", after
    assert 299 < after["duration_ms"] < 340, after
    counters = daemon.process.wait_for_log("stopped")["kernel_counters"]
    for marker, session in sessions.items():
        events = daemon.events(marker)
        assert len(events) == 1, (marker, events, counters, daemon.process.logs[-8:])
        (event,) = events
        # "unknown": neither an exit code (no proc_exit) nor the slot's last state
        # (emptied by the reset) is left to read; "error" if a scan read the slot
        # still showing the statement running before the reset.
        assert event["outcome"] in ("unknown", "error"), event
        # The backends were gone once the server answered again; the daemon sees that
        # at its next look, or at its once-a-second scan of the children.
        assert_cut_short(event, session, started[session.pid], killed_at, recovered_at + 1.5)
    assert_no_errors_logged(daemon)


# --- 2. pg_ctl restart under running statements -----------------------------------


def test_pg_ctl_restart_under_running_statements(own_pg15, start_daemon):
    """A fast shutdown ends each backend (FATAL, proc_exit(1)), then a new postmaster
    starts: the daemon follows it, and each statement the restart cut is reported once,
    as an error, ended between the restart's start and its end."""
    server = own_pg15()
    daemon = start_daemon(server, **SAMPLED)
    first_postmaster = server.postmaster_pid
    sessions = {f"restart cut {n}": Session(server) for n in range(3)}
    for marker, session in sessions.items():
        session.start(f"select pg_sleep(30) /* {marker} */")
    started = running_since(server, [s.pid for s in sessions.values()], 0.5)
    restart_at = time.time()
    server.restart()
    restarted_at = time.time()
    for session in sessions.values():
        session.join()
        assert isinstance(session.error, psycopg.errors.AdminShutdown), session.error
    assert server.postmaster_pid != first_postmaster
    with psycopg.connect(server.dsn(), autocommit=True) as connection:
        new_pid = connection.info.backend_pid
        connection.execute("select pg_sleep(0.3) /* after restart */")
    (after,) = daemon.wait_for_events("after restart", 1, timeout=15)
    assert daemon.process.process.poll() is None
    assert daemon.stop() == 0
    assert after["pid"] == new_pid and after["outcome"] == "ok", after
    assert 299 < after["duration_ms"] < 340, after
    for marker, session in sessions.items():
        (event,) = daemon.events(marker)
        # proc_exit(1), seen by the exit uprobe: an error, ended by then.
        assert event["outcome"] == "error", event
        assert_cut_short(event, session, started[session.pid], restart_at, restarted_at)
    assert_no_errors_logged(daemon)


# --- 3. a backend's pid taken by another process ----------------------------------

# A process at a given pid that is no PostgreSQL: it maps the pages where backends
# keep pgBufferUsage, pgWalUsage, debug_query_string, MyBEEntry and MyProc, at the
# same addresses, and fills them with what no backend would hold: a read of it by
# pid would show in the event (a text, or counters of 10^12).
IMPOSTOR = r"""
import ctypes, json, sys
spec = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
MAP_PRIVATE_ANONYMOUS_FIXED_NOREPLACE = 0x02 | 0x20 | 0x100000
for start, length in spec["pages"]:
    if libc.mmap(start, length, 3, MAP_PRIVATE_ANONYMOUS_FIXED_NOREPLACE, -1, 0) != start:
        sys.exit(f"cannot map {start:#x}: errno {ctypes.get_errno()}")
for start, length in spec["counters"]:
    for at in range(start, start + length, 8):
        ctypes.c_uint64.from_address(at).value = 10**12
text = ctypes.create_string_buffer(b"select 'impostor' /* read from a reused pid */")
ctypes.c_uint64.from_address(spec["debug_query_string"]).value = ctypes.addressof(text)
print("ready", flush=True)
sys.stdin.read()
"""
# What the impostor fills: the globals a backend's pid is read at, and their sizes.
BACKEND_GLOBALS = {
    "pgBufferUsage": 256,
    "pgWalUsage": 64,
    "debug_query_string": 8,
    "MyBEEntry": 8,
    "MyProc": 8,
}


def impostor_spec(server: Cluster) -> str:
    """Where the server's backends keep BACKEND_GLOBALS (all at the same addresses:
    forked from the postmaster), as the impostor's argument."""
    binary = inspect_binary(str(server.postgres), frozenset(BACKEND_GLOBALS))
    mapped = load_bias(server.postmaster_pid, os.stat(server.postgres).st_ino)
    assert mapped is not None
    at = {name: mapped - binary.base_vaddr + binary.objects[name] for name in BACKEND_GLOBALS}
    page = os.sysconf("SC_PAGE_SIZE")
    pages = sorted(
        {
            first
            for name, size in BACKEND_GLOBALS.items()
            for first in range(at[name] // page * page, at[name] + size, page)
        }
    )
    runs: list[list[int]] = []
    for first in pages:
        if runs and runs[-1][0] + runs[-1][1] == first:
            runs[-1][1] += page
        else:
            runs.append([first, page])
    counters = [[at[name], BACKEND_GLOBALS[name]] for name in ("pgBufferUsage", "pgWalUsage")]
    return json.dumps(
        {"pages": runs, "counters": counters, "debug_query_string": at["debug_query_string"]}
    )


def spawn_at_pid(pid: int, spec: str) -> subprocess.Popen[str]:
    """The impostor, started at exactly `pid` (free now): the kernel gives a new
    process ns_last_pid + 1, unless another fork on the machine comes first."""
    for _attempt in range(20):
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        child = subprocess.Popen(
            [sys.executable, "-c", IMPOSTOR, spec],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if child.pid == pid:
            assert child.stdout is not None
            assert child.stdout.readline() == "ready\n", f"impostor at {pid}: {child.wait()}"
            return child
        child.kill()
        child.wait()
        assert not Path(f"/proc/{pid}").exists(), f"another process took pid {pid}"
    raise AssertionError(f"no process started at pid {pid} in 20 attempts")


def test_a_reused_backend_pid_is_never_read_nor_reported(own_pg15, start_daemon, daemon_reads):
    """Two backends end while the daemon is stopped (SIGSTOP: a daemon held up), and
    each one's pid goes to a new process that is no PostgreSQL before the daemon goes
    on: one terminated mid-statement (pg_terminate_backend), one whose client left
    right after its statement ended (psql's way). The daemon was stopped right after
    its first read of the terminated one's memory, in the middle of reading its
    statement's text and counters, the look that saw it running for the first time.
    The daemon must report each true statement once and never read the new
    processes' memory: that would be another program's (for a new backend of the same
    cluster, another statement's) counters and text. The impostors map those
    addresses to tell."""
    server = own_pg15()
    spec = impostor_spec(server)
    # At 30 ms a statement's text is due at the first look that sees it running
    # (threshold - 3 intervals = 0).
    daemon = start_daemon(server, probes=["sampled"], threshold_ms=30)
    daemon_pid = daemon.process.process.pid
    reads = daemon_reads(daemon)
    terminated, left = Session(server), Session(server)
    left.start("select pg_sleep(1.5) /* reuse left */", then_leave=True)
    started = running_since(server, [left.pid], 0.3)
    assert reads.of(left.pid).get("text_bytes"), "the daemon read no text of the backend"
    impostors: list[subprocess.Popen[str]] = []
    gone_by: dict[int, float] = {}  # when each backend was surely gone (reaped)
    try:
        # Stopped at its first read of the backend, which comes with the first look
        # that sees its statement: the rest of that reading is still to come.
        reads.stop_after_next_read(terminated.pid)
        terminated.start("select pg_sleep(30) /* reuse terminated */")
        started |= running_since(server, [terminated.pid], 0)
        reads.stopped_after_read(terminated.pid)
        # Both still run (the other's end is to come while the daemon is stopped), this
        # one long enough to be slow whatever time the steps above took.
        running_since(server, [terminated.pid, left.pid], 0.1)
        terminate_at = time.time()
        server.psql(f"select pg_terminate_backend({terminated.pid})", check=True)
        terminated.join()
        assert isinstance(terminated.error, psycopg.errors.AdminShutdown), terminated.error
        left.join()
        assert left.error is None, left.error
        for session in (terminated, left):
            wait_until(
                lambda pid=session.pid: not Path(f"/proc/{pid}").exists(),
                10,
                f"backend {session.pid} reaped",
            )
            gone_by[session.pid] = time.time()
            impostors.append(spawn_at_pid(session.pid, spec))
            reads.forget(session.pid)  # from now on, a read of it is one of the impostor
    finally:
        os.kill(daemon_pid, signal.SIGCONT)
    try:
        (gone,) = daemon.wait_for_events("reuse terminated", 1)
        (ended,) = daemon.wait_for_events("reuse left", 1)
        assert daemon.stop() == 0  # drained
        for impostor in impostors:  # still theirs while the daemon looked
            assert impostor.poll() is None
    finally:
        for impostor in impostors:
            assert impostor.stdin is not None
            impostor.stdin.close()
            impostor.wait()
    after_reuse = {session.pid: reads.of(session.pid) for session in (terminated, left)}
    assert after_reuse == {terminated.pid: {}, left.pid: {}}, after_reuse
    for session in (terminated, left):
        (event,) = [e for e in daemon.events() if e["pid"] == session.pid]
        assert "impostor" not in event["query"], event
    # Its text never read from it: PostgreSQL's own copy in shared memory.
    assert gone["query"] == "select pg_sleep(30) /* reuse terminated */", gone
    assert gone["outcome"] == "error", gone
    alive_at, gone_at = terminate_at, gone_by[terminated.pid]
    assert_cut_short(gone, terminated, started[terminated.pid], alive_at, gone_at)
    assert ended["query"] == "select pg_sleep(1.5) /* reuse left */"
    assert (ended["outcome"], ended["backend_exited"], ended["duration_exact"]) == (
        "ok",
        False,
        True,
    ), ended
    assert abs(ended["duration_ms"] - 1500) < 15, ended
    # Its figures are those the looks read while it ran, none of the impostor's.
    for name, figure in (ended.get("resources") or {}).items():
        assert figure is None or figure < 10**6, (name, ended["resources"])
    assert_no_errors_logged(daemon)


# --- blind time: the daemon stopped -----------------------------------------------


def test_a_daemon_stopped_for_1_5_s_counts_its_blind_time(own_pg15, start_daemon):
    """SIGSTOP for 1.5 s: nothing looked meanwhile, and the daemon says so: a
    blind_time warning naming the cause, blind_ms in the stopped line, and
    pgslowlog_blind_seconds_total on /metrics."""
    server = own_pg15()
    port = free_port()
    daemon = start_daemon(server, probes=["sampled"], metrics={"listen": f"127.0.0.1:{port}"})
    pid = daemon.process.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: all_stopped(pid), 5, "the daemon stopped")
        time.sleep(1.5)
    finally:
        os.kill(pid, signal.SIGCONT)
    warning = daemon.process.wait_for_log("blind_time", timeout=10)
    assert (warning["cause"], warning["target"]) == ("stopped", "target0"), warning
    assert warning["blind_ms"] >= 1000, warning

    def blind_stopped() -> float:
        """/metrics' stopped blind seconds (the main loop reads the sources every 10 s)."""
        scraped = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        found = re.findall(
            r'^pgslowlog_blind_seconds_total\{[^}]*cause="stopped"[^}]*\} (\S+)', scraped, re.M
        )
        return float(found[0]) if found else 0.0

    wait_until(lambda: blind_stopped() >= 1.0, 15, "/metrics counting the blind second")
    assert daemon.stop() == 0
    stopped = daemon.process.wait_for_log("stopped")
    assert stopped["targets"]["target0"]["blind_ms"] >= 1000, stopped["targets"]
    assert stopped["kernel_counters"]["sampled@target0"]["blind_ms_stopped"] >= 1000


# --- 4. a 1 MB statement ----------------------------------------------------------


def test_a_one_megabyte_statement_is_cut_at_query_max_bytes(own_pg15, start_daemon, daemon_reads):
    """The text is read from the backend's own memory up to query_max_bytes + 1 bytes
    (the extra byte tells that it goes on), a page at a time, never the megabyte."""
    limit = 6000  # above track_activity_query_size (1024): the text is the backend's own
    server = own_pg15()
    daemon = start_daemon(server, **SAMPLED, query_max_bytes=limit)
    reads = daemon_reads(daemon)
    sql = "select pg_sleep(0.3) /* one megabyte " + "x" * (1 << 20) + " */"
    with psycopg.connect(server.dsn(), autocommit=True) as connection:
        pid = connection.info.backend_pid
        connection.execute(sql)
        (event,) = daemon.wait_for_events("one megabyte", 1)
    assert daemon.stop() == 0
    assert event["pid"] == pid and event["outcome"] == "ok", {**event, "query": "..."}
    assert event["query"] == sql[:limit]
    assert event["query_truncated"] is True
    read = reads.of(pid)
    # A piece of the text that happens to be 8 bytes long counts as a pointer's read.
    assert limit + 1 - 16 <= read["text_bytes"] <= limit + 1, read
    assert read["largest"] <= 4096, read
    assert read["bytes"] < limit + 64 * 1024, read  # with the usage counters' readings
    assert_no_errors_logged(daemon)


def test_a_single_user_postgres_with_a_child_is_no_postmaster(own_pg15):
    """initdb's `postgres --single` forks `locale -a` while it runs (a container's first
    start runs initdb where its server will run), and any single-user postgres forks for
    COPY ... TO PROGRAM. Taken for a server, it kept the real postmaster waiting; neither
    the sampler's discovery nor the explainer's look-up takes it, though it has a child."""
    from pgslowlog.elf import file_identity
    from pgslowlog.sampled.discovery import postmasters
    from pgslowlog.sampled.procfs import children_of

    server = own_pg15()
    server._pg_ctl("stop")  # the data directory is free for a single-user backend
    as_owner = ["runuser", "-u", str(server.os_user), "--"]
    single = subprocess.Popen(
        [*as_owner, str(server.postgres), "--single", "-D", str(server.data), "postgres"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # the kill below takes runuser, postgres and sh -c sleep
    )
    try:
        assert single.stdin is not None
        single.stdin.write("copy (select 1) to program 'sleep 30'\n")
        single.stdin.flush()
        identity = file_identity(str(server.postgres))
        assert identity is not None

        def forked() -> list[int]:
            # runuser's child: other tests' servers may run the same binary meanwhile.
            ours = children_of(single.pid) & set(_pids_running(server.postgres))
            return [pid for pid in ours if children_of(pid)]

        (backend,) = wait_until(forked, what="the single-user postgres running sh -c sleep")
        assert backend not in postmasters(identity), f"{backend} taken for a postmaster"
    finally:
        os.killpg(single.pid, signal.SIGKILL)
        single.wait()
        # What it left, naming a dead pid, would make the fixture's pg_ctl stop fail.
        (server.data / "postmaster.pid").unlink(missing_ok=True)


def _pids_running(binary: Path) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.readlink(f"/proc/{entry}/exe") == str(binary):
                found.append(int(entry))
        except OSError:
            continue
    return found

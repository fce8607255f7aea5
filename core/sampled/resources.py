"""What a statement cost, read from outside: the backend's own counters and /proc.

Every backend keeps running totals of the buffers it touched (pgBufferUsage) and the
WAL it wrote (pgWalUsage) in its own memory: EXPLAIN (BUFFERS) and pg_stat_statements
take differences of the same totals. The kernel keeps the process's CPU time
(/proc/PID/schedstat: on a CPU, and runnable but waiting for one, in nanoseconds; the
10 ms ticks of /proc/PID/stat are too coarse) and its storage I/O (/proc/PID/io:
read_bytes and write_bytes count what reached the block layer; a read served from the
page cache is in neither).

The sampler reads the counters and the CPU clock when it first sees a statement running
(its baseline), /proc's figures at the next look if it still runs, and all of them
when it sees the statement over; the difference is the statement's. The baseline is
taken at the first look, not at the statement's start, and the end at the look that
sees it over: the figures are approximate by up to an interval at each end
(`resources_exact` false; docs/why.md). A
parallel query's leader adds its workers' buffer and WAL counters to its own when they
finish; its /proc figures never include theirs.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from typing import Optional

import msgspec

from pgslowlog.pg_layouts import BackendStatusLayout
from pgslowlog.process_memory import MemoryReadError, RangeReader

_INT64 = struct.Struct("<q")
_UINT64 = struct.Struct("<Q")


class Usage(msgspec.Struct, frozen=True, gc=False):
    """A backend's running totals at one moment. None: that part could not be read."""

    shared_blks_hit: int
    shared_blks_read: int
    shared_blks_dirtied: int
    shared_blks_written: int
    temp_blks_read: int
    temp_blks_written: int
    wal_records: int
    wal_fpi: int
    wal_bytes: int
    cpu_ns: Optional[int]  # on a CPU: its CPU clock, as /proc/PID/schedstat's first figure
    cpu_wait_ns: Optional[int]  # runnable, waiting for a CPU (/proc/PID/schedstat)
    read_bytes: Optional[int]  # /proc/PID/io
    write_bytes: Optional[int]


_BUFFER_FIELDS = (
    "shared_blks_hit",
    "shared_blks_read",
    "shared_blks_dirtied",
    "shared_blks_written",
    "temp_blks_read",
    "temp_blks_written",
)
_WAL_FIELDS = ("wal_records", "wal_fpi", "wal_bytes")
_PROC_FIELDS = ("read_bytes", "write_bytes")


def statement_resources(start: Usage, end: Usage) -> dict[str, float | int | None]:
    """The event's `resources`: what happened between the two readings. A counter that
    went backwards (the slot's process is another one: a caller's check missed it) is
    not a figure to trust: None."""
    figures: dict[str, float | int | None] = {}
    for name in (*_BUFFER_FIELDS, *_WAL_FIELDS, *_PROC_FIELDS):
        before, after = getattr(start, name), getattr(end, name)
        ok = before is not None and after is not None and after >= before
        figures[name] = after - before if ok else None
    for name, source in (("cpu_ms", "cpu_ns"), ("cpu_wait_ms", "cpu_wait_ns")):
        before, after = getattr(start, source), getattr(end, source)
        ok = before is not None and after is not None and after >= before
        figures[name] = round((after - before) / 1e6, 3) if ok else None
    return figures


def _cpu_clock(pid: int) -> int:
    """The process's CPU-time clock (clock_getcpuclockid(3): MAKE_PROCESS_CPUCLOCK with
    CPUCLOCK_SCHED): its on-CPU time in ns, the first figure of /proc/PID/schedstat,
    for one system call and no file."""
    return ((~pid) << 3) | 2


class UsageReader:
    """Reads one backend's totals. `counters`: one process_vm_readv of its two usage
    globals and its CPU clock, a few microseconds, for every statement a look first
    sees running. `read`: those, and /proc/PID/schedstat (run-queue time) and
    /proc/PID/io (a few hundred bytes each), for statements that last."""

    def __init__(self, layout: BackendStatusLayout, buffer_usage: int, wal_usage: int) -> None:
        """`buffer_usage`, `wal_usage`: where pgBufferUsage and pgWalUsage are in every
        backend of the cluster (forked from the postmaster: the same addresses)."""
        buffer_fields = [getattr(layout, f"bu_{name}") for name in _BUFFER_FIELDS]
        wal_fields = [getattr(layout, f"wu_{name}") for name in _WAL_FIELDS]
        self._buffer_at = buffer_fields
        wal_base = max(buffer_fields) + 8  # where the WAL counters start in a reading
        self._wal_at = [wal_base + at for at in wal_fields]
        # The same two ranges in every backend: one reader, pointed at each in turn.
        self._reader = RangeReader(
            0, [(buffer_usage, max(buffer_fields) + 8), (wal_usage, max(wal_fields) + 8)]
        )

    def counters(self, pid: int, still_ours: Callable[[], bool]) -> Usage | None:
        """Its buffer and WAL counters and on-CPU time; None when it is gone, or when
        `still_ours` (asked before each read by pid) says the pid is not its own."""
        self._reader.pid = pid
        try:
            if not still_ours():
                return None
            raw = self._reader.read()
            if not still_ours():
                return None
            cpu_ns = time.clock_gettime_ns(_cpu_clock(pid))
        except (MemoryReadError, OSError):
            return None
        counts = [_INT64.unpack_from(raw, at)[0] for at in self._buffer_at]
        return Usage(
            shared_blks_hit=counts[0],
            shared_blks_read=counts[1],
            shared_blks_dirtied=counts[2],
            shared_blks_written=counts[3],
            temp_blks_read=counts[4],
            temp_blks_written=counts[5],
            wal_records=_INT64.unpack_from(raw, self._wal_at[0])[0],
            wal_fpi=_INT64.unpack_from(raw, self._wal_at[1])[0],
            wal_bytes=_UINT64.unpack_from(raw, self._wal_at[2])[0],
            cpu_ns=cpu_ns,
            cpu_wait_ns=None,
            read_bytes=None,
            write_bytes=None,
        )

    def with_proc(self, pid: int, usage: Usage, still_ours: Callable[[], bool]) -> Usage:
        """`usage` with the run-queue time and block I/O /proc says now (unknown, None,
        where `still_ours` says the pid is not its own any more)."""
        cpu_wait_ns = _run_queue_ns(pid) if still_ours() else None
        read_bytes, write_bytes = _io(pid) if still_ours() else (None, None)
        return msgspec.structs.replace(
            usage, cpu_wait_ns=cpu_wait_ns, read_bytes=read_bytes, write_bytes=write_bytes
        )

    def read(self, pid: int, still_ours: Callable[[], bool]) -> Usage | None:
        """Everything: None when the backend's memory cannot be read (it exited)."""
        usage = self.counters(pid, still_ours)
        return None if usage is None else self.with_proc(pid, usage, still_ours)


def _run_queue_ns(pid: int) -> int | None:
    """Time runnable but waiting for a CPU, in ns: /proc/PID/schedstat's second figure
    (the first, on-CPU time, comes from the CPU clock); None without CONFIG_SCHED_INFO."""
    try:
        with open(f"/proc/{pid}/schedstat", "rb") as handle:
            return int(handle.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _io(pid: int) -> tuple[int | None, int | None]:
    """read_bytes and write_bytes; (None, None) without CONFIG_TASK_IO_ACCOUNTING or
    without the right to read it (it needs the same access as ptrace)."""
    found: dict[bytes, int] = {}
    try:
        with open(f"/proc/{pid}/io", "rb") as handle:
            for line in handle.read().splitlines():
                name, _, value = line.partition(b":")
                found[name] = int(value)
    except (OSError, ValueError):
        return None, None
    return found.get(b"read_bytes"), found.get(b"write_bytes")

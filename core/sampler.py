"""Looks at PostgreSQL's own bookkeeping from outside: no trap per statement.

Every backend keeps its pg_stat_activity entry (PgBackendStatus, found through the
exported MyBEEntry) and its PGPROC (MyProc, whose wait_event_info says what it waits
on) in shared memory, mapped at the same address in every process of the cluster.
So each look reads every backend's entry and wait word from the postmaster in one
process_vm_readv, and the StatementTracker turns the looks into statements. The
running statement's full text comes from the backend's own debug_query_string,
read once when the statement is old enough to matter; PostgreSQL's copy in shared
memory (cut at track_activity_query_size) is the fallback.

A backend whose MyBEEntry is still NULL is starting up: it is asked again at the
next look, never cached as NULL.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pgslowlog.elf import FileIdentity, PostgresBinary
from pgslowlog.pg_layouts import WAIT_EVENT_TYPES, BackendStatusLayout
from pgslowlog.process_memory import (
    MemoryReadError,
    load_bias,
    read,
    read_c_string,
    read_pointer,
    read_ranges,
)
from pgslowlog.statement_tracker import BackendSample

PG_EPOCH_UNIX_US = 946_684_800 * 1_000_000  # 2000-01-01, PostgreSQL's timestamp zero
NAMEDATALEN = 64
GLOBALS = ("MyBEEntry", "MyProc", "debug_query_string", "pgstat_track_activity_query_size")
_INT = struct.Struct("<i")
_INT64 = struct.Struct("<q")
_UINT32 = struct.Struct("<I")
_UINT64 = struct.Struct("<Q")


def pg_now_us() -> int:
    """Now, in PostgreSQL's microseconds since 2000-01-01."""
    return time.time_ns() // 1000 - PG_EPOCH_UNIX_US


def postmasters(identity: FileIdentity) -> list[int]:
    """Pids of the postmasters running this binary file: processes running it whose
    parent does not (a backend's parent is its postmaster)."""
    running = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = os.stat(f"/proc/{entry}/exe")
        except OSError:
            continue
        if (status.st_dev, status.st_ino) == (identity.device, identity.inode):
            running.add(int(entry))
    return sorted(pid for pid in running if _parent(pid) not in running)


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat[stat.rindex(")") + 2 :].split()[1])


@dataclass
class Backend:
    pid: int
    entry: int  # its PgBackendStatus, in shared memory
    proc: int  # its PGPROC, in shared memory


class Cluster:
    """One postmaster and its children, read through the postmaster's address space."""

    def __init__(
        self, postmaster: int, binary: PostgresBinary, inode: int, layout: BackendStatusLayout
    ) -> None:
        mapped = load_bias(postmaster, inode)
        if mapped is None:
            raise MemoryReadError(0, f"pid {postmaster} does not map the binary")
        bias = mapped - binary.base_vaddr  # 0 for a build that is not position-independent
        self.pid = postmaster
        self.layout = layout
        self.waits = WAIT_EVENT_TYPES[layout.major]
        self._addresses = {name: bias + binary.objects[name] for name in GLOBALS}
        self.backends: dict[int, Backend] = {}
        self.query_size = _INT.unpack(
            read(postmaster, self._addresses["pgstat_track_activity_query_size"], 4)
        )[0]
        self._running = (layout.state_running, layout.state_fastpath)

    def children(self) -> set[int]:
        try:
            text = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        except OSError:
            return set()
        return {int(pid) for pid in text.split()}

    def alive(self) -> bool:
        return Path(f"/proc/{self.pid}").exists()

    def adopt(self, pid: int) -> Backend | None:
        """A child's entry and PGPROC addresses; None while it is starting (NULL)."""
        try:
            entry = read_pointer(pid, self._addresses["MyBEEntry"])
            proc = read_pointer(pid, self._addresses["MyProc"])
        except MemoryReadError:
            return None
        if not entry or not proc:
            return None
        backend = Backend(pid, entry, proc)
        self.backends[pid] = backend
        return backend

    def sample(self, backends: list[Backend]) -> Iterator[tuple[Backend, BackendSample | None]]:
        """Each backend's entry and wait word, read in one system call.

        None for an entry caught mid-write (odd or moving st_changecount) or taken by
        another process: look again next time.
        """
        layout = self.layout
        size = layout.backend_status_size
        ranges = []
        for backend in backends:
            ranges.append((backend.entry, size))
            ranges.append((backend.proc + layout.proc_wait_event_info, 4))
        raw = read_ranges(self.pid, ranges)
        for index, backend in enumerate(backends):
            yield backend, self._decode(backend.pid, raw[2 * index], raw[2 * index + 1])

    def read_entry(self, backend: Backend) -> BackendSample | None:
        """One entry again (its backend exited): None if another took the slot."""
        try:
            entry, wait = read_ranges(
                self.pid,
                [
                    (backend.entry, self.layout.backend_status_size),
                    (backend.proc + self.layout.proc_wait_event_info, 4),
                ],
            )
        except MemoryReadError:
            return None
        pid = _INT.unpack_from(entry, self.layout.st_procpid)[0]
        return self._decode(backend.pid, entry, wait) if pid in (0, backend.pid) else None

    def _decode(self, pid: int, entry: bytes, wait: bytes) -> BackendSample | None:
        layout = self.layout
        changecount = _INT.unpack_from(entry, layout.st_changecount)[0]
        procpid = _INT.unpack_from(entry, layout.st_procpid)[0]
        if changecount & 1 or procpid not in (0, pid):
            return None
        info = _UINT32.unpack(wait)[0]
        query_id = None
        if layout.st_query_id is not None:
            # Signed, as pg_stat_activity and pg_stat_statements show it (0: not computed).
            query_id = _INT64.unpack_from(entry, layout.st_query_id)[0] or None
        state = _INT.unpack_from(entry, layout.st_state)[0]
        return BackendSample(
            pid=pid,
            running=state in self._running,
            activity_start_us=_INT64.unpack_from(entry, layout.st_activity_start_timestamp)[0],
            state_start_us=_INT64.unpack_from(entry, layout.st_state_start_timestamp)[0],
            wait="CPU" if not info else self.waits.get(info & 0xFF000000, "???"),
            query_id=query_id,
            aborted=state == layout.state_idleintransaction_aborted,
        )

    def statement_text(self, backend: Backend, limit: int) -> tuple[bytes, bool] | None:
        """The running statement's full text from the backend itself: (text, cut)."""
        try:
            address = read_pointer(backend.pid, self._addresses["debug_query_string"])
            if not address:
                return None
            text = read_c_string(backend.pid, address, limit + 1)
        except MemoryReadError:
            return None
        return text[:limit], len(text) > limit

    def shared_text(self, backend: Backend) -> tuple[bytes, bool] | None:
        """PostgreSQL's own copy in shared memory, cut at track_activity_query_size."""
        try:
            entry = read(self.pid, backend.entry, self.layout.backend_status_size)
            address = _UINT64.unpack_from(entry, self.layout.st_activity_raw)[0]
            if not address:
                return None
            text = read_c_string(self.pid, address, self.query_size)
        except MemoryReadError:
            return None
        return text, len(text) >= self.query_size - 1

    def application_name(self, backend: Backend) -> str:
        try:
            entry = read(self.pid, backend.entry, self.layout.backend_status_size)
            address = _UINT64.unpack_from(entry, self.layout.st_appname)[0]
            name = read_c_string(self.pid, address, NAMEDATALEN) if address else b""
        except MemoryReadError:
            return ""
        return name.decode(errors="replace")

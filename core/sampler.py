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
from dataclasses import dataclass
from pathlib import Path

from pgslowlog.elf import FileIdentity, PostgresBinary
from pgslowlog.pg_layouts import WAIT_EVENT_TYPES, BackendStatusLayout
from pgslowlog.process_memory import (
    MemoryReadError,
    RangeReader,
    load_bias,
    read,
    read_c_string,
    read_pointer,
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
    proc_start_us: int  # st_proc_start_timestamp: tells its slot from a later owner's


# Per backend, in one system call: the change count, the entry, the wait word, the
# change count again. The kernel copies the ranges in order, so equal even counts
# around the copy mean no write ran during it (PostgreSQL's own reader does the same).
_RANGES_PER_BACKEND = 4
_BACKENDS_PER_READ = 1024 // _RANGES_PER_BACKEND


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
        self._readers: list[tuple[list[Backend], RangeReader]] = []
        self._reading: list[Backend] = []

    def children(self) -> set[int]:
        try:
            text = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        except OSError:
            return set()
        return {int(pid) for pid in text.split()}

    def still_child(self, pid: int) -> bool:
        """The children file may miss a running child (the kernel documents it as
        unreliable): ask the process itself before calling it gone."""
        return _parent(pid) == self.pid

    def adopt(self, pid: int) -> Backend | None:
        """A child's entry and PGPROC; None while it is starting (MyBEEntry still NULL,
        or the entry not yet filled in: it may still hold a former owner's data)."""
        try:
            entry = read_pointer(pid, self._addresses["MyBEEntry"])
            proc = read_pointer(pid, self._addresses["MyProc"])
            if not entry or not proc:
                return None
            data = read(self.pid, entry, self.layout.backend_status_size)
        except MemoryReadError:
            return None
        if _INT.unpack_from(data, self.layout.st_procpid)[0] != pid:
            return None
        started = _INT64.unpack_from(data, self.layout.st_proc_start_timestamp)[0]
        backend = Backend(pid, entry, proc, started)
        self.backends[pid] = backend
        return backend

    def sample(self, backends: list[Backend]) -> list[tuple[Backend, BackendSample | None]]:
        """Each backend's entry and wait word, read in one system call.

        None for an entry caught mid-write or no longer its backend's: look again next
        time. A range that cannot be read (a backend gone this instant) spoils the one
        call; then each is read on its own and the unreadable ones are dropped.
        """
        if self._reading != backends:
            # A system call takes at most 1024 ranges: 256 backends per reader.
            self._readers = [
                (chunk, RangeReader(self.pid, self._ranges(chunk)))
                for chunk in (
                    backends[at : at + _BACKENDS_PER_READ]
                    for at in range(0, len(backends), _BACKENDS_PER_READ)
                )
            ]
            self._reading = list(backends)
        looks: list[tuple[Backend, BackendSample | None]] = []
        for chunk, reader in self._readers:
            try:
                raw = reader.read()
            except MemoryReadError:
                self._reading = []  # build the readers again next time
                looks += [(backend, self.read_entry(backend, live=True)) for backend in chunk]
                continue
            offsets = reader.offsets
            looks += [
                (backend, self._decode(backend, raw, offsets[_RANGES_PER_BACKEND * index :]))
                for index, backend in enumerate(chunk)
            ]
        return looks

    def _ranges(self, backends: list[Backend]) -> list[tuple[int, int]]:
        layout = self.layout
        ranges = []
        for backend in backends:
            ranges += [
                (backend.entry + layout.st_changecount, 4),
                (backend.entry, layout.backend_status_size),
                (backend.proc + layout.proc_wait_event_info, 4),
                (backend.entry + layout.st_changecount, 4),
            ]
        return ranges

    def read_entry(self, backend: Backend, live: bool = False) -> BackendSample | None:
        """One backend's entry on its own: its last state after it exited (None if its
        slot has a new owner or cannot be read), or a live look."""
        try:
            raw = read(self.pid, backend.entry + self.layout.st_changecount, 4)
            raw += read(self.pid, backend.entry, self.layout.backend_status_size)
            raw += read(self.pid, backend.proc + self.layout.proc_wait_event_info, 4)
            raw += raw[:4]
        except MemoryReadError:
            return None
        size = self.layout.backend_status_size
        return self._decode(backend, raw, [0, 4, 4 + size, 8 + size], exited=not live)

    def _decode(
        self, backend: Backend, raw: bytes, at: list[int], exited: bool = False
    ) -> BackendSample | None:
        layout = self.layout
        entry = at[1]
        before = _INT.unpack_from(raw, at[0])[0]
        after = _INT.unpack_from(raw, at[3])[0]
        if before & 1 or before != after or _INT.unpack_from(raw, entry)[0] != before:
            return None  # written while copied
        procpid = _INT.unpack_from(raw, entry + layout.st_procpid)[0]
        started = _INT64.unpack_from(raw, entry + layout.st_proc_start_timestamp)[0]
        # An exited backend's slot keeps its last state until a new backend takes it
        # (st_procpid is 0 in between; the start of the process tells owners apart).
        if procpid != backend.pid and not (exited and procpid == 0):
            return None
        if started != backend.proc_start_us:
            return None
        info = _UINT32.unpack_from(raw, at[2])[0]
        query_id = None
        if layout.st_query_id is not None:
            # Signed, as pg_stat_activity and pg_stat_statements show it (0: not computed).
            query_id = _INT64.unpack_from(raw, entry + layout.st_query_id)[0] or None
        state = _INT.unpack_from(raw, entry + layout.st_state)[0]
        activity_at = entry + layout.st_activity_start_timestamp
        return BackendSample(
            pid=backend.pid,
            running=state in self._running,
            activity_start_us=_INT64.unpack_from(raw, activity_at)[0],
            state_start_us=_INT64.unpack_from(raw, entry + layout.st_state_start_timestamp)[0],
            wait="CPU" if not info else self.waits.get(info & 0xFF000000, "???"),
            query_id=query_id,
            aborted=state == layout.state_idleintransaction_aborted,
            client=_INT.unpack_from(raw, entry + layout.st_backendType)[0] == layout.b_backend,
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

    def shared_text(self, backend: Backend, start_us: int) -> tuple[bytes, bool] | None:
        """PostgreSQL's own copy in shared memory, cut at track_activity_query_size, if
        it is still that of the statement that began at `start_us`."""
        layout = self.layout
        try:
            entry = read(self.pid, backend.entry, layout.backend_status_size)
            if _INT64.unpack_from(entry, layout.st_activity_start_timestamp)[0] != start_us:
                return None
            address = _UINT64.unpack_from(entry, layout.st_activity_raw)[0]
            if not address:
                return None
            text = read_c_string(self.pid, address, self.query_size)
        except MemoryReadError:
            return None
        return text, len(text) >= self.query_size - 1

    def activity_start(self, backend: Backend) -> int | None:
        try:
            entry = read(self.pid, backend.entry, self.layout.backend_status_size)
        except MemoryReadError:
            return None
        return _INT64.unpack_from(entry, self.layout.st_activity_start_timestamp)[0]

    def application_name(self, backend: Backend) -> str:
        try:
            entry = read(self.pid, backend.entry, self.layout.backend_status_size)
            address = _UINT64.unpack_from(entry, self.layout.st_appname)[0]
            name = read_c_string(self.pid, address, NAMEDATALEN) if address else b""
        except MemoryReadError:
            return ""
        return name.decode(errors="replace")

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
from collections.abc import Set as AbstractSet
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


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (which may hold spaces): state, ppid, ..."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def _parent(pid: int) -> int:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else 0


@dataclass
class Backend:
    pid: int
    entry: int  # its PgBackendStatus, in shared memory
    proc: int  # its PGPROC, in shared memory
    proc_start_us: int  # st_proc_start_timestamp: tells its slot from a later owner's


# One system call per look copies three blocks: every backend's entry (the entries
# are one array in shared memory, so one range covers them), every PGPROC's wait word
# (also one array), then the entries again. An entry whose change count is even and
# the same in both copies was not written while the first copy was taken (PostgreSQL's
# own readers check the count the same way). Few large ranges: the kernel's cost is
# per range, not per byte.
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
        self._plan: tuple[RangeReader, list[int], list[int], list[int]] | None = None
        self._reading: list[Backend] = []
        self._last_count: dict[int, bytes] = {}  # pid -> st_changecount at its last look

    def children(self) -> set[int]:
        try:
            text = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        except OSError:
            return set()
        return {int(pid) for pid in text.split()}

    def still_child(self, pid: int) -> bool:
        """The children file may miss a running child (the kernel documents it as
        unreliable): ask the process itself before calling it gone. An exited child
        the postmaster has not reaped yet (a zombie) is gone: its slot is free to reuse."""
        fields = _stat_fields(pid)
        return fields is not None and fields[0] != "Z" and int(fields[1]) == self.pid

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

    def sample(
        self, backends: list[Backend], watch: AbstractSet[int]
    ) -> list[tuple[Backend, BackendSample | None]]:
        """The backends whose entry changed since the last look, and those in `watch`
        (running statements, whose wait word matters at every look), read in one
        system call.

        An entry that did not change is skipped before any decoding: most backends are
        idle most of the time, and PostgreSQL bumps st_changecount at every write.
        None for an entry caught mid-write or no longer its backend's: look again next
        time. A range that cannot be read (a backend gone this instant) spoils the one
        call; then each is read on its own.
        """
        if self._reading != backends:
            self._plan = self._blocks(backends) if backends else None
            self._reading = list(backends)
        if self._plan is None:
            return []
        reader, entry_at, wait_at, second_at = self._plan
        try:
            raw = reader.read()
        except MemoryReadError:
            self._reading = []  # plan again next time
            return [(backend, self.read_entry(backend, live=True)) for backend in backends]
        looks: list[tuple[Backend, BackendSample | None]] = []
        last = self._last_count
        for backend, entry, wait, second in zip(
            backends, entry_at, wait_at, second_at, strict=True
        ):
            count = bytes(raw[entry : entry + 4])
            if last.get(backend.pid) == count and backend.pid not in watch:
                continue
            before = entry + self.layout.st_changecount
            sample = self._decode(backend, raw, [before, entry, wait, second])
            if sample is not None:
                last[backend.pid] = count
            looks.append((backend, sample))
        return looks

    def _blocks(
        self, backends: list[Backend]
    ) -> tuple[RangeReader, list[int], list[int], list[int]]:
        """The reader of the three blocks, and where each backend's entry, wait word and
        second change count sit in what it reads."""
        layout = self.layout
        low = min(b.entry for b in backends)
        high = max(b.entry for b in backends) + layout.backend_status_size
        waits = [b.proc + layout.proc_wait_event_info for b in backends]
        wait_low, wait_high = min(waits), max(waits) + 4
        reader = RangeReader(
            self.pid, [(low, high - low), (wait_low, wait_high - wait_low), (low, high - low)]
        )
        first, wait_block, second = reader.offsets
        entry_at = [first + b.entry - low for b in backends]
        wait_at = [wait_block + address - wait_low for address in waits]
        second_at = [second + b.entry - low + layout.st_changecount for b in backends]
        return reader, entry_at, wait_at, second_at

    def forget(self, pid: int) -> None:
        self.backends.pop(pid, None)
        self._last_count.pop(pid, None)

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
        self, backend: Backend, raw: bytes | memoryview, at: list[int], exited: bool = False
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

    def _entry(self, backend: Backend) -> bytes | None:
        """The backend's whole entry, read now (no change count check: one field's use)."""
        try:
            return read(self.pid, backend.entry, self.layout.backend_status_size)
        except MemoryReadError:
            return None

    def shared_text(self, backend: Backend, start_us: int) -> tuple[bytes, bool] | None:
        """PostgreSQL's own copy in shared memory, cut at track_activity_query_size, if
        it is still that of the statement that began at `start_us`."""
        layout = self.layout
        entry = self._entry(backend)
        if entry is None:
            return None
        if _INT64.unpack_from(entry, layout.st_activity_start_timestamp)[0] != start_us:
            return None
        address = _UINT64.unpack_from(entry, layout.st_activity_raw)[0]
        if not address:
            return None
        try:
            text = read_c_string(self.pid, address, self.query_size)
        except MemoryReadError:
            return None
        return text, len(text) >= self.query_size - 1

    def activity_start(self, backend: Backend) -> int | None:
        entry = self._entry(backend)
        if entry is None:
            return None
        return _INT64.unpack_from(entry, self.layout.st_activity_start_timestamp)[0]

    def application_name(self, backend: Backend) -> str:
        entry = self._entry(backend)
        address = _UINT64.unpack_from(entry, self.layout.st_appname)[0] if entry else 0
        try:
            name = read_c_string(self.pid, address, NAMEDATALEN) if address else b""
        except MemoryReadError:
            return ""
        return name.decode(errors="replace")

"""One look at a cluster: PostgreSQL's own bookkeeping, read from outside.

Every backend keeps its pg_stat_activity entry (PgBackendStatus, found through the
exported MyBEEntry) and its PGPROC (MyProc, whose wait_event_info says what it waits
on) in shared memory, mapped at the same address in every process of the cluster.
So each look reads every backend's entry and wait word through the postmaster: its
segment mapped read-only into the daemon, or copied by one process_vm_readv where it
must not be mapped; the StatementTracker (statements.py) turns the looks into
statements. The running statement's full text comes from the backend's own
debug_query_string, read once when the statement is old enough to matter;
PostgreSQL's copy in shared memory (cut at track_activity_query_size) is the fallback.

A backend whose MyBEEntry is still NULL is starting up: it is asked again at the
next look, never cached as NULL.
"""

from __future__ import annotations

import functools
import struct
import time
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from itertools import compress
from operator import ne
from typing import Any

from pgslowlog.containers import inner_pid
from pgslowlog.elf import PostgresBinary
from pgslowlog.pg_layouts import SAMPLER_GLOBALS, USAGE_GLOBALS, BackendStatusLayout
from pgslowlog.pg_wait_events import wait_event_name
from pgslowlog.process_memory import (
    MemoryReadError,
    NotShareable,
    RangeReader,
    SharedMapping,
    load_bias,
    read,
    read_c_string,
    read_pointer,
    read_ranges,
)
from pgslowlog.sampled.blockers import LockReader, Proc
from pgslowlog.sampled.pg_time import pg_now_us
from pgslowlog.sampled.procfs import children_of, is_child
from pgslowlog.sampled.resources import UsageReader
from pgslowlog.sampled.statements import BackendSample

NAMEDATALEN = 64
_INT = struct.Struct("<i")
_INT64 = struct.Struct("<q")
_UINT32 = struct.Struct("<I")
_UINT64 = struct.Struct("<Q")


class ClusterStarting(MemoryReadError):
    """The postmaster has not sized its shared memory yet: ask again soon."""


@dataclass
class SampledBackend:
    """A backend the looks follow: where its entry and PGPROC are."""

    pid: int
    entry: int  # its PgBackendStatus, in shared memory
    proc: int  # its PGPROC, in shared memory
    proc_start_us: int  # st_proc_start_timestamp: tells its slot from a later owner's
    slot: int | None = None  # its index in BackendStatusArray; None: an auxiliary process
    inner: int | None = None  # its pid in the server's pid namespace, where that is not ours
    # The pid PostgreSQL itself reports (pg_stat_activity, its log): `pid` on the host.
    # Set once: it is compared at every look.
    own_pid: int = field(init=False)

    def __post_init__(self) -> None:
        self.own_pid = self.pid if self.inner is None else self.inner


@dataclass
class Look:
    """What one look at a cluster found."""

    samples: list[tuple[SampledBackend, BackendSample | None]] = field(default_factory=list)
    appeared: list[SampledBackend] = field(default_factory=list)
    # Backends whose slot was given up or taken over, with the slot's last state if it
    # still was theirs (PostgreSQL clears only st_procpid when a backend exits).
    gone: list[tuple[SampledBackend, BackendSample | None]] = field(default_factory=list)


# A look reads every slot's change count and compares them with the last look's in C
# (a strided memoryview): an idle backend costs no Python at all. A slot that changed
# is decoded; that is how new backends (a pid in a slot nobody owned) and exits
# (st_procpid cleared) are found, within one look, with no /proc scan. A slot whose
# change count is even and the same before and after its entry was copied was not
# written meanwhile (PostgreSQL's own readers check the count the same way).
#
# Where the counts come from: the shared memory segment mapped read-only into the
# daemon (process_memory.SharedMapping), so a look with nothing new is a few
# microseconds of reading memory and no system call; or, where the segment cannot be
# mapped (no CAP_SYS_ADMIN), copies: one process_vm_readv of the array, the array
# again, and the span of PGPROCs that holds every known backend's wait word.
MAPPING_CHECK_S = 0.1  # how often a look asks whether the postmaster still maps it


class _Array:
    """Where a look finds the status array: `ints` and `longs`, views of it whose
    strided slices give one field of every slot (`fields`)."""

    ints: memoryview
    longs: memoryview

    def __init__(self, count: int, layout: BackendStatusLayout) -> None:
        self._size = size = layout.backend_status_size
        self._span = count * size
        self._count_at = layout.st_changecount
        self._pid_at, self._start_at = layout.st_procpid, layout.st_proc_start_timestamp

        def field(offset: int, width: int) -> slice:
            return slice(offset // width, self._span // width, size // width)

        self._counts = field(layout.st_changecount, 4)
        self._pids = field(layout.st_procpid, 4)
        self._starts = field(layout.st_proc_start_timestamp, 8)
        self._states = field(layout.st_state, 4)
        self._activity = field(layout.st_activity_start_timestamp, 8)

    def counts(self) -> list[int]:
        """Every slot's change count: a slot not written since the last look has the same."""
        found: list[int] = self.ints[self._counts].tolist()
        return found

    def fields(self) -> tuple[list[int], list[int], list[int], list[int]]:
        """Every slot's st_procpid, st_proc_start_timestamp, st_state and
        st_activity_start_timestamp, as they are (unchecked: to choose what to decode)."""
        ints, longs = self.ints, self.longs
        return (
            ints[self._pids].tolist(),
            longs[self._starts].tolist(),
            ints[self._states].tolist(),
            longs[self._activity].tolist(),
        )

    def owner(self, slot: int) -> tuple[int, int]:
        """(st_procpid, st_proc_start_timestamp) of a slot, as they are."""
        at = slot * self._size
        return self.ints[(at + self._pid_at) // 4], self.longs[(at + self._start_at) // 8]

    def count(self, slot: int) -> int:
        """The slot's change count, as the entry's copy shows it."""
        found: int = self.ints[(slot * self._size + self._count_at) // 4]
        return found


class _MappedArray(_Array):
    """The status array and the PGPROCs, read in place from the mapped segment."""

    def __init__(
        self, mapping: SharedMapping, base: int, count: int, layout: BackendStatusLayout
    ) -> None:
        super().__init__(count, layout)
        self.mapping = mapping
        at = base - mapping.start  # the array's offset in the mapping
        self._bytes = mapping.view[at : at + self._span]
        self.ints = self._bytes.cast("i")
        self.longs = self._bytes.cast("q")
        self._words = mapping.view.cast("I")
        self._wait_offset = layout.proc_wait_event_info - mapping.start

    def refresh(self) -> None:
        pass  # the views are the memory itself

    def entry(self, slot: int) -> bytes:
        return self._bytes[slot * self._size : (slot + 1) * self._size].tobytes()

    def count_after(self, slot: int) -> int:
        return self.count(slot)  # read again, now

    def wait(self, slot: int, backend: SampledBackend) -> int:
        word: int = self._words[(backend.proc + self._wait_offset) // 4]
        return word

    def owners_changed(self, slots: dict[int, SampledBackend]) -> None:
        pass  # each wait word is read where it is

    def close(self) -> None:
        for view in (self.ints, self.longs, self._bytes, self._words):
            view.release()
        self.mapping.close()


class _CopiedArray(_Array):
    """The status array twice and the owners' PGPROCs, copied by one process_vm_readv."""

    def __init__(self, pid: int, base: int, count: int, layout: BackendStatusLayout) -> None:
        super().__init__(count, layout)
        self._pid, self._base, self._layout = pid, base, layout
        self._raw = memoryview(b"")
        self._reader: RangeReader | None = None
        self._wait_at: dict[int, int] = {}  # slot -> offset of its wait word in a copy
        self._slots: dict[int, SampledBackend] = {}

    def owners_changed(self, slots: dict[int, SampledBackend]) -> None:
        self._slots = slots
        self._reader = None  # the span of PGPROCs to read changed

    def _plan(self) -> RangeReader:
        ranges = [(self._base, self._span), (self._base, self._span)]
        self._wait_at = {}
        if self._slots:
            offset = self._layout.proc_wait_event_info
            waits = {slot: b.proc + offset for slot, b in self._slots.items()}
            low, high = min(waits.values()), max(waits.values()) + 4
            ranges.append((low, high - low))
            self._wait_at = {s: 2 * self._span + address - low for s, address in waits.items()}
        reader = RangeReader(self._pid, ranges)
        self._raw = reader.read()
        self._reader = reader  # once read: the views below are of its buffer
        self.ints = self._raw[: self._span].cast("i")
        self.longs = self._raw[: self._span].cast("q")
        self._second = self._raw[self._span : 2 * self._span].cast("i")
        return self._reader

    def refresh(self) -> None:
        if self._reader is None:
            self._plan()  # (reads too)
        else:
            self._reader.read()  # into the same buffer, under the same views

    def entry(self, slot: int) -> memoryview:
        return self._raw[slot * self._size : (slot + 1) * self._size]

    def count_after(self, slot: int) -> int:
        found: int = self._second[(slot * self._size + self._count_at) // 4]
        return found

    def wait(self, slot: int, backend: SampledBackend) -> int:
        word: int = _UINT32.unpack_from(self._raw, self._wait_at[slot])[0]
        return word

    def close(self) -> None:
        pass


class ClusterMemory:
    """One postmaster and its children, read through the postmaster's address space."""

    def __init__(
        self,
        postmaster: int,
        binary: PostgresBinary,
        inode: int,
        layout: BackendStatusLayout,
        foreign: bool = False,
    ) -> None:
        mapped = load_bias(postmaster, inode)
        if mapped is None:
            raise MemoryReadError(0, f"pid {postmaster} does not map the binary")
        bias = mapped - binary.base_vaddr  # 0 for a build that is not position-independent
        self.pid = postmaster
        self.layout = layout
        self._addresses = {name: bias + binary.objects[name] for name in SAMPLER_GLOBALS}
        self.backends: dict[int, SampledBackend] = {}
        self.query_size = _INT.unpack(
            read(postmaster, self._addresses["pgstat_track_activity_query_size"], 4)
        )[0]
        # Slots of backends that have a BackendId / ProcNumber: client backends, workers,
        # walsenders (auxiliary processes come after them and run no statements).
        self.slot_count = _INT.unpack(read(postmaster, self._addresses["MaxBackends"], 4))[0]
        if self.slot_count <= 0:
            raise ClusterStarting(0, f"postmaster {postmaster} is starting")
        self.base: int | None = None  # BackendStatusArray: known once a backend tells it
        self.lost = False  # its memory could not be read at the last look
        self.slots: dict[int, SampledBackend] = {}
        self._running = (layout.state_running, layout.state_fastpath)
        # How the looks read the array: set once its place is known.
        self._array: _MappedArray | _CopiedArray | None = None
        self.reading: str | None = None  # "mapped" or "copied", and why copied
        self._mapping_checked = time.monotonic()
        self._last_counts: list[int] = []  # every slot's change count at the last look
        self._young = False  # the last look saw a statement too young to follow yet
        # Per slot, its owner (st_procpid, st_proc_start_timestamp) at the last look.
        self._last_pids: list[int] = [0] * self.slot_count
        self._last_starts: list[int] = [0] * self.slot_count
        self._strangers: dict[int, int] = {}  # slot -> start of a process that is not ours
        self.unmatched = 0  # slots whose process could not be found as a child
        # A server in another pid namespace (a container) writes its own pids into its
        # slots: they are mapped to ours through the children's NSpid lines.
        self.foreign = foreign
        self._host_pids: dict[int, int] = {}  # its pid -> ours, for its children
        # Why a statement was slow: the lock table (shared, read through the
        # postmaster) and each backend's own counters (at the same address in all).
        self.locks = LockReader(postmaster, layout)
        self._by_proc: dict[int, SampledBackend] | None = None  # PGPROC -> backend
        self.usage: UsageReader | None = None
        if all(name in binary.objects for name in USAGE_GLOBALS):
            buffers, wal = (bias + binary.objects[name] for name in USAGE_GLOBALS)
            self.usage = UsageReader(layout, buffers, wal)
        # Names of the wait words seen: a few dozen at most, and one is needed per sample.
        self._wait_name = functools.lru_cache(maxsize=1024)(
            functools.partial(wait_event_name, layout.major)
        )
        self._state_names = {
            value: name
            for value, name in (
                (layout.state_starting, "starting"),
                (layout.state_idle, "idle"),
                (layout.state_running, "active"),
                (layout.state_idleintransaction, "idle in transaction"),
                (layout.state_fastpath, "fastpath function call"),
                (layout.state_idleintransaction_aborted, "idle in transaction (aborted)"),
                (layout.state_disabled, "disabled"),
            )
            if value is not None
        }

    def children(self) -> set[int]:
        return children_of(self.pid)

    def host_pid(self, own_pid: int) -> int | None:
        """Our pid of the child PostgreSQL calls `own_pid`; None if no child is."""
        if not self.foreign:
            return own_pid
        host = self._host_pids.get(own_pid)
        if host is not None and inner_pid(host) == own_pid:
            return host  # (the caller asks whether it is still a child)
        # A child not mapped yet (or a pid reused): map the children not known, and
        # forget those gone.
        alive = self.children()
        self._host_pids = {k: v for k, v in self._host_pids.items() if v in alive}
        for child in alive - set(self._host_pids.values()):
            if (inner := inner_pid(child)) is not None:
                self._host_pids[inner] = child
        return self._host_pids.get(own_pid)

    def still_child(self, pid: int) -> bool:
        """The children file may miss a running child (the kernel documents it as
        unreliable): ask the process itself before calling it gone."""
        return is_child(pid, self.pid)

    def adopt(self, pid: int) -> SampledBackend | None:
        """A child's entry and PGPROC; None while it is starting (MyBEEntry still NULL,
        or the entry not yet filled in: it may still hold a former owner's data)."""
        layout = self.layout
        inner = inner_pid(pid) if self.foreign else None
        if self.foreign and inner is None:
            return None  # gone
        own = pid if inner is None else inner
        try:
            entry = read_pointer(pid, self._addresses["MyBEEntry"])
            proc = read_pointer(pid, self._addresses["MyProc"])
            if not entry or not proc:
                return None
            data = read(self.pid, entry, layout.backend_status_size)
            number = _INT.unpack(read(self.pid, proc + self._proc_number_offset, 4))[0]
        except MemoryReadError:
            return None
        if _INT.unpack_from(data, layout.st_procpid)[0] != own:
            return None
        if inner is not None:
            self._host_pids[inner] = pid
        started = _INT64.unpack_from(data, layout.st_proc_start_timestamp)[0]
        # MyBEEntry is BackendStatusArray[MyBackendId - 1] (13-16), [MyProcNumber] (17+).
        slot = number - 1 if layout.proc_backendId is not None else number
        if not 0 <= slot < self.slot_count:
            slot = None  # an auxiliary process (no BackendId before 17)
        elif self.base is None:
            self.base = entry - slot * layout.backend_status_size
            self._array = self._open_array(self.base, proc)
        elif entry != self.base + slot * layout.backend_status_size:
            return None  # not where its number says: torn, or not what we think it is
        backend = SampledBackend(pid, entry, proc, started, slot, inner)
        self.backends[pid] = backend
        self._by_proc = None
        if slot is not None:
            self._own(slot, backend)
        return backend

    @property
    def _proc_number_offset(self) -> int:
        offset = self.layout.proc_backendId
        if offset is None:
            offset = self.layout.proc_procNumber
        assert offset is not None  # every layout has one of the two
        return offset

    def _open_array(self, base: int, proc: int) -> _MappedArray | _CopiedArray:
        try:
            mapping = SharedMapping(self.pid, base)
        except NotShareable as why:
            self.reading = f"copied: {why}"
            return _CopiedArray(self.pid, base, self.slot_count, self.layout)
        span = self.slot_count * self.layout.backend_status_size
        if not (mapping.start <= proc < mapping.end and base + span <= mapping.end):
            mapping.close()  # never seen: PGPROCs live in the same segment as the array
            self.reading = "copied: the array and the PGPROCs are not in one segment"
            return _CopiedArray(self.pid, base, self.slot_count, self.layout)
        self.reading = "mapped"
        return _MappedArray(mapping, base, self.slot_count, self.layout)

    def close(self) -> None:
        """Unmap the segment (a postmaster gone or reset: its memory lives while mapped)."""
        if self._array is not None:
            self._array.close()
            self._array = None

    def _own(self, slot: int, backend: SampledBackend) -> None:
        if (former := self.slots.get(slot)) is not None and former is not backend:
            self.backends.pop(former.pid, None)
            self._by_proc = None
        self.slots[slot] = backend
        if self._array is not None:
            self._array.owners_changed(self.slots)

    def look(self, watch: AbstractSet[int], old_since_us: int) -> Look:
        """The backends that started or exited since the last look, those running a
        statement that began at or before `old_since_us` (PostgreSQL's clock), and the
        backends in `watch` (running statements, whose wait word matters at every look).
        A statement younger than that is not decoded: a busy server's thousands of short
        statements cost a look no Python.

        An entry caught mid-write is passed over: the next look decodes it again (its
        owner is not taken as seen). A sample is None when the entry is not its
        backend's any more (read_entry of a new backend). Nothing is found while the
        status array's place is unknown (no backend with a slot adopted yet), or when
        the postmaster's memory cannot be read or is no longer its own (it is gone, or
        made anew after a crash: discovery drops it and finds its successor).
        """
        found = Look()
        array = self._array
        if array is None or self._check_mapping():
            return found
        try:
            array.refresh()
        except MemoryReadError:
            self.lost = True
            return found
        counts = array.counts()
        if counts == self._last_counts and not watch and not self._young:
            # No slot written since the last look, and no statement that was too young
            # to follow then: idle backends, the usual look.
            return found
        self._last_counts = counts
        pids, starts, states, activity = array.fields()
        # What to decode: slots whose owner changed (a backend started or exited), the
        # running statements old enough to follow, and those followed already.
        changed = set(compress(range(self.slot_count), map(ne, pids, self._last_pids)))
        changed.update(compress(range(self.slot_count), map(ne, starts, self._last_starts)))
        self._young = False  # a running statement to follow at a later look
        for slot in compress(range(self.slot_count), map(self._running.__contains__, states)):
            if 0 < activity[slot] <= old_since_us:
                changed.add(slot)
            else:
                self._young = True
        for pid in watch:
            if (followed := self.backends.get(pid)) is not None and followed.slot is not None:
                changed.add(followed.slot)
        layout = self.layout
        for slot in sorted(changed):
            entry = array.entry(slot)
            count = _INT.unpack_from(entry, layout.st_changecount)[0]
            if count & 1 or count != array.count_after(slot):
                counts[slot] = -1  # written while copied: look again next time
                continue
            owner = self.slots.get(slot)
            procpid = _INT.unpack_from(entry, layout.st_procpid)[0]
            started = _INT64.unpack_from(entry, layout.st_proc_start_timestamp)[0]
            if owner is not None and (procpid != owner.own_pid or started != owner.proc_start_us):
                last = None
                if procpid == 0 and started == owner.proc_start_us:
                    last = self._decode(owner, entry, array.wait(slot, owner), exited=True)
                found.gone.append((owner, last))
                self.forget(owner.pid)
                owner = None
            if owner is None and procpid and self._strangers.get(slot) != started:
                host = self.host_pid(procpid)
                if host is None or not self.still_child(host):
                    # Not a child of this postmaster that we can find: counted (the
                    # source warns), asked again only when another process takes the slot.
                    self._strangers[slot] = started
                    self.unmatched += 1
                elif (owner := self.adopt(host)) is None:
                    counts[slot] = -1  # still starting: next look
                    continue
                else:
                    found.appeared.append(owner)
                    found.samples.append((owner, self.read_entry(owner, live=True)))
            elif owner is not None:
                state = _INT.unpack_from(entry, layout.st_state)[0]
                if state in self._running or owner.pid in watch:
                    sample = self._decode(owner, entry, array.wait(slot, owner))
                    found.samples.append((owner, sample))
                # else: idle with nothing in flight, the most common change: nothing to follow
            self._last_pids[slot], self._last_starts[slot] = procpid, started
        return found

    def _check_mapping(self) -> bool:
        """Whether the mapped segment is no longer the postmaster's (asked every
        MAPPING_CHECK_S): a copy would fail to read then, a mapping reads on."""
        if not isinstance(self._array, _MappedArray):
            return False
        now = time.monotonic()
        if now < self._mapping_checked + MAPPING_CHECK_S:
            return False
        self._mapping_checked = now
        if self._array.mapping.current():
            return False
        self.lost = True
        return True

    def forget(self, pid: int) -> None:
        backend = self.backends.pop(pid, None)
        self._by_proc = None
        if backend is not None and backend.slot is not None:
            if self.slots.get(backend.slot) is backend:
                del self.slots[backend.slot]
                if self._array is not None:
                    self._array.owners_changed(self.slots)

    def read_entry(self, backend: SampledBackend, live: bool = False) -> BackendSample | None:
        """One backend's entry on its own: its last state after it exited (None if its
        slot has a new owner or cannot be read), or a live look."""
        layout = self.layout
        try:
            entry, before, wait, after = read_ranges(
                self.pid,
                [
                    (backend.entry, layout.backend_status_size),
                    (backend.entry + layout.st_changecount, 4),
                    (backend.proc + layout.proc_wait_event_info, 4),
                    (backend.entry + layout.st_changecount, 4),
                ],
            )
        except MemoryReadError:
            return None
        count = _INT.unpack_from(entry, layout.st_changecount)[0]
        if count & 1 or not before == after == count.to_bytes(4, "little", signed=True):
            return None  # written while copied
        return self._decode(backend, entry, _UINT32.unpack(wait)[0], exited=not live)

    def _decode(
        self, backend: SampledBackend, raw: bytes | memoryview, info: int, exited: bool = False
    ) -> BackendSample | None:
        """A backend's sample from a copy of its entry that was not written while
        copied (the caller checked its change count), and its wait word."""
        layout = self.layout
        procpid = _INT.unpack_from(raw, layout.st_procpid)[0]
        started = _INT64.unpack_from(raw, layout.st_proc_start_timestamp)[0]
        # An exited backend's slot keeps its last state until a new backend takes it
        # (st_procpid is 0 in between; the start of the process tells owners apart).
        if procpid != backend.own_pid and not (exited and procpid == 0):
            return None
        if started != backend.proc_start_us:
            return None
        query_id = None
        if layout.st_query_id is not None:
            # Signed, as pg_stat_activity and pg_stat_statements show it (0: not computed).
            query_id = _INT64.unpack_from(raw, layout.st_query_id)[0] or None
        state = _INT.unpack_from(raw, layout.st_state)[0]
        return BackendSample(
            pid=backend.pid,
            running=state in self._running,
            activity_start_us=_INT64.unpack_from(raw, layout.st_activity_start_timestamp)[0],
            state_start_us=_INT64.unpack_from(raw, layout.st_state_start_timestamp)[0],
            wait=self._wait_name(info),
            query_id=query_id,
            aborted=state == layout.state_idleintransaction_aborted,
            client=_INT.unpack_from(raw, layout.st_backendType)[0] == layout.b_backend,
        )

    def statement_text(self, backend: SampledBackend, limit: int) -> tuple[bytes, bool] | None:
        """The running statement's full text from the backend itself: (text, cut).
        Each read by pid is preceded by a look at its slot (owns_slot)."""
        try:
            if not self.owns_slot(backend):
                return None
            address = read_pointer(backend.pid, self._addresses["debug_query_string"])
            if not address:
                return None
            text = read_c_string(backend.pid, address, limit + 1, lambda: self.owns_slot(backend))
        except MemoryReadError:
            return None
        return text[:limit], len(text) > limit

    def _entry(self, backend: SampledBackend) -> bytes | None:
        """The backend's whole entry, read now (no change count check: one field's use)."""
        try:
            return read(self.pid, backend.entry, self.layout.backend_status_size)
        except MemoryReadError:
            return None

    def shared_text(self, backend: SampledBackend, start_us: int) -> tuple[bytes, bool] | None:
        """PostgreSQL's own copy in shared memory, cut at track_activity_query_size, if
        it is still that of the statement that began at `start_us`."""
        layout = self.layout
        entry = self._entry(backend)
        if entry is None:
            return None
        if _INT64.unpack_from(entry, layout.st_activity_start_timestamp)[0] != start_us:
            return None
        return self._activity_copy(entry)

    def _activity_copy(self, entry: bytes) -> tuple[bytes, bool] | None:
        """The text an entry's st_activity_raw points at, and whether it was cut."""
        address = _UINT64.unpack_from(entry, self.layout.st_activity_raw)[0]
        if not address:
            return None
        try:
            text = read_c_string(self.pid, address, self.query_size)
        except MemoryReadError:
            return None
        return text, len(text) >= self.query_size - 1

    def owns_slot(self, backend: SampledBackend) -> bool:
        """Whether `backend` still holds its slot, read now (st_procpid and
        st_proc_start_timestamp). Asked before every read of a backend's own memory or
        /proc files by its pid: PostgreSQL clears st_procpid before the process exits,
        so while the slot names it, the pid is its own and not a later process's. From
        the mapped segment, a few memory reads."""
        layout = self.layout
        if isinstance(self._array, _MappedArray) and backend.slot is not None:
            return self._array.owner(backend.slot) == (backend.own_pid, backend.proc_start_us)
        size = max(layout.st_procpid + 4, layout.st_proc_start_timestamp + 8)
        try:
            data = read(self.pid, backend.entry, size)
        except MemoryReadError:
            return False
        started: int = _INT64.unpack_from(data, layout.st_proc_start_timestamp)[0]
        procpid: int = _INT.unpack_from(data, layout.st_procpid)[0]
        return procpid == backend.own_pid and started == backend.proc_start_us

    def activity_start(self, backend: SampledBackend) -> int | None:
        entry = self._entry(backend)
        if entry is None:
            return None
        start: int = _INT64.unpack_from(entry, self.layout.st_activity_start_timestamp)[0]
        return start

    def application_name(self, backend: SampledBackend) -> str:
        entry = self._entry(backend)
        address = _UINT64.unpack_from(entry, self.layout.st_appname)[0] if entry else 0
        try:
            name = read_c_string(self.pid, address, NAMEDATALEN) if address else b""
        except MemoryReadError:
            return ""
        return name.decode(errors="replace")

    def backend_at(self, proc: int) -> SampledBackend | None:
        """The followed backend whose PGPROC is at `proc`."""
        if self._by_proc is None:
            self._by_proc = {backend.proc: backend for backend in self.backends.values()}
        return self._by_proc.get(proc)

    def describe(self, proc: Proc) -> dict[str, Any]:
        """A lock holder as pg_stat_activity shows it: its state, its current or last
        statement (PostgreSQL's copy, cut at track_activity_query_size), and how long
        its transaction has been open. Nulls for a prepared transaction (no backend)
        and for a process this cluster's looks do not follow."""
        nothing: dict[str, Any] = {"state": None, "query": None, "xact_age_s": None}
        backend = self.backend_at(proc.address) if proc.pid else None
        if backend is None:
            return nothing
        layout = self.layout
        # The state and the text from one moment: the backend writes both between two
        # steps of st_changecount, so a count that moved while they were read (the
        # holder began its COMMIT) means read again.
        for _ in range(3):
            entry = self._entry(backend)
            if entry is None or _INT.unpack_from(entry, layout.st_procpid)[0] != proc.pid:
                return nothing  # its slot moved on meanwhile
            count = _INT.unpack_from(entry, layout.st_changecount)[0]
            found = dict(nothing)
            found["state"] = self._state_names.get(_INT.unpack_from(entry, layout.st_state)[0])
            if (copy := self._activity_copy(entry)) is not None:
                found["query"] = copy[0].decode(errors="replace")
                found["query_truncated"] = copy[1]
            xact_start = _INT64.unpack_from(entry, layout.st_xact_start_timestamp)[0]
            if xact_start:
                found["xact_age_s"] = round((pg_now_us() - xact_start) / 1e6, 3)
            if count % 2 == 0 and self._count_now(backend) == count:
                return found
        return nothing  # written to all the while: nothing consistent to say

    def _count_now(self, backend: SampledBackend) -> int | None:
        try:
            data = read(self.pid, backend.entry + self.layout.st_changecount, 4)
        except MemoryReadError:
            return None
        count: int = _INT.unpack_from(data, 0)[0]
        return count

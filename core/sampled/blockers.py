"""Who blocks a backend that waits on a heavyweight lock, read from shared memory.

pg_blocking_pids() answers the same question inside the server, taking every lock
partition's LWLock to do it. This reads the same structures from outside and takes
no lock at all:
- the waiter's PGPROC says which LOCK it sleeps on (waitLock) and in which mode
  (waitLockMode);
- the LOCK's procLocks list holds a PROCLOCK per process that holds or awaits it: one
  whose holdMask conflicts with the waited mode (the lock method's conflict table)
  blocks it ("hard"); one ahead of it in the LOCK's wait queue (waitProcs) that awaits
  a conflicting mode blocks it too ("soft");
- members of the waiter's own lock group (a parallel query's leader and workers) never
  block it;
- a prepared transaction holds its locks through a PGPROC of pid 0.
Then each blocker that waits itself is asked the same, up to the chain's roots.

The lists change under us: every walk is capped, and the waiter is read again after
the walk; a walk that saw its waiter move on is thrown away (the caller keeps the last
good one).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

from pgslowlog.pg_layouts import BackendStatusLayout
from pgslowlog.process_memory import MemoryReadError, Peeker

# lockdefs.h: the modes, numbered 1-8, as pg_locks.mode names them.
LOCK_MODES = (
    "NoLock",
    "AccessShareLock",
    "RowShareLock",
    "RowExclusiveLock",
    "ShareUpdateExclusiveLock",
    "ShareLock",
    "ShareRowExclusiveLock",
    "ExclusiveLock",
    "AccessExclusiveLock",
)


def _bits(*modes: int) -> int:
    return sum(1 << mode for mode in modes)


# lock.c LockConflicts, the table of both lock methods (DEFAULT and USER, i.e.
# advisory locks): for each mode, the modes it conflicts with. Unchanged since 8.2.
CONFLICTS = (
    0,
    _bits(8),
    _bits(7, 8),
    _bits(5, 6, 7, 8),
    _bits(4, 5, 6, 7, 8),
    _bits(3, 4, 6, 7, 8),
    _bits(3, 4, 5, 6, 7, 8),
    _bits(2, 3, 4, 5, 6, 7, 8),
    _bits(1, 2, 3, 4, 5, 6, 7, 8),
)
MAX_LIST_NODES = 10_000  # more PROCLOCKs on one lock than a torn list could be told from
MAX_BLOCKERS = 64  # entries of one chain
MAX_LEVELS = 16

_PTR = struct.Struct("<Q")
_INT = struct.Struct("<i")
_UINT32 = struct.Struct("<I")
_UINT16 = struct.Struct("<H")
_INT64 = struct.Struct("<q")


class TornRead(Exception):
    """A list or pointer that does not hold together: PostgreSQL changed it meanwhile."""


@dataclass(frozen=True)
class Proc:
    """A PGPROC, read at one moment."""

    address: int
    pid: int  # 0: a prepared transaction's
    xid: Optional[int]
    wait_lock: int  # the LOCK it sleeps on; 0: none
    wait_mode: int
    wait_start_us: Optional[int]  # PostgreSQL's microseconds; 14+
    group: int  # its lock group's leader, itself when it has none


@dataclass(frozen=True)
class Link:
    """One blocker: which PGPROC, whom it blocks, and on which lock in which mode."""

    proc: Proc
    blocks: int  # the pid it blocks
    level: int  # 1: blocks the statement's backend itself
    tag: bytes  # the LOCKTAG
    mode: int
    granted: bool  # holds the mode (hard), or awaits it ahead in the queue (soft)
    leader_pid: Optional[int]  # a parallel worker's: its lock group leader's pid


@dataclass(frozen=True)
class _Lock:
    """A LOCK as one walk read it: its tag, its PROCLOCKs, its wait queue."""

    tag: bytes
    holders: list[tuple[int, int, int]]  # (PGPROC, its lock group's leader, holdMask)
    queue: list[int]  # PGPROCs waiting, in queue order


class LockReader:
    """Reads the lock table of one cluster through one of its processes' memory.

    What one look reads is kept for that look only (`new_look`): when many backends
    queue on one lock, each walk finds its LOCK and the PGPROCs in it already read,
    and a pile-up of a hundred costs about what one waiter does.
    """

    def __init__(self, pid: int, layout: BackendStatusLayout) -> None:
        self._peeker = Peeker(pid)
        self._layout = layout
        self._node = max(layout.proclock_lockLink, layout.proclock_holdMask) + 16
        self._procs: dict[int, Proc] = {}
        self._locks: dict[int, _Lock] = {}

    def new_look(self) -> None:
        self._procs.clear()
        self._locks.clear()

    def proc(self, address: int, fresh: bool = False) -> Proc:
        if not fresh and (known := self._procs.get(address)) is not None:
            return known
        layout = self._layout
        raw = self._peeker.read(address, layout.proc_size)
        leader = _PTR.unpack_from(raw, layout.proc_lockGroupLeader)[0]
        start = None
        if layout.proc_waitStart is not None:
            start = _INT64.unpack_from(raw, layout.proc_waitStart)[0] or None
        proc = Proc(
            address=address,
            pid=_INT.unpack_from(raw, layout.proc_pid)[0],
            xid=None if layout.proc_xid is None else _UINT32.unpack_from(raw, layout.proc_xid)[0],
            wait_lock=_PTR.unpack_from(raw, layout.proc_waitLock)[0],
            wait_mode=_INT.unpack_from(raw, layout.proc_waitLockMode)[0],
            wait_start_us=start,
            group=leader or address,
        )
        self._procs[address] = proc
        return proc

    def _lock(self, address: int) -> _Lock:
        """One LOCK, its lists read with one read per element (the element holds the
        pointer to the next). SHM_QUEUE (13-15) and dlist (16+) link the same way:
        `next` of the head, round to the head again; a dlist never used may hold NULL."""
        if (known := self._locks.get(address)) is not None:
            return known
        layout = self._layout
        head = self._peeker.read(address, layout.lock_waitProcs + 16)
        tag = head[layout.lock_tag : layout.lock_tag + 16]
        holders = [
            (
                _PTR.unpack_from(raw, layout.proclock_myProc)[0],
                _PTR.unpack_from(raw, layout.proclock_groupLeader)[0],
                _INT.unpack_from(raw, layout.proclock_holdMask)[0],
            )
            for _, raw in self._follow(
                address,
                head,
                layout.lock_procLocks,
                layout.proclock_lockLink,
                self._node,
                "PROCLOCKs",
            )
        ]
        queue = [
            waiting
            for waiting, _ in self._follow(
                address, head, layout.lock_waitProcs, layout.proc_links, 0, "wait queue"
            )
        ]
        found = _Lock(tag, holders, queue)
        self._locks[address] = found
        return found

    def _follow(
        self, lock: int, head: bytes, list_at: int, link_at: int, size: int, what: str
    ) -> Iterator[tuple[int, bytes]]:
        """The elements of one of the LOCK's lists (the list at `list_at` in the LOCK,
        its link at `link_at` in each element), and at least `size` bytes read at each:
        the PROCLOCK itself; nothing more of a waiting PGPROC than its link."""
        layout = self._layout
        start = lock + list_at
        node = _PTR.unpack_from(head, list_at + layout.list_next)[0]
        count = 0
        while node and node != start:
            count += 1
            if count > MAX_LIST_NODES:
                raise TornRead(f"the {what} of {lock:#x} do not end")
            element = node - link_at
            raw = self._peeker.read(element, max(size, link_at + layout.list_next + 8))
            yield element, raw
            node = _PTR.unpack_from(raw, link_at + layout.list_next)[0]

    def direct(self, waiter: Proc) -> tuple[bytes, list[tuple[int, int, bool]]]:
        """The LOCKTAG the waiter sleeps on, and who blocks it there: (PGPROC, mode,
        granted), as pg_blocking_pids() decides."""
        lock = self._lock(waiter.wait_lock)
        mode = waiter.wait_mode
        if not 0 < mode < len(CONFLICTS):
            raise TornRead(f"waiting in mode {mode}")
        conflicts = CONFLICTS[mode]
        queued = lock.queue
        if waiter.address not in queued:
            raise TornRead("the waiter is not in its lock's queue")  # granted meanwhile?
        ahead = set(queued[: queued.index(waiter.address)])
        blockers: list[tuple[int, int, bool]] = []
        for holder, group, hold_mask in lock.holders:
            if not holder or holder == waiter.address or group == waiter.group:
                continue  # itself, or its own lock group: never a blocker
            held = hold_mask & conflicts
            if held:
                blockers.append((holder, held.bit_length() - 1, True))  # its strongest
            elif holder in ahead:
                other = self.proc(holder)
                if (
                    other.wait_lock == waiter.wait_lock
                    and 0 < other.wait_mode < len(CONFLICTS)
                    and conflicts & (1 << other.wait_mode)
                ):
                    blockers.append((holder, other.wait_mode, False))
        return lock.tag, blockers

    def chain(self, address: int) -> tuple[Proc, list[Link]] | None:
        """The PGPROC at `address` and its blockers, nearest first, then theirs; None
        when it does not wait on a lock, or the lock table changed under the walk."""
        try:
            waiter = self.proc(address, fresh=True)
            if not waiter.wait_lock:
                return None
            links: list[Link] = []
            seen = {waiter.address}
            level_procs = [waiter]
            for level in range(1, MAX_LEVELS + 1):
                following: list[Proc] = []
                for blocked in level_procs:
                    tag, direct = self.direct(blocked)
                    for holder, mode, granted in direct:
                        if holder in seen or len(links) >= MAX_BLOCKERS:
                            continue
                        seen.add(holder)
                        proc = self.proc(holder)
                        leader = None
                        if proc.group != proc.address:
                            leader = self.proc(proc.group).pid
                        link = Link(proc, blocked.pid, level, tag, mode, granted, leader)
                        links.append(link)
                        if proc.wait_lock:
                            following.append(proc)
                if not following:
                    break
                level_procs = following
            # Read again: a waiter that got its lock (or another) meanwhile makes the
            # walk a mix of two moments.
            again = self.proc(address, fresh=True)
        except (MemoryReadError, TornRead, struct.error, ValueError, IndexError):
            return None  # a field read mid-change: the next walk
        if (again.wait_lock, again.wait_mode) != (waiter.wait_lock, waiter.wait_mode):
            return None
        return waiter, links


def describe_tag(tag: bytes, layout: BackendStatusLayout) -> dict[str, Any]:
    """A LOCKTAG as pg_locks shows it: its type and the columns that type fills."""
    field1 = _UINT32.unpack_from(tag, layout.locktag_field1)[0]
    field2 = _UINT32.unpack_from(tag, layout.locktag_field2)[0]
    field3 = _UINT32.unpack_from(tag, layout.locktag_field3)[0]
    field4 = _UINT16.unpack_from(tag, layout.locktag_field4)[0]
    kind = tag[layout.locktag_type]
    name = layout.locktag_types[kind] if kind < len(layout.locktag_types) else str(kind)
    found: dict[str, Any] = {"type": name}
    if name in ("relation", "extend", "page", "tuple"):
        found.update(database=field1, relation=field2, relation_name=None)
        if name in ("page", "tuple"):
            found["page"] = field3
        if name == "tuple":
            found["tuple"] = field4
    elif name == "frozenid":
        found["database"] = field1
    elif name == "transactionid":
        found["transactionid"] = field1
    elif name == "virtualxid":
        found["virtualxid"] = f"{field1}/{field2}"
    elif name == "spectoken":
        found.update(transactionid=field1, objid=field2)
    elif name == "applytransaction":  # lockfuncs.c pg_lock_status, as it shows one
        found.update(database=field1, objid=field2, transactionid=field3, objsubid=field4)
    else:  # object, advisory, userlock
        found.update(database=field1, classid=field2, objid=field3, objsubid=field4)
    return found


# What the caller knows of a blocker's backend, by pid: its pg_stat_activity entry.
Describe = Callable[[Proc], dict[str, Any]]


def blocked_by(
    links: list[Link], layout: BackendStatusLayout, describe: Describe
) -> list[dict[str, Any]]:
    """The event's `blocked_by`: one object per blocker, nearest first."""
    entries = []
    for link in links:
        proc = link.proc
        entry: dict[str, Any] = {
            "pid": proc.pid,
            "level": link.level,
            "blocks": link.blocks,
            **describe(proc),
            "lock": {
                **describe_tag(link.tag, layout),
                "mode": LOCK_MODES[link.mode],
                "granted": link.granted,
            },
            "waiting": bool(proc.wait_lock),
        }
        if link.leader_pid is not None:
            entry["lock_group_leader"] = link.leader_pid
        if proc.pid == 0:
            # A prepared transaction: its gid is in TwoPhaseState, which no process
            # exports; its xid finds it in pg_prepared_xacts.
            entry["prepared"] = {"transaction": proc.xid, "gid": None}
        entries.append(entry)
    return entries

"""`sampled`'s pure logic without root: how a statement ended, which threshold judges
it, and which statements are its own around a live switch."""

from __future__ import annotations

from typing import Any

import pytest

from pgslowlog.bpf.decoder import Failure
from pgslowlog.sampled.hand_over import HandOverWindow
from pgslowlog.sampled.outcomes import FAILURE_SLACK_US, OutcomeMatcher
from pgslowlog.sampled.pg_time import pg_us, unix_ns
from pgslowlog.sampled.statements import Finished, InFlight
from pgslowlog.sampled.thresholds import KEPT, ThresholdHistory

PID = 4242


def finished(start_us: int = 1_000_000, end_us: int = 1_400_000, **fields: Any) -> Finished:
    """A statement the looks timed, in PostgreSQL's microseconds."""
    values: dict[str, Any] = {
        "pid": PID,
        "start_us": start_us,
        "end_us": end_us,
        "exact": True,
        "backend_exited": False,
        "outcome": "unknown",
        "query_id": None,
        "waits": {"CPU": 4},
        "text": b"select pg_sleep(0.4)",
        "text_truncated": False,
        **fields,
    }
    return Finished(**values)


def failure(at_us: int, outcome: str, exited: bool = False, pid: int = PID) -> Failure:
    """A report of sampled's BPF program, stamped in Unix time as the decoder gives it."""
    return Failure(pid, unix_ns(at_us), outcome, exited)


def test_postgresql_time_and_unix_time_convert_both_ways():
    assert unix_ns(0) == 946_684_800 * 10**9  # PostgreSQL's 2000-01-01
    assert pg_us(unix_ns(123_456_789)) == 123_456_789


def test_no_report_means_the_statement_ended_well():
    assert OutcomeMatcher().outcome(finished()) == "ok"


def test_an_error_while_it_ran_or_just_at_its_end_is_its_outcome():
    matcher = OutcomeMatcher()
    matcher.note(failure(1_400_000 + FAILURE_SLACK_US, "error"))  # the end marked after the abort
    assert matcher.outcome(finished()) == "error"
    late = OutcomeMatcher()
    late.note(failure(1_400_000 + FAILURE_SLACK_US + 1, "error"))  # the next statement's
    assert late.outcome(finished()) == "ok"
    early = OutcomeMatcher()
    early.note(failure(999_999, "error"))  # the statement before
    assert early.outcome(finished()) == "ok"


def test_a_cancel_before_the_abort_makes_it_cancelled():
    matcher = OutcomeMatcher()
    matcher.note(failure(1_200_000, "cancelled"))
    matcher.note(failure(1_200_050, "error"))
    assert matcher.outcome(finished()) == "cancelled"
    # A cancel that came after the error cancelled nothing of it.
    after = OutcomeMatcher()
    after.note(failure(1_200_000, "error"))
    after.note(failure(1_200_050, "cancelled"))
    assert after.outcome(finished()) == "error"
    # Another backend's reports are not this statement's.
    other = OutcomeMatcher()
    other.note(failure(1_200_000, "error", pid=PID + 1))
    assert other.outcome(finished()) == "ok"


def test_a_statement_cut_short_by_its_backend_keeps_what_the_tracker_read():
    cut = finished(backend_exited=True, exact=False, outcome="error")
    assert OutcomeMatcher().outcome(cut) == "error"


def test_a_clean_exit_after_the_last_look_means_the_statement_had_ended():
    """The client left after its statement (proc_exit code 0): not cut short, and the end
    is bounded by the exit, still an upper bound."""
    matcher = OutcomeMatcher()
    matcher.note(failure(1_300_000, "ok", exited=True))
    gone = finished(end_us=1_500_000, exact=False, backend_exited=True, outcome="unknown")
    settled = matcher.settle_exit(gone)
    assert (settled.end_us, settled.exact, settled.backend_exited, settled.outcome) == (
        1_300_000,
        False,
        False,
        "ok",
    )


def test_a_fatal_exit_cuts_the_statement_short():
    matcher = OutcomeMatcher()
    matcher.note(failure(1_300_000, "error", exited=True))
    matcher.note(failure(1_350_000, "ok", exited=True))  # only the first exit counts
    settled = matcher.settle_exit(finished(end_us=1_500_000, backend_exited=True))
    assert (settled.end_us, settled.backend_exited, settled.outcome) == (1_300_000, True, "error")


def test_an_exit_before_the_statement_began_or_none_changes_nothing():
    statement = finished(backend_exited=True)
    assert OutcomeMatcher().settle_exit(statement) is statement
    matcher = OutcomeMatcher()
    matcher.note(failure(999_000, "error", exited=True))
    assert matcher.settle_exit(statement) is statement
    # An exit after the look that found the backend gone does not move the end later.
    after = OutcomeMatcher()
    after.note(failure(2_000_000, "ok", exited=True))
    assert after.settle_exit(statement).end_us == statement.end_us


def test_reports_of_backends_with_nothing_in_flight_are_forgotten():
    matcher = OutcomeMatcher()
    matcher.note(failure(1_200_000, "error"))
    matcher.note(failure(1_200_000, "error", pid=7))
    matcher.note(failure(1_200_000, "ok", exited=True, pid=8))
    matcher.keep_only({7})
    assert matcher.outcome(finished()) == "ok"
    assert matcher.outcome(finished(pid=7)) == "error"
    assert matcher.settle_exit(finished(pid=8, backend_exited=True)).outcome == "unknown"


def test_a_statement_is_judged_by_the_threshold_in_effect_when_it_ended():
    history = ThresholdHistory(200_000)
    history.change(50_000, at_us=10_000_000)  # a reload lowered it
    history.change(300_000, at_us=20_000_000)  # another raised it
    assert history.at(9_999_999) == 200_000
    assert history.at(10_000_000) == 50_000
    assert history.at(19_999_999) == 50_000
    assert history.at(20_000_000) == history.current_us == 300_000


def test_only_the_last_thresholds_are_remembered():
    history = ThresholdHistory(0)
    for change in range(1, KEPT + 3):
        history.change(change, at_us=change * 1000)
    # The oldest changes are forgotten: what ended before them falls to the oldest kept.
    assert history.at(0) == 2
    assert history.at(KEPT * 1000 + 1500) == KEPT + 1


def in_flight(start_us: int, pid: int = PID) -> InFlight:
    return InFlight(pid=pid, start_us=start_us, last_seen_us=start_us, query_id=None)


def test_a_window_owns_everything_until_a_switch():
    window = HandOverWindow()
    assert window.owns(0, 10**12)
    assert not window.done([], set(), looks_done=100)  # never handed over


def test_taken_over_it_owns_what_ends_from_then_on():
    window = HandOverWindow()
    window.take_over(5_000)
    assert not window.owns(1_000, 4_999)  # the definition it replaced reported it
    assert window.owns(1_000, 5_000)


def test_handed_over_it_owns_what_began_before_and_waits_for_it():
    window = HandOverWindow()
    window.hand_over(5_000, looks_begun=10)
    assert window.owns(4_999, 9_000) and not window.owns(5_000, 9_000)
    before, after = in_flight(4_000), in_flight(6_000, pid=PID + 1)
    # A look under way at the hand-over may have missed a statement: wait for the next.
    assert not window.done([], set(), looks_done=10)
    assert window.done([after], set(), looks_done=11)  # its successor's to report
    assert not window.done([before, after], set(), looks_done=11)
    # A walsender's or worker's endless "statement" is not waited for.
    assert window.done([before, after], {PID}, looks_done=11)


def test_the_lock_conflict_table_is_postgresql_s():
    from pgslowlog.sampled.blockers import CONFLICTS, LOCK_MODES

    # lock.c LockConflicts is symmetric: A conflicts with B exactly when B with A.
    for a in range(1, 9):
        for b in range(1, 9):
            assert bool(CONFLICTS[a] & (1 << b)) == bool(CONFLICTS[b] & (1 << a)), (a, b)
    names = dict(zip(LOCK_MODES, CONFLICTS))
    # The documented pairs (the table in the manual's "Explicit Locking" chapter).
    assert names["AccessShareLock"] == 1 << LOCK_MODES.index("AccessExclusiveLock")
    assert not names["RowExclusiveLock"] & (1 << LOCK_MODES.index("RowExclusiveLock"))
    assert names["ShareUpdateExclusiveLock"] & (1 << LOCK_MODES.index("ShareUpdateExclusiveLock"))
    assert not names["ShareLock"] & (1 << LOCK_MODES.index("ShareLock"))
    assert bin(names["AccessExclusiveLock"]).count("1") == 8


def test_a_lock_tag_reads_as_pg_locks_shows_it():
    import struct

    from pgslowlog.pg_layouts import LAYOUTS
    from pgslowlog.sampled.blockers import describe_tag

    layout = LAYOUTS[16]

    def tag(kind: str, f1: int, f2: int, f3: int, f4: int, method: int = 1) -> bytes:
        return struct.pack("<IIIHBB", f1, f2, f3, f4, layout.locktag_types.index(kind), method)

    assert describe_tag(tag("relation", 5, 16384, 0, 0), layout) == {
        "type": "relation",
        "database": 5,
        "relation": 16384,
        "relation_name": None,
    }
    assert describe_tag(tag("tuple", 5, 16384, 7, 3), layout)["tuple"] == 3
    assert describe_tag(tag("transactionid", 731, 0, 0, 0), layout) == {
        "type": "transactionid",
        "transactionid": 731,
    }
    advisory = describe_tag(tag("advisory", 5, 0, 4242, 1, method=2), layout)
    assert (advisory["objid"], advisory["objsubid"]) == (4242, 1)
    assert describe_tag(tag("applytransaction", 5, 16400, 731, 3), layout) == {
        "type": "applytransaction",
        "database": 5,
        "objid": 16400,  # the subscription
        "transactionid": 731,  # the remote transaction
        "objsubid": 3,
    }
    assert describe_tag(tag("virtualxid", 3, 17, 0, 0), layout)["virtualxid"] == "3/17"


# -- the lock walk, over a fake address space --------------------------------------------


class FakeLockTable:
    """PGPROCs, LOCKs and PROCLOCKs laid out as PostgreSQL 16 lays them out (dlist), in
    a dict of address -> bytearray that LockReader reads through its Peeker."""

    def __init__(self) -> None:
        from pgslowlog.pg_layouts import LAYOUTS

        self.layout = LAYOUTS[16]
        self.blocks: dict[int, bytearray] = {}
        self._next = 0x10000

    def _alloc(self, size: int) -> int:
        address = self._next
        self._next += (size + 0xFFF) & ~0xFFF
        self.blocks[address] = bytearray(size)
        return address

    def put(self, address: int, fmt: str, value: int) -> None:
        import struct

        for base, block in self.blocks.items():
            if base <= address < base + len(block):
                struct.pack_into(fmt, block, address - base, value)
                return
        raise AssertionError(f"{address:#x} is not mapped")

    def read(self, address: int, size: int) -> bytes:
        from pgslowlog.process_memory import MemoryReadError

        for base, block in self.blocks.items():
            if base <= address and address + size <= base + len(block):
                return bytes(block[address - base : address - base + size])
        raise MemoryReadError(14, f"{address:#x} is not mapped")

    def proc(self, pid: int) -> int:
        layout = self.layout
        address = self._alloc(layout.proc_size)
        self.put(address + layout.proc_pid, "<i", pid)
        return address

    def wait(self, proc: int, lock: int, mode: int) -> None:
        self.put(proc + self.layout.proc_waitLock, "<Q", lock)
        self.put(proc + self.layout.proc_waitLockMode, "<i", mode)

    def group(self, proc: int, leader: int) -> None:
        self.put(proc + self.layout.proc_lockGroupLeader, "<Q", leader)

    def lock(self, kind: str, field1: int, holders: list, queue: list[int]) -> int:
        """holders: (PGPROC, group leader or 0, holdMask); queue: PGPROCs in order."""
        layout = self.layout
        lock = self._alloc(layout.lock_waitProcs + 24)
        self.put(lock + layout.lock_tag + layout.locktag_field1, "<I", field1)
        self.put(
            lock + layout.lock_tag + layout.locktag_type, "<B", layout.locktag_types.index(kind)
        )
        nodes = []
        for proc, leader, mask in holders:
            proclock = self._alloc(layout.proclock_lockLink + 16)
            self.put(proclock + layout.proclock_myProc, "<Q", proc)
            self.put(proclock + layout.proclock_groupLeader, "<Q", leader or proc)
            self.put(proclock + layout.proclock_holdMask, "<i", mask)
            nodes.append(proclock + layout.proclock_lockLink)
        self._link(lock + layout.lock_procLocks, nodes)
        self._link(lock + layout.lock_waitProcs, [proc + layout.proc_links for proc in queue])
        return lock

    def _link(self, head: int, nodes: list[int]) -> None:
        chain = [head, *nodes, head]
        for here, following in zip(chain, chain[1:]):
            self.put(here + self.layout.list_next, "<Q", following)


@pytest.fixture
def fake_locks(monkeypatch: pytest.MonkeyPatch) -> FakeLockTable:
    from pgslowlog.process_memory import Peeker

    table = FakeLockTable()
    monkeypatch.setattr(Peeker, "read", lambda self, address, size: table.read(address, size))
    return table


def _walk(table: FakeLockTable, proc: int):
    from pgslowlog.sampled.blockers import LockReader

    reader = LockReader(1, table.layout)
    reader.new_look()
    return reader.chain(proc)


def _chain(walked) -> list[tuple[int, int, int, str, bool]]:
    from pgslowlog.sampled.blockers import LOCK_MODES

    _, links = walked
    return [(ln.proc.pid, ln.level, ln.blocks, LOCK_MODES[ln.mode], ln.granted) for ln in links]


def test_a_hard_blocker_and_a_soft_one_ahead_in_the_queue(fake_locks):
    t = fake_locks
    holder, ahead, waiter = t.proc(10), t.proc(11), t.proc(12)
    # holder has AccessShareLock; ahead awaits AccessExclusiveLock (queued first, so a
    # soft blocker); waiter awaits RowExclusiveLock, which only ahead's request blocks.
    lock = t.lock(
        "relation", 5, [(holder, 0, 1 << 1), (ahead, 0, 0), (waiter, 0, 0)], [ahead, waiter]
    )
    t.wait(ahead, lock, 8)
    t.wait(waiter, lock, 3)
    assert _chain(_walk(t, waiter)) == [
        (11, 1, 12, "AccessExclusiveLock", False),
        (10, 2, 11, "AccessShareLock", True),
    ]
    assert _chain(_walk(t, ahead)) == [(10, 1, 11, "AccessShareLock", True)]


def test_its_own_lock_group_never_blocks_it_and_a_prepared_xact_is_pid_0(fake_locks):
    t = fake_locks
    leader, worker, waiter, prepared = t.proc(20), t.proc(21), t.proc(22), t.proc(0)
    t.group(leader, leader)
    t.group(worker, leader)
    lock = t.lock(
        "relation", 5, [(worker, leader, 1 << 8), (prepared, 0, 1 << 7), (leader, 0, 0)], [leader]
    )
    t.wait(leader, lock, 8)
    # The worker's AccessExclusiveLock is its group's: only the prepared xact blocks.
    assert _chain(_walk(t, leader)) == [(0, 1, 20, "ExclusiveLock", True)]
    t.lock("relation", 5, [(worker, leader, 1 << 8), (waiter, 0, 0)], [waiter])
    lock2 = t.lock("relation", 6, [(worker, leader, 1 << 8), (waiter, 0, 0)], [waiter])
    t.wait(waiter, lock2, 1)
    walked = _walk(t, waiter)
    assert _chain(walked) == [(21, 1, 22, "AccessExclusiveLock", True)]
    assert walked[1][0].leader_pid == 20  # a worker, named with its leader


def test_a_deadlock_cycle_ends_and_a_torn_list_is_no_answer(fake_locks):
    t = fake_locks
    a, b = t.proc(30), t.proc(31)
    lock_a = t.lock("transactionid", 700, [(a, 0, 1 << 7), (b, 0, 0)], [b])
    lock_b = t.lock("transactionid", 701, [(b, 0, 1 << 7), (a, 0, 0)], [a])
    t.wait(b, lock_a, 5)
    t.wait(a, lock_b, 5)
    assert _chain(_walk(t, a)) == [(31, 1, 30, "ExclusiveLock", True)]  # not back to a
    # A list whose last node points at itself, not back to its head: capped, no answer.
    layout = t.layout
    first = int.from_bytes(t.read(lock_b + layout.lock_procLocks + layout.list_next, 8), "little")
    t.put(first + layout.list_next, "<Q", first)
    assert _walk(t, a) is None


def test_a_waiter_that_moved_on_or_an_impossible_mode_is_no_answer(fake_locks):
    t = fake_locks
    holder, other, waiter = t.proc(40), t.proc(41), t.proc(42)
    lock = t.lock("tuple", 5, [(holder, 0, 1 << 7), (other, 0, 0), (waiter, 0, 0)], [other, waiter])
    t.wait(other, lock, -3)  # read mid-change: never a soft blocker, never a crash
    t.wait(waiter, lock, 7)
    assert _chain(_walk(t, waiter)) == [(40, 1, 42, "ExclusiveLock", True)]
    t.wait(waiter, lock, 99)
    assert _walk(t, waiter) is None
    # Not in its lock's queue (granted between the two reads): no answer, not "nobody".
    t.wait(waiter, t.lock("tuple", 5, [(holder, 0, 1 << 7)], []), 7)
    assert _walk(t, waiter) is None
    t.wait(waiter, 0, 0)
    assert _walk(t, waiter) is None  # not waiting at all


def test_a_figure_that_could_not_be_read_or_went_backwards_is_null_never_0():
    from pgslowlog.sampled.resources import Usage, statement_resources

    fields = dict.fromkeys(Usage.__struct_fields__, 100)
    start = Usage(**{**fields, "read_bytes": None, "write_bytes": None, "cpu_wait_ns": None})
    end = Usage(**{**fields, "shared_blks_hit": 130, "cpu_ns": 2_600_100, "wal_records": 90})
    figures = statement_resources(start, end)
    assert figures["shared_blks_hit"] == 30 and figures["shared_blks_read"] == 0
    assert figures["cpu_ms"] == 2.6
    # No /proc figures at the baseline: unknown, not 0; a counter that went back: unknown.
    assert figures["read_bytes"] is figures["cpu_wait_ms"] is figures["wal_records"] is None


def test_the_cpu_clock_is_the_process_s_own():
    import os
    import time

    from pgslowlog.sampled.resources import _cpu_clock

    # clock_getcpuclockid(3) of this process: the same clock as CLOCK_PROCESS_CPUTIME_ID.
    before = time.clock_gettime_ns(time.CLOCK_PROCESS_CPUTIME_ID)
    ours = time.clock_gettime_ns(_cpu_clock(os.getpid()))
    after = time.clock_gettime_ns(time.CLOCK_PROCESS_CPUTIME_ID)
    assert before <= ours <= after

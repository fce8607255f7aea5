"""`sampled`'s pure logic without root: how a statement ended, which threshold judges
it, and which statements are its own around a live switch."""

from __future__ import annotations

from typing import Any

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
    assert describe_tag(tag("applytransaction", 5, 1, 2, 3), layout)["type"] == "applytransaction"
    assert describe_tag(tag("virtualxid", 3, 17, 0, 0), layout)["virtualxid"] == "3/17"

"""Statements from looks at pg_stat_activity entries: the sampler's rules, without a server."""

from __future__ import annotations

from pgslowlog.sampled.statements import BackendSample, StatementTracker


def look(pid=7, running=True, start=1_000, state_start=1_000, wait="CPU", aborted=False):
    return BackendSample(pid, running, start, state_start, wait, query_id=42, aborted=aborted)


def test_seen_running_then_idle_ends_exactly_when_idle_began():
    tracker = StatementTracker()
    assert tracker.observe(look(wait="CPU"), now_us=1_100) is None
    assert tracker.observe(look(wait="Lock"), now_us=1_200) is None
    assert tracker.observe(look(wait="Lock"), now_us=1_300) is None
    done = tracker.observe(look(running=False, state_start=1_350), now_us=1_400)
    assert done is not None
    assert (done.start_us, done.end_us, done.duration_us, done.exact) == (1_000, 1_350, 350, True)
    assert done.waits == {"CPU": 1, "Lock": 2} and done.query_id == 42
    assert done.outcome == "unknown" and not done.backend_exited
    assert tracker.in_flight == {}


def test_an_aborted_transaction_at_the_end_is_an_error():
    tracker = StatementTracker()
    tracker.observe(look(), now_us=1_100)
    done = tracker.observe(look(running=False, state_start=1_500, aborted=True), now_us=1_600)
    assert done is not None and done.outcome == "error"


def test_the_next_statement_of_a_pipeline_bounds_the_one_before():
    tracker = StatementTracker()
    tracker.observe(look(start=1_000), now_us=1_100)
    done = tracker.observe(look(start=1_800, state_start=1_800), now_us=1_900)
    assert done is not None
    assert (done.start_us, done.end_us, done.exact) == (1_000, 1_800, False)
    assert tracker.in_flight[7].start_us == 1_800  # the next one is timed on its own
    second = tracker.observe(look(start=1_800, running=False, state_start=2_500), now_us=2_600)
    assert second is not None and (second.start_us, second.end_us) == (1_800, 2_500)


def test_a_statement_never_seen_running_is_not_reported():
    tracker = StatementTracker()
    assert tracker.observe(look(running=False, start=1_000, state_start=1_020), 1_100) is None
    assert tracker.observe(look(running=False, start=2_000, state_start=2_020), 2_100) is None
    assert tracker.in_flight == {}


def test_an_exited_backend_read_once_more_gives_the_exact_end():
    tracker = StatementTracker()
    tracker.observe(look(), now_us=1_100)
    done = tracker.backend_gone(7, look(running=False, state_start=1_700), now_us=2_000)
    assert done is not None and (done.end_us, done.exact, done.backend_exited) == (
        1_700,
        True,
        False,
    )


def test_a_backend_that_went_mid_statement_is_cut_short():
    tracker = StatementTracker()
    tracker.observe(look(), now_us=1_100)
    tracker.observe(look(), now_us=1_600)
    # Read once more, still running: terminated mid-statement. It ended by now.
    done = tracker.backend_gone(7, look(), now_us=2_000)
    assert done is not None
    assert (done.end_us, done.exact, done.backend_exited, done.outcome) == (
        2_000,
        False,
        True,
        "error",
    )
    assert tracker.backend_gone(7, None, now_us=2_100) is None  # reported once


def test_a_slot_that_could_not_be_read_again_says_unknown():
    tracker = StatementTracker()
    tracker.observe(look(), now_us=1_100)
    done = tracker.backend_gone(7, None, now_us=2_000)  # unreadable, or a new owner
    assert done is not None and (done.outcome, done.exact, done.end_us) == ("unknown", False, 2_000)


def test_a_look_torn_by_a_write_does_not_reopen_or_rewind():
    tracker = StatementTracker()
    tracker.observe(look(start=1_000), now_us=1_100)
    done = tracker.observe(look(start=1_000, running=False, state_start=1_500), now_us=1_600)
    assert done is not None
    # Old start with the RUNNING state of the next statement: not a statement again.
    assert tracker.observe(look(start=1_000), now_us=1_700) is None
    assert tracker.in_flight == {}
    tracker.observe(look(start=2_000), now_us=2_100)
    assert tracker.observe(look(start=1_000), now_us=2_200) is None  # backwards: ignored
    assert tracker.in_flight[7].start_us == 2_000


def test_query_id_from_the_first_look_that_has_one():
    tracker = StatementTracker()
    tracker.observe(BackendSample(7, True, 1_000, 1_000, "CPU", query_id=None), now_us=1_100)
    tracker.observe(BackendSample(7, True, 1_000, 1_000, "CPU", query_id=99), now_us=1_200)
    done = tracker.observe(BackendSample(7, False, 1_000, 1_300, "CPU"), now_us=1_400)
    assert done is not None and done.query_id == 99


def test_an_end_before_the_start_is_not_trusted():
    tracker = StatementTracker()
    tracker.observe(look(start=1_000), now_us=1_400)
    done = tracker.observe(look(start=1_000, running=False, state_start=0), now_us=1_500)
    assert done is not None and (done.end_us, done.exact) == (1_400, False)


def test_backends_are_tracked_apart():
    tracker = StatementTracker()
    tracker.observe(look(pid=1, start=1_000), now_us=1_100)
    tracker.observe(look(pid=2, start=1_050), now_us=1_100)
    done = tracker.observe(look(pid=1, running=False, state_start=1_200), now_us=1_300)
    assert done is not None and done.pid == 1 and set(tracker.in_flight) == {2}

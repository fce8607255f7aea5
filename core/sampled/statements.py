"""Statements from samples of PostgreSQL's own bookkeeping: when each began and ended.

The sampler looks at every backend's pg_stat_activity entry many times a second. A
statement is never trapped; it is seen running, then seen over:
- seen idle (or idle in transaction) with the same start: it ended exactly when
  that state began (st_state_start_timestamp);
- seen with a later start (the next statement of a pipeline, or one that came and
  went between two looks): it ended at or before that start, an upper bound;
- its backend gone: the entry is read once more if it can be (the caller does);
  otherwise the end is the last time it was seen running, and the backend exited.
Pure logic, no I/O: the sampler feeds it BackendSample values.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

from pgslowlog.compat import SLOTS
from pgslowlog.sampled.resources import Usage


@dataclass(frozen=True, **SLOTS)
class BackendSample:
    pid: int
    running: bool  # st_state is RUNNING (or FASTPATH): a statement is in flight
    activity_start_us: int  # st_activity_start_timestamp, PostgreSQL's microseconds
    state_start_us: int  # st_state_start_timestamp: when the current state began
    wait: str  # what it waits on now, "CPU" for nothing (pg_stat_activity's names)
    query_id: int | None = None
    aborted: bool = False  # idle in an aborted transaction: the last statement failed
    client: bool = True  # a client backend (st_backendType B_BACKEND), not a worker


@dataclass(**SLOTS)
class InFlight:
    pid: int
    start_us: int
    last_seen_us: int  # `now` of the last sample that saw it running
    query_id: int | None
    waits: Counter[str] = field(default_factory=Counter)
    text: bytes | None = None  # read by the sampler while the statement runs
    text_truncated: bool = False
    # Why it is slow, as the sampler reads it while the statement runs:
    usage_start: Optional[Usage] = None  # the backend's counters at the first look
    usage_last: Optional[Usage] = None  # ... at a later look: the end if it exits
    usage_read_us: int = 0  # when usage_last was read
    usage_proc_read: bool = False  # usage_start has its /proc figures
    blocked_by: Optional[list[dict[str, Any]]] = None  # the last walk of its lock wait
    lock_wait_start_us: Optional[int] = None  # PGPROC.waitStart at that walk
    walked_us: int = 0  # when its lock wait was last walked
    group_waited: bool = False  # a parallel worker of its backend was seen waiting on a lock


@dataclass(frozen=True, **SLOTS)
class Finished:
    pid: int
    start_us: int
    end_us: int
    exact: bool  # end read from PostgreSQL; False: an upper bound
    backend_exited: bool
    # "error" when PostgreSQL shows the transaction aborted right at its end; otherwise
    # "unknown": a failure outside a transaction block leaves no mark to read.
    outcome: str
    query_id: int | None
    waits: dict[str, int]
    text: bytes | None
    text_truncated: bool
    usage_start: Optional[Usage] = None
    usage_last: Optional[Usage] = None
    blocked_by: Optional[list[dict[str, Any]]] = None
    lock_wait_start_us: Optional[int] = None
    group_waited: bool = False

    @property
    def duration_us(self) -> int:
        return self.end_us - self.start_us


class StatementTracker:
    def __init__(self) -> None:
        self.in_flight: dict[int, InFlight] = {}
        # pid -> start of the statement last finished: a look that shows it again (a
        # copy torn by a concurrent write) must not reopen it.
        self._finished_start: dict[int, int] = {}

    def observe(
        self, sample: BackendSample, now_us: int, interval_us: int | None = None
    ) -> Finished | None:
        """Account for one look at a backend; the statement that ended, if one did.
        What it waits on counts for the intervals since it was last seen (or began):
        looks pause while nothing is followed, so the first look stands for more.
        Without `interval_us`, each look counts once."""
        finished = None
        current = self.in_flight.get(sample.pid)
        if current is not None:
            if sample.activity_start_us < current.start_us:
                return None  # time does not run backwards: an inconsistent look
            if sample.activity_start_us != current.start_us:
                # Another statement began: this one ended at or before its start.
                finished = self._finish(current, sample.activity_start_us, exact=False)
                current = None
            elif not sample.running:
                outcome = "error" if sample.aborted else "unknown"
                finished = self._finish(current, sample.state_start_us, True, outcome=outcome)
                current = None
        if sample.running:
            if current is None:
                if self._finished_start.get(sample.pid, -1) >= sample.activity_start_us:
                    return finished  # the statement just finished, seen again: not new
                current = InFlight(sample.pid, sample.activity_start_us, 0, sample.query_id)
                self.in_flight[sample.pid] = current
            # Counted in intervals: as many looks as a look every interval would have taken.
            weight = 1
            if interval_us:
                since = now_us - max(current.last_seen_us, current.start_us)
                weight = max(1, round(since / interval_us))
            current.waits[sample.wait] += weight
            current.last_seen_us = now_us
            if current.query_id is None:
                # Parse analysis sets it after the statement reported RUNNING.
                current.query_id = sample.query_id
        return finished

    def backend_gone(self, pid: int, last: BackendSample | None, now_us: int) -> Finished | None:
        """The backend exited. `last` is its entry read once more, if that was possible
        and the slot still was its own (the caller checks)."""
        self._finished_start.pop(pid, None)
        current = self.in_flight.get(pid)
        if current is None:
            return None
        if last is not None and last.activity_start_us == current.start_us and not last.running:
            outcome = "error" if last.aborted else "unknown"
            return self._finish(current, last.state_start_us, exact=True, outcome=outcome)
        if last is not None and last.activity_start_us > current.start_us:
            return self._finish(current, last.activity_start_us, exact=False)
        # Still running when it went (terminated, FATAL, crash), or its slot could not be
        # read again: it ended between the last look that saw it and now.
        outcome = "error" if last is not None else "unknown"
        return self._finish(current, now_us, False, exited=True, outcome=outcome)

    def _finish(
        self,
        statement: InFlight,
        end_us: int,
        exact: bool,
        exited: bool = False,
        outcome: str = "unknown",
    ) -> Finished:
        del self.in_flight[statement.pid]
        self._finished_start[statement.pid] = statement.start_us
        if end_us < statement.start_us:
            # An end before the start (a slot zeroed, track_activities turned off):
            # not to be trusted; it ran at least until it was last seen.
            end_us, exact = statement.last_seen_us, False
        return Finished(
            pid=statement.pid,
            start_us=statement.start_us,
            end_us=end_us,
            exact=exact,
            backend_exited=exited,
            outcome=outcome,
            query_id=statement.query_id,
            waits=dict(statement.waits),
            text=statement.text,
            text_truncated=statement.text_truncated,
            usage_start=statement.usage_start,
            usage_last=statement.usage_last,
            blocked_by=statement.blocked_by,
            lock_wait_start_us=statement.lock_wait_start_us,
            group_waited=statement.group_waited,
        )

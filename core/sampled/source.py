"""`sampled`'s StatementSource: the looks, turned into slow statements, in the collector.

Its collector's thread looks at every cluster running the binary (reading.py), when
schedule.py says, and feeds the tracker (statements.py): an ordinary statement costs
PostgreSQL nothing. A look that comes late counts blind time (blind.py). The outcome
comes from the failure uprobes (outcomes.py). What it gives up, said in each event: a
statement that ends between two looks is timed to the next one's start (`duration_exact: false`), a
statement shorter than threshold + 2 intervals may go unseen, and the protocol is
not told.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Optional

from pgslowlog.bpf.ringbuf import RingBufferReader
from pgslowlog.bpf.source import BpfSource
from pgslowlog.config import DaemonConfig
from pgslowlog.elf import PostgresBinary
from pgslowlog.log import get_logger
from pgslowlog.pg_layouts import (
    EXPORTED_GLOBALS,
    SAMPLER_GLOBALS,
    USAGE_GLOBALS,
    layout_for,
    unverified,
)
from pgslowlog.probes import ProbeDefinition
from pgslowlog.process_memory import MemoryReadError
from pgslowlog.records import BackendNotice, NoticeKind, RawStatement, Record
from pgslowlog.sampled import schedule
from pgslowlog.sampled.blind import BlindTime
from pgslowlog.sampled.blockers import blocked_by
from pgslowlog.sampled.discovery import CHILDREN_EVERY_S, Discovery
from pgslowlog.sampled.hand_over import HandOverWindow
from pgslowlog.sampled.outcomes import (
    FAILURE_SLACK_US,
    OUTCOMES_PROGRAM,
    OutcomeMatcher,
    reports_outcomes,
)
from pgslowlog.sampled.pg_time import pg_now_us, pg_us, unix_ns
from pgslowlog.sampled.reading import ClusterMemory, SampledBackend
from pgslowlog.sampled.resources import statement_resources
from pgslowlog.sampled.schedule import Schedule
from pgslowlog.sampled.statements import BackendSample, Finished, InFlight, StatementTracker
from pgslowlog.sampled.thresholds import ThresholdHistory
from pgslowlog.sources import COUNTERS, DecodeError, LossCause, ProbeLoadError, start_failure
from pgslowlog.targets import Target

log = get_logger(__name__)
FAILURES_PER_LOOK = 4096  # failure reports taken at once: far more than a look brings
# A backend waiting on a lock has its blockers read again at most this often, and a
# look walks the lock table for at most this many waiters (those walked longest ago
# first).
WALK_EVERY_US = 100_000
WALKS_PER_LOOK = 8
# The "why" readings that can wait spend at most this share of a core each (in this
# thread's CPU time), saved up to WHY_BURST_S: the lock walks, and the /proc baselines
# and counters of long statements read again. A hundred backends queued on one row,
# each walk reading a hundred PROCLOCKs, must not make the looks cost a tenth of a
# core. What waits is read at a later look (the walk's answer is then older, a /proc
# baseline later).
WHY_SHARE = 0.0025  # each of the two budgets: lock walks, and counters read again
WHY_BURST_S = 0.01
# A statement old enough to be reported has its backend's counters read again this
# often: the end figures, should the backend exit before a look sees the end (a
# client that disconnects at once, as psql does) and its memory can no longer be read.
USAGE_EVERY_US = 50_000


def auto_floor_ms(daemon: DaemonConfig) -> float:
    """ "auto" picks sampled from this threshold: a statement of threshold + 2 intervals
    is then seen running at 5 or more looks, so it is never missed, and the end of one
    that ends between looks is off by at most 1/5 of the threshold (and flagged an
    upper bound). Below it, a uprobe definition times exactly."""
    return schedule.auto_floor_ms(daemon.sample_interval_ms)


class _Budget:
    """CPU time the readings that can wait may spend: `share` of a core, saved up to
    `burst`. Spent in this thread's CPU time (time.thread_time), so that being
    preempted on a busy machine is not charged as work."""

    def __init__(self, share: float, burst: float) -> None:
        self._share, self._burst = share, burst
        self._credit = burst
        self._last = time.monotonic()

    def refill(self) -> None:
        now = time.monotonic()
        self._credit = min(self._burst, self._credit + (now - self._last) * self._share)
        self._last = now

    def allows(self) -> bool:
        self.refill()
        return self._credit > 0

    def spend(self, since: float) -> None:
        """`since`: time.thread_time() when the work began."""
        self._credit -= time.thread_time() - since


class SampledSource:
    """The StatementSource of `sampled`; its collector's thread does the looking."""

    loss_causes: Mapping[str, LossCause] = {  # sources.ExplainsLosses
        "ringbuf_full": LossCause(
            "outcome_reports_dropped",
            "the failure uprobes' ring buffer was full: a failed statement may read ok",
            "report it: the looks drain it whenever it holds anything",
        ),
        "unrecorded": LossCause(
            "slow_statements_unrecorded",
            "the looks fell behind: a slow statement ended before its text was read",
            "see the blind_time warnings (their cause and fix), or use the activity probe",
        ),
    }

    def __init__(self, definition: ProbeDefinition, target: Target, daemon: DaemonConfig) -> None:
        self._target = target
        self._discovery = Discovery(
            target.binary, target.file.identity, layout_for(target.binary.major), target.scope
        )
        self._interval_ms = daemon.sample_interval_ms  # None: it follows the threshold
        self._schedule = Schedule.at(round(daemon.threshold_ms * 1000), self._interval_ms)
        self._blind = BlindTime(target.name)
        self._unreadable_since: float | None = None  # a cluster lost, from this look on
        self._query_max_bytes = daemon.query_max_bytes
        self._include_background = daemon.include_background
        self._read_blockers = daemon.blocked_by
        self._read_usage = daemon.resources
        # Each kind of reading that can wait has its own budget: neither starves the other.
        self._walk_budget = _Budget(WHY_SHARE, WHY_BURST_S)
        self._usage_budget = _Budget(WHY_SHARE, WHY_BURST_S)
        self._thresholds = ThresholdHistory(round(daemon.threshold_ms * 1000))
        self._tracker = StatementTracker()
        self._window = HandOverWindow()
        self._matcher = OutcomeMatcher()
        self._owner: dict[int, tuple[ClusterMemory, SampledBackend]] = {}  # pid -> where
        self._app_names: dict[int, str] = {}
        self._background: set[int] = set()  # followed backends that are not clients
        self._counts = dict.fromkeys((*COUNTERS, "looks"), 0)
        self._unmatched_said: set[int] = set()  # postmasters already warned about
        self._attached = False
        self._final_look = False
        self._next_look = 0.0
        self._next_scan = 0.0
        self._primed: list[Record] = []
        self._looks_begun = self._looks_done = 0
        # The failure uprobes: compiled and attached in a thread of their own while the
        # looks begin (the compiler takes seconds; the looks need none). Until they are
        # attached, outcomes are what the looks read (reports_outcomes: never a guess).
        self._definition, self._daemon = definition, daemon
        self._failure_reader: RingBufferReader | None = None
        self._outcomes: BpfSource | None = None
        self._outcomes_since_us: int | None = None  # when they were attached
        self._outcomes_lock = threading.Lock()
        self._outcomes_thread: threading.Thread | None = None
        self._settled = threading.Event()
        self._reading_closed = False

    @property
    def attached_count(self) -> int:
        """The sampler, and the failure uprobes."""
        outcomes = self._outcomes.attached_count if self._outcomes else 0
        return outcomes + (1 if self._attached else 0)

    def describe(self) -> dict[str, object]:
        return {
            "sample_interval_ms": self._schedule.interval_us / 1000,
            "pause_ms": self._schedule.pause_us / 1000,
            "clusters": sorted(self._discovery.clusters),
            # How each cluster's status array is read: "mapped", or "copied" and why.
            "reading": {pid: c.reading for pid, c in sorted(self._discovery.clusters.items())},
            "failure_uprobes": self._outcomes.attached_count if self._outcomes else 0,
        }

    def attach(self) -> None:
        try:
            self._discovery.discover(self._owner.keys())
        except OSError as error:
            raise ProbeLoadError(f"sampling {self._target.binary.path} failed: {error}") from None
        self._attached = True
        # A first look now: what runs at this moment is known before attach() returns,
        # which a definition switch relies on (take_over).
        self._primed = self.read(0)
        self._next_look = 0.0
        log.info("looking", target=self._target.name, clusters=len(self._discovery.clusters))
        if not reports_outcomes(self._target.binary):
            self._settled.set()
            return
        # Through a file of its own: the caller closes the target's once attach() returns.
        target = replace(self._target, file=self._target.file.dup())
        self._outcomes_thread = threading.Thread(
            target=self._attach_outcomes, args=(target,), name="outcomes", daemon=True
        )
        self._outcomes_thread.start()

    def _attach_outcomes(self, target: Target) -> None:
        try:
            outcomes = OUTCOMES_PROGRAM(self._definition, target, self._daemon)
            with self._outcomes_lock:
                if not self._attached or self._reading_closed:
                    outcomes.close()  # detached meanwhile
                    return
                try:
                    outcomes.attach()
                    self._failure_reader = outcomes.reader()
                except BaseException:
                    outcomes.close()
                    raise
                self._outcomes_since_us = pg_now_us()
                self._outcomes = outcomes
            log.info(
                "outcome_uprobes_attached", target=target.name, uprobes=outcomes.attached_count
            )
        except Exception as error:
            log.warning(
                "outcome_uprobes_failed",
                target=target.name,
                error=start_failure(error),
                action="outcomes stay what the looks can read (mostly unknown)",
            )
        finally:
            target.file.close()
            self._settled.set()

    def settle(self, timeout_s: float) -> None:  # sources.AttachesLater
        self._settled.wait(timeout_s)

    # sources.HandsOver
    def take_over(self, at_ns: int) -> None:
        self._window.take_over(pg_us(at_ns))

    def hand_over(self, at_ns: int) -> None:
        # The collector's thread is looking meanwhile: the window waits for a look that
        # began after this.
        self._window.hand_over(pg_us(at_ns), self._looks_begun)

    def handed_over(self) -> bool:
        running = list(self._tracker.in_flight.values())  # one copy: the collector changes it
        return self._window.done(running, self._background, self._looks_done)

    def reader(self) -> _Looking:
        return _Looking(self)

    def set_threshold_ns(self, threshold_ns: int) -> None:
        self._thresholds.change(threshold_ns // 1000, pg_now_us())
        self._schedule = Schedule.at(threshold_ns // 1000, self._interval_ms)
        self._next_look = 0.0  # at once: a lower threshold may want a look sooner

    def tick(self) -> None:
        pass  # clocks: PostgreSQL's timestamps are wall-clock time already

    def counters(self) -> dict[str, int]:
        counts = {**self._counts, **self._blind.counters()}
        if self._outcomes is not None:
            counts["ringbuf_full"] = self._outcomes.counters()["ringbuf_full"]
        return counts

    def detach(self) -> None:
        if self._attached:
            self._final_look = True
        with self._outcomes_lock:
            self._attached = False
            if self._outcomes is not None:
                self._outcomes.detach()

    def close(self) -> None:
        """After the collector closed its reader, and after the counters' last read."""
        self.detach()
        if self._outcomes_thread is not None:
            self._outcomes_thread.join()  # a compile under way: it closes what it made
        self.close_reading()
        self._discovery.close()
        self._blind.close()
        if self._outcomes is not None:
            self._outcomes.close()

    def close_reading(self) -> None:
        with self._outcomes_lock:
            self._reading_closed = True
            if self._failure_reader is not None:
                self._failure_reader.close()
                self._failure_reader = None

    # What _Looking runs, in the collector's thread.
    def wait(self, timeout_ms: int) -> None:
        # Until the next look, past the collector's timeout (its ring buffers' poll): a
        # wake-up costs as much CPU as a look at idle backends. A pause is short
        # (schedule.PAUSE_MAX_MS), and so is the wait for a stop.
        delay = self._next_look - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def read(self, limit: int) -> list[Record]:
        """One look's records (a look yields few; `limit` is never reached)."""
        if self._primed:
            primed, self._primed = self._primed, []
            return primed
        now = time.monotonic()
        if not self._attached:
            if not self._final_look:
                return []
            # Detached (a stop, a switch): one last look, so that a statement that
            # ended in the last interval is still reported (the collector drains once
            # more after the stop). It scans the children too: a backend gone since the
            # last scan without the looks seeing it go (its postmaster's memory made
            # anew after a crash and unreadable for a moment, or the postmaster gone)
            # would otherwise leave its statement unreported.
            self._final_look = False
            self._next_scan = 0.0
        elif now < self._next_look:
            return []
        schedule = self._schedule
        planned = self._next_look  # once: a new threshold sets it to 0 meanwhile
        if planned:  # 0: no look was planned (the first, a new threshold)
            if (late := now - planned) * 1e6 > schedule.interval_us:
                self._blind.late(late, now)
        self._blind.baseline(now)
        if self._discovery.due():
            self._discovery.discover(self._owner.keys())
        self._looks_begun += 1
        self._counts["looks"] += 1
        records = self._look(schedule, now)
        self._looks_done = self._looks_begun
        # Every interval while a statement is followed; otherwise a pause, short enough
        # that a statement starting now is followed before its text is due.
        step = schedule.interval_us if self._tracker.in_flight else schedule.pause_us
        self._next_look = now + step / 1e6
        return records

    def _look(self, schedule: Schedule, now: float) -> list[Record]:
        """`now`: time.monotonic() as the look began."""
        now_us = pg_now_us()
        records: list[Record] = []
        scan = now >= self._next_scan
        if scan:
            self._next_scan = now + CHILDREN_EVERY_S
            self._reap(records, now_us)
        in_flight = self._tracker.in_flight
        text_age_us = schedule.text_age_us
        # Every running statement is followed while handing over: the window waits only
        # for those followed, and the successor never saw them begin.
        follow_age = 0 if self._window.starts_before_us is not None else schedule.follow_age_us
        waiting: list[tuple[ClusterMemory, SampledBackend, InFlight]] = []
        failures_taken = False
        for cluster in self._discovery.clusters.values():
            if scan or cluster.base is None:
                # The status array shows new backends and exits by itself; the children
                # of the postmaster are asked only until the array is found, and at each
                # scan (CHILDREN_EVERY_S) for processes without a slot.
                for pid in cluster.children() - set(cluster.backends):
                    if (backend := cluster.adopt(pid)) is not None:
                        self._started(cluster, backend, records)
            look = cluster.look(in_flight.keys(), now_us - follow_age)
            if cluster.unmatched and cluster.pid not in self._unmatched_said:
                self._unmatched_said.add(cluster.pid)  # once per cluster
                log.warning(
                    "backends_unmatched",
                    target=self._target.name,
                    postmaster=cluster.pid,
                    slots=cluster.unmatched,
                    cause="a backend in its status array is no child of the postmaster "
                    "that this daemon can find (by pid, or by NSpid in a container)",
                    action="their statements are not seen; run pgslowlog check",
                )
            if cluster.lost:
                self._discovery.cluster_lost()
                self._next_scan = 0.0  # its backends are reaped at the next look
            if not (look.gone or look.appeared or look.samples):
                continue  # the usual look at idle backends: nothing more to do
            if not failures_taken:
                # After the read: a failure before an end the read shows is in the ring now.
                self._take_failures()
                failures_taken = True
            for backend, last in look.gone:
                self._gone(cluster, backend, last, records, now_us)
            for backend in look.appeared:
                self._started(cluster, backend, records)
            for backend, sample in look.samples:
                if sample is None:
                    continue  # not its backend's any more: the slot's next owner is adopted
                locked = sample.wait.startswith("Lock:")
                if locked and not sample.client and self._read_blockers:
                    self._group_member_waits(cluster, backend, waiting, now_us)
                if not sample.client:
                    if not self._include_background:
                        continue  # autovacuum, walsenders, parallel workers: not asked for
                    self._background.add(backend.pid)
                finished = self._tracker.observe(sample, now_us, schedule.interval_us)
                self._emit(finished, records, cluster, backend)
                running = in_flight.get(backend.pid)
                if running is None:
                    continue
                if running.text is None and now_us - running.start_us >= text_age_us:
                    self._read_text(cluster, backend, running)
                if self._read_usage and cluster.usage:
                    self._read_usage_of(cluster, backend, running, now_us, locked, text_age_us)
                if self._read_blockers and locked:
                    if now_us - running.walked_us >= WALK_EVERY_US:
                        waiting.append((cluster, backend, running))
        self._count_unreadable(now)
        if waiting:
            self._walk_locks(waiting, now_us)
        if not failures_taken:
            # Drained at every look where something waits in it (two loads to know),
            # lest reports of short statements fill it.
            failures_taken = self._take_failures()
        if failures_taken:
            self._matcher.keep_only(in_flight.keys())
        return records

    def _count_unreadable(self, now: float) -> None:
        """Blind time of a cluster whose memory was lost (a crash made it anew): from
        the look that found it lost until the daemon has opened its successor's."""
        lost = any(cluster.lost for cluster in self._discovery.clusters.values())
        if lost and self._unreadable_since is None:
            self._unreadable_since = now
        elif not lost and self._unreadable_since is not None:
            self._blind.add("cluster_unreadable", (now - self._unreadable_since) * 1000, now)
            self._unreadable_since = None

    def _group_member_waits(
        self,
        cluster: ClusterMemory,
        member: SampledBackend,
        waiting: list[tuple[ClusterMemory, SampledBackend, InFlight]],
        now_us: int,
    ) -> None:
        """A parallel worker waits on a lock while its leader waits for the workers:
        the leader's statement is the one blocked (pg_blocking_pids() of the leader
        names its workers' blockers too). The worker's walk answers for it."""
        try:
            group = cluster.locks.proc(member.proc, fresh=True).group
        except (MemoryReadError, struct.error):
            return
        leader = cluster.backend_at(group) if group != member.proc else None
        running = self._tracker.in_flight.get(leader.pid) if leader is not None else None
        if running is None:
            return
        running.group_waited = True
        if now_us - running.walked_us >= WALK_EVERY_US:
            waiting.append((cluster, member, running))

    def _read_usage_of(
        self,
        cluster: ClusterMemory,
        backend: SampledBackend,
        running: InFlight,
        now_us: int,
        locked: bool,
        text_age_us: float,
    ) -> None:
        """The statement's baseline at the first look that sees it running: the
        backend's counters and CPU clock, a few microseconds (OLTP statements are first
        seen by the thousand). Its /proc figures at the next look, if it still runs.
        And for one old enough to be reported, the counters again now and then: its
        end, should the backend be gone when the end is seen."""
        usage, pid = cluster.usage, backend.pid
        assert usage is not None  # the caller reads usage only where the cluster has it

        def still_ours() -> bool:
            return cluster.owns_slot(backend)

        if running.usage_start is None:
            running.usage_start = usage.counters(pid, still_ours)
            running.usage_read_us = now_us
            return
        budget = self._usage_budget
        if not running.usage_proc_read:
            if budget.allows():
                started = time.thread_time()
                running.usage_start = usage.with_proc(pid, running.usage_start, still_ours)
                running.usage_proc_read = True
                budget.spend(started)
            return
        # Again now and then once it may be reported; not while it waits on a lock (its
        # counters do not move then: a hundred sessions queued on one row cost nothing).
        due = now_us - running.usage_read_us >= USAGE_EVERY_US
        if due and not locked and now_us - running.start_us >= text_age_us:
            if budget.allows():
                started = time.thread_time()
                running.usage_last = usage.counters(pid, still_ours)
                running.usage_read_us = now_us
                budget.spend(started)

    def _walk_locks(
        self, waiting: list[tuple[ClusterMemory, SampledBackend, InFlight]], now_us: int
    ) -> None:
        """Who blocks the backends this look saw waiting on a heavyweight lock."""
        waiting.sort(key=lambda found: found[2].walked_us)
        for cluster in {cluster for cluster, _, _ in waiting}:
            cluster.locks.new_look()  # what this look reads of the lock table, shared
        for cluster, backend, running in waiting[:WALKS_PER_LOOK]:
            if not self._walk_budget.allows():
                break  # the rest at a later look, before those walked now
            started = time.thread_time()
            running.walked_us = now_us
            self._walk(cluster, backend, running)
            self._walk_budget.spend(started)
        waiting.clear()

    @staticmethod
    def _walk(cluster: ClusterMemory, backend: SampledBackend, running: InFlight) -> None:
        walked = cluster.locks.chain(backend.proc)
        if walked is None:
            return  # not waiting any more, or torn: the last walk stands
        waiter, links = walked
        if not links and running.blocked_by:
            return  # the lock just went free: who held it is the answer
        running.blocked_by = blocked_by(links, cluster.layout, cluster.describe)
        running.lock_wait_start_us = waiter.wait_start_us

    def _take_failures(self) -> bool:
        """Every failure and exit report waiting; whether there were any."""
        reader = self._failure_reader
        if reader is None or not reader.pending():
            return False
        while True:
            batch = reader.read(FAILURES_PER_LOOK)
            for raw in batch:
                try:
                    self._matcher.note(reader.decoder.failure(raw))
                except DecodeError:
                    self._counts["untracked"] += 1  # not knowable: its outcome would be a guess
            if len(batch) < FAILURES_PER_LOOK:
                return True

    def _outcome(self, finished: Finished) -> str:
        """ok, error or cancelled from the failure uprobes; without them (or for a
        statement that ended before they were attached), what the tracker read (an
        aborted transaction block: error; otherwise unknown)."""
        since = self._outcomes_since_us
        if since is None or finished.end_us < since + FAILURE_SLACK_US:
            return finished.outcome
        return self._matcher.outcome(finished)

    def _started(
        self, cluster: ClusterMemory, backend: SampledBackend, records: list[Record]
    ) -> None:
        self._owner[backend.pid] = (cluster, backend)
        records.append(BackendNotice(NoticeKind.BACKEND_STARTED, backend.pid))

    def _gone(
        self,
        cluster: ClusterMemory,
        backend: SampledBackend,
        last: BackendSample | None,
        records: list[Record],
        now_us: int,
    ) -> None:
        if self._owner.pop(backend.pid, None) is None:
            return  # already reported
        cluster.forget(backend.pid)
        self._background.discard(backend.pid)
        # Never read by pid once gone, not even when it ended its statement before it
        # left (backend_exited false): the pid may be another process's already. The
        # end figures are the last reading while it ran (_why).
        finished = self._tracker.backend_gone(backend.pid, last, now_us)
        self._emit(finished, records, cluster, backend, gone=True)
        records.append(BackendNotice(NoticeKind.BACKEND_EXITED, backend.pid))
        self._app_names.pop(backend.pid, None)

    def _reap(self, records: list[Record], now_us: int) -> None:
        """Backends the looks did not see go (no slot, its postmaster gone, its slot
        taken over between two looks): those no longer children of their postmaster."""
        self._take_failures()
        clusters = self._discovery.clusters
        children = {pid: cluster.children() for pid, cluster in clusters.items()}
        for pid, (cluster, backend) in list(self._owner.items()):
            if pid in children.get(cluster.pid, ()):
                continue
            if cluster.pid in clusters and cluster.still_child(pid):
                continue
            self._gone(cluster, backend, cluster.read_entry(backend), records, now_us)

    def _read_text(
        self, cluster: ClusterMemory, backend: SampledBackend, running: InFlight
    ) -> None:
        """The full text from the backend, kept only if its statement is still the one
        that is running (debug_query_string moves on with the next)."""
        found = cluster.statement_text(backend, self._query_max_bytes)
        if found is not None and cluster.activity_start(backend) == running.start_us:
            running.text, running.text_truncated = found
            self._app_names[backend.pid] = cluster.application_name(backend)

    def _emit(
        self,
        finished: Finished | None,
        records: list[Record],
        cluster: ClusterMemory,
        backend: SampledBackend,
        gone: bool = False,
    ) -> None:
        """`gone`: the backend was found gone; nothing more is read of it by its pid."""
        if finished is None:
            return
        if finished.backend_exited:
            finished = self._matcher.settle_exit(finished)
        self._counts["statements"] += 1
        if finished.duration_us < self._thresholds.at(finished.end_us):
            return
        if not self._window.owns(finished.start_us, finished.end_us):
            return  # the definition it switched from, or to, reports it
        text, truncated = finished.text, finished.text_truncated
        if text is None:
            # Never read while it ran (the looks fell behind): PostgreSQL's own copy,
            # if it still is this statement's; otherwise counted as not recorded.
            found = cluster.shared_text(backend, finished.start_us)
            if found is None:
                self._counts["unrecorded"] += 1
                return
            text, truncated = found
        self._counts["emitted"] += 1
        records.append(
            RawStatement(
                start_unix_ns=unix_ns(finished.start_us),
                duration_ns=finished.duration_us * 1000,
                pid=finished.pid,
                own_pid=backend.own_pid,
                query=text.decode(errors="replace"),
                query_truncated=truncated,
                backend_exited=finished.backend_exited,
                outcome=self._outcome(finished),
                protocol=None,
                application_name=self._app_names.get(finished.pid, ""),
                duration_exact=finished.exact,
                query_id=finished.query_id,
                waits=finished.waits,
                **self._why(cluster, backend, finished, gone),
            )
        )

    def _why(
        self, cluster: ClusterMemory, backend: SampledBackend, finished: Finished, gone: bool
    ) -> dict[str, Any]:
        """The event's blocked_by and resources: what the looks gathered while it ran,
        and the backend's counters now that its end is seen."""
        why: dict[str, Any] = {}
        if self._read_blockers:
            waited = finished.group_waited or any(w.startswith("Lock:") for w in finished.waits)
            # [] for a statement seen never waiting on a lock; None for one that did,
            # whose blockers no walk could read.
            why["blocked_by"] = finished.blocked_by or (None if waited else [])
            if finished.lock_wait_start_us is not None:
                why["lock_wait_start_unix_ns"] = unix_ns(finished.lock_wait_start_us)
        usage, start = cluster.usage, finished.usage_start
        if self._read_usage and usage and start:
            # Read now that its end is seen, while its slot says the pid is its own; when
            # the backend is gone, its last reading while it ran (its last moments
            # missing; its /proc figures unknown).
            end = None
            if not gone and not finished.backend_exited:
                end = usage.read(finished.pid, lambda: cluster.owns_slot(backend))
            end = end or finished.usage_last
            if end is not None:
                why["resources"] = statement_resources(start, end)
                why["resources_exact"] = False  # the baseline is the first look's
        return why


class _Looking:
    """The RecordReader of a SampledSource: its collector's thread does the looking."""

    def __init__(self, source: SampledSource) -> None:
        self._source = source

    def wait(self, timeout_ms: int) -> None:
        self._source.wait(timeout_ms)

    def read(self, limit: int) -> list[Record]:
        return self._source.read(limit)

    def decode(self, record: Record) -> Optional[Record]:
        return record  # made as records already

    def close(self) -> None:
        self._source.close_reading()  # the source itself (its counters) lives on


class OpenSampled:
    """`sampled`'s factory (probes.OpenSource), and what it needs of a binary
    (probes.ChecksBinary): the sampler's exported globals and a verified layout."""

    @property
    def symbols(self) -> frozenset[str]:
        return frozenset((*SAMPLER_GLOBALS, *USAGE_GLOBALS)) | OUTCOMES_PROGRAM.symbols

    def unsupported_reason(self, binary: PostgresBinary) -> Optional[str]:
        if (reason := unverified(binary.major)) is not None:
            return reason
        if "MyBEEntry" not in EXPORTED_GLOBALS[binary.major]:
            return f"PostgreSQL {binary.major} does not export MyBEEntry"
        return binary.unexported(SAMPLER_GLOBALS)

    def __call__(
        self, definition: ProbeDefinition, target: Target, daemon: DaemonConfig
    ) -> SampledSource:
        return SampledSource(definition, target, daemon)

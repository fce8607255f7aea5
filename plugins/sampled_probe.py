"""`sampled`: slow statements found by looking, with no trap per statement.

`probes = ["auto"]` picks it when threshold_ms >= 5 x sample_interval_ms. Every
`[daemon] sample_interval_ms` it reads each backend's pg_stat_activity entry and
wait word (sampler.py) and turns the looks into statements (statement_tracker.py):
an ordinary statement costs PostgreSQL nothing. The outcome comes from a small BPF
program (sampled_probe.c) on the error and cancel paths, which run only when a
statement fails, and on proc_exit, once per backend. What it gives up, said in each
event: a statement that ends between two looks is timed to the next one's start
(`duration_exact: false`), a statement shorter than threshold + 2 intervals may go
unseen, and the protocol is not told.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from pgslowlog.config import DaemonConfig
from pgslowlog.decoder import (
    BackendNotice,
    DecodeError,
    RawStatement,
    Record,
    RecordKind,
    decode_failure,
)
from pgslowlog.elf import PostgresBinary
from pgslowlog.hookspecs import hookimpl
from pgslowlog.loader import LoadedProbe, RingBufferReader, outcome_uprobes
from pgslowlog.log import get_logger
from pgslowlog.pg_layouts import EXPORTED_GLOBALS, LAYOUTS, layout_for
from pgslowlog.plugin_manager import RegisterProbe
from pgslowlog.probes import EXIT_UPROBE, ProbeDefinition
from pgslowlog.process_memory import MemoryReadError
from pgslowlog.sampler import (
    GLOBALS,
    PG_EPOCH_UNIX_US,
    Backend,
    Cluster,
    ClusterStarting,
    pg_now_us,
    postmasters,
)
from pgslowlog.sources import COUNTERS, ProbeLoadError
from pgslowlog.statement_tracker import BackendSample, Finished, InFlight, StatementTracker
from pgslowlog.targets import Target

log = get_logger(__name__)
DISCOVER_EVERY_S = 1.0  # how often new (or restarted) postmasters are looked for
# ... and while none is known, or for a while after one went (a restart): a statement
# in a new server's first moments is then seen. A look at /proc costs about 0.5 ms.
DISCOVER_SOON_S = 0.1
SOON_AFTER_LOSS_S = 10.0
# A statement's text is read once it is this many intervals short of the threshold:
# one that reaches the threshold is still running at some look after that.
TEXT_MARGIN_INTERVALS = 3
# A failure is matched with the statement that ran in its backend when it happened;
# PostgreSQL marks the end (the idle state) after the abort, so only clock
# conversion separates them.
FAILURE_SLACK_US = 1000
# "auto" picks sampled when the threshold is at least this many intervals: a statement
# of threshold + 2 intervals is then seen running at 5 or more looks, so it is never
# missed, and the end of one that ends between looks is off by at most 1/5 of the
# threshold (and flagged an upper bound). Below it, a uprobe definition times exactly.
AUTO_FLOOR_INTERVALS = 5


class SampledSource:
    """The StatementSource of `sampled`, and its own RecordReader."""

    loss_causes: ClassVar[dict[str, tuple[str, str, str]]] = {  # see health.LOSS_COUNTERS
        "unrecorded": (
            "slow_statements_unrecorded",
            "the looks fell behind: a slow statement ended before its text was read",
            "raise daemon.sample_interval_ms, or use the activity probe",
        ),
    }

    def __init__(self, definition: ProbeDefinition, target: Target, daemon: DaemonConfig) -> None:
        self.definition = definition
        self.target = target
        self._layout = layout_for(target.binary.major)
        self._identity = target.file.identity
        self._interval_s = daemon.sample_interval_ms / 1000
        self._query_max_bytes = daemon.query_max_bytes
        self._threshold_us = round(daemon.threshold_ms * 1000)
        # (from, threshold) in PostgreSQL microseconds: a statement is judged by the
        # threshold in effect when it ended, which may be a look before a reload.
        self._earlier_thresholds: list[tuple[int, int]] = []
        self._tracker = StatementTracker()
        self._clusters: dict[int, Cluster] = {}
        self._owner: dict[int, tuple[Cluster, Backend]] = {}  # backend pid -> where
        self._app_names: dict[int, str] = {}
        self._unreadable: set[int] = set()
        self._include_background = daemon.include_background
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._attached = False
        self._final_look = False
        self._next_look = 0.0
        self._next_discovery = 0.0
        self._soon_until = 0.0  # discovery every DISCOVER_SOON_S until then
        self._next_scan = 0.0
        # pid -> (PostgreSQL microseconds, "error" or "cancelled") since its statement began
        self._failures: dict[int, list[tuple[int, str]]] = {}
        # pid -> (when, "ok" or "error") of its exit: proc_exit's code 0 or another
        self._exits: dict[int, tuple[int, str]] = {}
        self._failure_reader: RingBufferReader | None = None
        self._outcomes: LoadedProbe | None = None
        self._primed: list[Record] = []
        # A definition switch (sources.HandsOver): which statements are this source's.
        self._ends_from_us: int | None = None
        self._starts_before_us: int | None = None
        self._looks_begun = self._looks_done = 0
        self._background: set[int] = set()  # followed backends that are not clients
        self._hand_over_look = 0  # the first look to begin after hand_over()
        # The binary exports the failure paths and proc_exit (every build does).
        exit_offset = target.binary.function_offset(EXIT_UPROBE.symbol)
        if outcome_uprobes(target) and exit_offset is not None:
            self._outcomes = LoadedProbe(SAMPLED_OUTCOMES, target, daemon)

    @property
    def attached_count(self) -> int:
        """The sampler, and the failure uprobes."""
        outcomes = self._outcomes.attached_count if self._outcomes else 0
        return outcomes + (1 if self._attached else 0)

    def describe(self) -> dict[str, object]:
        return {
            "sample_interval_ms": self._interval_s * 1000,
            "clusters": sorted(self._clusters),
            "failure_uprobes": self._outcomes.attached_count if self._outcomes else 0,
        }

    def attach(self) -> None:
        if self._outcomes is not None:
            self._outcomes.attach()
            self._failure_reader = self._outcomes.reader()
        try:
            self._discover()
        except OSError as error:
            raise ProbeLoadError(f"sampling {self.target.binary.path} failed: {error}") from None
        self._attached = True
        # A first look now: what runs at this moment is known before attach() returns,
        # which a definition switch relies on (take_over).
        self._primed = self.read(0)
        self._next_look = 0.0

    def take_over(self, at_ns: int) -> None:
        self._ends_from_us = at_ns // 1000 - PG_EPOCH_UNIX_US

    def hand_over(self, at_ns: int) -> None:
        self._starts_before_us = at_ns // 1000 - PG_EPOCH_UNIX_US
        # A look under way may have missed a statement that had just begun: wait for
        # one that began after this (the collector's thread is looking meanwhile).
        self._hand_over_look = self._looks_begun + 1

    @property
    def handed_over(self) -> bool:
        if self._starts_before_us is None or self._looks_done < self._hand_over_look:
            return False
        running = list(self._tracker.in_flight.values())  # one copy: the collector changes it
        # A walsender's or worker's "statement" may run for ever: only clients are waited for.
        background = self._background
        return all(s.start_us >= self._starts_before_us or s.pid in background for s in running)

    def reader(self) -> _Looking:
        return _Looking(self)

    def set_threshold_ns(self, threshold_ns: int) -> None:
        now_us = pg_now_us()
        # A new list, not appended to: the collector's thread may be reading the old one.
        self._earlier_thresholds = [*self._earlier_thresholds[-7:], (now_us, self._threshold_us)]
        self._threshold_us = threshold_ns // 1000

    def _threshold_at(self, end_us: int) -> int:
        """The threshold in effect at `end_us`: the one set before the first change
        that came after it, or the current one."""
        for changed_us, before in self._earlier_thresholds:
            if end_us < changed_us:
                return before
        return self._threshold_us

    def tick(self) -> None:
        pass  # clocks: PostgreSQL's timestamps are wall-clock time already

    def counters(self) -> dict[str, int]:
        counts = dict(self._counts)
        if self._outcomes is not None:
            counts["ringbuf_full"] = self._outcomes.counters()["ringbuf_full"]
        return counts

    def detach(self) -> None:
        if self._attached:
            self._final_look = True
        self._attached = False
        if self._outcomes is not None:
            self._outcomes.detach()

    def close(self) -> None:
        """After the collector closed its reader, and after the counters' last read."""
        self.detach()
        self.close_reading()
        if self._outcomes is not None:
            self._outcomes.close()

    def close_reading(self) -> None:
        if self._failure_reader is not None:
            self._failure_reader.close()
            self._failure_reader = None

    # What _Looking runs, in the collector's thread.
    def wait(self, timeout_ms: int) -> None:
        delay = self._next_look - time.monotonic()
        if delay > 0:
            time.sleep(min(delay, timeout_ms / 1000))

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
            # more after the stop).
            self._final_look = False
        elif now < self._next_look:
            return []
        self._next_look = now + self._interval_s
        if now >= self._next_discovery:
            self._discover()
        self._looks_begun += 1
        records = self._look()
        self._looks_done = self._looks_begun
        return records

    def _discover(self) -> None:
        now = time.monotonic()
        found = set(postmasters(self._identity, self._owner.keys()))
        # A postmaster that stays but whose memory cannot be read (its shared memory made
        # anew after a backend crashed, maybe elsewhere) is taken up again from scratch.
        lost = {pid for pid, cluster in self._clusters.items() if cluster.lost}
        for pid in (set(self._clusters) - found) | lost:
            del self._clusters[pid]  # _reap reports its backends gone (within a second)
            self._soon_until = now + SOON_AFTER_LOSS_S
        for pid in found - set(self._clusters):
            try:
                self._clusters[pid] = Cluster(
                    pid, self.target.binary, self._identity.inode, self._layout
                )
            except ClusterStarting:
                continue  # asked again at the next discovery
            except MemoryReadError as error:
                if pid not in self._unreadable:  # said once per postmaster, not each second
                    self._unreadable.add(pid)
                    log.warning("cluster_unreadable", postmaster=pid, error=str(error))
        soon = not self._clusters or now < self._soon_until or len(found) > len(self._clusters)
        self._next_discovery = now + (DISCOVER_SOON_S if soon else DISCOVER_EVERY_S)

    def _look(self) -> list[Record]:
        now_us = pg_now_us()
        records: list[Record] = []
        scan = time.monotonic() >= self._next_scan
        if scan:
            self._next_scan = time.monotonic() + DISCOVER_EVERY_S
            self._reap(records, now_us)
        text_age_us = self._threshold_us - TEXT_MARGIN_INTERVALS * self._interval_s * 1e6
        for cluster in self._clusters.values():
            if scan or cluster.base is None:
                # The status array shows new backends and exits by itself; the children
                # of the postmaster are asked only until the array is found, and once a
                # second for processes without a slot.
                for pid in cluster.children() - set(cluster.backends):
                    if (backend := cluster.adopt(pid)) is not None:
                        self._started(cluster, backend, records)
            look = cluster.look(self._tracker.in_flight.keys())
            if cluster.lost and time.monotonic() >= self._soon_until:
                # Gone (a restart?): find its successor now, and soon after.
                self._soon_until = time.monotonic() + SOON_AFTER_LOSS_S
                self._next_discovery = time.monotonic()
            # After the copy: a failure before an end the copy shows is in the ring now.
            self._take_failures()
            for backend, last in look.gone:
                self._gone(cluster, backend, last, records, now_us)
            for backend in look.appeared:
                self._started(cluster, backend, records)
            for backend, sample in look.samples:
                if sample is None:
                    continue  # caught mid-write: look again next time
                if not sample.client:
                    if not self._include_background:
                        continue  # autovacuum, walsenders, parallel workers: not asked for
                    self._background.add(backend.pid)
                finished = self._tracker.observe(sample, now_us)
                self._emit(finished, records, cluster, backend)
                running = self._tracker.in_flight.get(backend.pid)
                if running is not None and running.text is None:
                    if now_us - running.start_us >= text_age_us:
                        self._read_text(cluster, backend, running)
        for pid in self._failures.keys() - self._tracker.in_flight.keys():
            del self._failures[pid]  # no statement of its own left to explain
        for pid in self._exits.keys() - self._tracker.in_flight.keys():
            del self._exits[pid]
        return records

    def _take_failures(self) -> None:
        if self._failure_reader is None:
            return
        offset_ns = time.time_ns() - time.monotonic_ns()
        for raw in self._failure_reader.read(4096):
            try:
                failure = decode_failure(raw)
            except DecodeError:
                self._counts["untracked"] += 1  # not knowable: its outcome would be a guess
                continue
            at_us = (failure.at_ns + offset_ns) // 1000 - PG_EPOCH_UNIX_US
            if failure.exited:
                self._exits.setdefault(failure.pid, (at_us, failure.outcome))
            else:
                self._failures.setdefault(failure.pid, []).append((at_us, failure.outcome))

    def _outcome(self, finished: Finished) -> str:
        """ok, error or cancelled from the failure uprobes; without them, what the
        tracker read (an aborted transaction block: error; otherwise unknown)."""
        if self._outcomes is None:
            return finished.outcome
        failures = self._failures.get(finished.pid, ())
        start, end = finished.start_us, finished.end_us + FAILURE_SLACK_US
        aborts = [at for at, outcome in failures if outcome == "error" and start <= at <= end]
        if not aborts:
            # Its backend went while it ran (terminated, FATAL: no abort path runs), or
            # its slot was taken before the end was read and no exit was reported.
            return finished.outcome if finished.backend_exited else "ok"
        cancels = [at for at, outcome in failures if outcome == "cancelled" and at >= start]
        return "cancelled" if any(at <= aborts[0] for at in cancels) else "error"

    def _settle_exit(self, finished: Finished) -> Finished:
        """A statement still running at the last look that saw its backend: the
        backend's own exit (proc_exit) tells whether it had ended first (code 0: the
        client left after it) or was cut short, and bounds the end more closely than
        the look that found the backend gone (the end stays an upper bound)."""
        exit_seen = self._exits.get(finished.pid)
        if exit_seen is None or exit_seen[0] < finished.start_us:
            return finished
        at, outcome = exit_seen
        return replace(
            finished,
            end_us=max(min(at, finished.end_us), finished.start_us),
            backend_exited=outcome != "ok",
            outcome=outcome,
        )

    def _started(self, cluster: Cluster, backend: Backend, records: list[Record]) -> None:
        self._owner[backend.pid] = (cluster, backend)
        records.append(BackendNotice(RecordKind.BACKEND_STARTED, backend.pid))

    def _gone(
        self,
        cluster: Cluster,
        backend: Backend,
        last: BackendSample | None,
        records: list[Record],
        now_us: int,
    ) -> None:
        if self._owner.pop(backend.pid, None) is None:
            return  # already reported
        cluster.forget(backend.pid)
        self._background.discard(backend.pid)
        self._emit(self._tracker.backend_gone(backend.pid, last, now_us), records, cluster, backend)
        records.append(BackendNotice(RecordKind.BACKEND_EXITED, backend.pid))
        self._app_names.pop(backend.pid, None)

    def _reap(self, records: list[Record], now_us: int) -> None:
        """Backends the looks did not see go (no slot, its postmaster gone, its slot
        taken over between two looks): those no longer children of their postmaster."""
        self._take_failures()
        children = {pid: cluster.children() for pid, cluster in self._clusters.items()}
        for pid, (cluster, backend) in list(self._owner.items()):
            if pid in children.get(cluster.pid, ()):
                continue
            if cluster.pid in self._clusters and cluster.still_child(pid):
                continue
            self._gone(cluster, backend, cluster.read_entry(backend), records, now_us)

    def _read_text(self, cluster: Cluster, backend: Backend, running: InFlight) -> None:
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
        cluster: Cluster,
        backend: Backend,
    ) -> None:
        if finished is None:
            return
        if finished.backend_exited:
            finished = self._settle_exit(finished)
        self._counts["statements"] += 1
        if finished.duration_us < self._threshold_at(finished.end_us):
            return
        if self._ends_from_us is not None and finished.end_us < self._ends_from_us:
            return  # ended before a switch to this definition: the old one reported it
        if self._starts_before_us is not None and finished.start_us >= self._starts_before_us:
            return  # began after a switch away from it: its successor reports it
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
        wall_ns = (finished.start_us + PG_EPOCH_UNIX_US) * 1000
        records.append(
            RawStatement(
                start_ns=wall_ns - (time.time_ns() - time.monotonic_ns()),
                duration_ns=finished.duration_us * 1000,
                pid=finished.pid,
                query=text.decode(errors="replace"),
                query_truncated=truncated,
                backend_exited=finished.backend_exited,
                outcome=self._outcome(finished),
                protocol=None,
                application_name=self._app_names.get(finished.pid, ""),
                duration_exact=finished.exact,
                query_id=finished.query_id,
                waits=finished.waits,
            )
        )


class _Looking:
    """The RecordReader of a SampledSource: its collector's thread does the looking."""

    def __init__(self, source: SampledSource) -> None:
        self._source = source

    def wait(self, timeout_ms: int) -> None:
        self._source.wait(timeout_ms)

    def read(self, limit: int) -> list[Record]:
        return self._source.read(limit)

    def decode(self, record: Any) -> Record:
        return record  # made as records already

    def close(self) -> None:
        self._source.close_reading()  # the source itself (its counters) lives on


def sampled_unsupported(binary: PostgresBinary) -> str | None:
    if binary.major not in LAYOUTS:
        return (
            f"PostgreSQL {binary.major}'s struct layout is not verified "
            f"(verified: {', '.join(map(str, sorted(LAYOUTS)))})"
        )
    if "MyBEEntry" not in EXPORTED_GLOBALS[binary.major]:
        return f"PostgreSQL {binary.major} does not export MyBEEntry"
    return None


# Not registered: the BPF half of `sampled`, loaded by SampledSource where the binary
# exports the failure paths (the shared outcome uprobes, built to report failures).
SAMPLED_OUTCOMES = ProbeDefinition(
    name="sampled",
    description="the failure uprobes of sampled",
    source=Path(__file__).with_name("sampled_probe.c"),
    cflags=lambda _binary: ["-DREPORT_FAILURES=1"],
    attachments=(EXIT_UPROBE,),
    report_backend_exit=False,
    automatic=False,
)

SAMPLED = ProbeDefinition(
    name="sampled",
    description=(
        "no trap per statement: every backend's pg_stat_activity entry read every "
        "sample_interval_ms, and uprobes only on the error, cancel and exit paths (PostgreSQL "
        "14-18): each statement of a pipeline or batch on its own; the protocol is not "
        "told, statements under threshold + 2 intervals may go unseen"
    ),
    open_source=SampledSource,
    priority=200,  # "auto" picks it first, where the threshold allows
    auto_floor_ms=lambda daemon: AUTO_FLOOR_INTERVALS * daemon.sample_interval_ms,
    globals=GLOBALS,
    requirement=sampled_unsupported,
)


@hookimpl
def pgslowlog_register_probes(register: RegisterProbe) -> None:
    register(SAMPLED)

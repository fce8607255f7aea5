"""What an operator checks first: is every target probed, is anything lost.

The health line every `stats_interval_s`, a warning whenever a loss counter moved,
the totals of the `stopped` line, and the figures /metrics serves (metrics.py),
all from the sources' own counters and the dispatcher's per-sink figures. The main
loop reads the sources (every couple of seconds, in `report_losses`); the metrics
server's thread reads only what that left, so it never touches a source being closed.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from pgslowlog.dispatcher import Dispatcher
from pgslowlog.log import get_logger
from pgslowlog.probe_set import ProbeSet, RunningProbe
from pgslowlog.sources import ExplainsLosses, LossCause
from pgslowlog.targets import instance_name

log = get_logger(__name__)

GONE = "gone"  # the container "name" of the instances whose server has gone

# The per-target figures of the health line.
# `attachments`: the places the probes watch (uprobes and USDT probes for a BPF
# program; whatever a source counts as attached otherwise). `blind_ms`: time a look
# was due and none was taken (sampled/blind.py); a probe that traps never is blind.
TARGET_HEALTH = (
    "probes_attached",
    "attachments",
    "statements",
    "slow_events",
    "lost",
    "untracked",
    "blind_ms",
)
# Counters that mean something was lost, as a BPF program counts them; a source
# that is a sources.ExplainsLosses says what its own mean.
LOSS_CAUSES = {
    "untracked": LossCause(
        "statements_untracked",
        "no kernel memory for a backend's statement state",
        "look for memory pressure in the kernel log",
    ),
    "unrecorded": LossCause(
        "statements_unrecorded",
        "track_activities is off, so PostgreSQL kept no record for the probe to read",
        "turn track_activities on, or use the activity probe",
    ),
    "ringbuf_full": LossCause(
        "slow_statements_dropped",
        "ring buffer full",
        "raise daemon.ring_buffer_mib or the threshold",
    ),
}


@dataclass(frozen=True)
class ProbeFigures:
    """One running probe's figures at one moment."""

    name: str  # definition@target, as the `stopped` line keys them
    target: str
    attached_count: int
    counters: dict[str, int]
    container: str = ""  # the container of a containers = true target's instance

    @classmethod
    def of(cls, running: RunningProbe, attached_count: int | None = None) -> ProbeFigures:
        return cls(
            running.name,
            running.target.name,
            running.source.attached_count if attached_count is None else attached_count,
            running.source.counters(),
            running.target.container or "",
        )


@dataclass(frozen=True)
class ProbeTotals:
    """A definition on a target since the daemon started, probes already retired
    (replaced by a switch or an upgrade) included, so a counter never goes back."""

    target: str
    definition: str
    attached_count: int  # places watched now
    counters: dict[str, int]  # the source's counters, and `undecodable` records
    container: str = ""


def sum_per_target(figures: Sequence[ProbeFigures | ProbeTotals]) -> dict[str, dict[str, int]]:
    """Per target (per container, for a containers = true target): probes attached and
    the counters, summed over its probes."""
    targets: dict[str, dict[str, int]] = {}
    for probe in figures:
        counters = probe.counters
        name = instance_name(probe.target, probe.container)
        entry = targets.setdefault(name, dict.fromkeys(TARGET_HEALTH, 0))
        count = counters.get  # a source counts what it can know; the rest is 0
        entry["probes_attached"] += probe.attached_count > 0
        entry["attachments"] += probe.attached_count
        entry["statements"] += count("statements", 0)
        entry["slow_events"] += count("emitted", 0)
        entry["lost"] += count("ringbuf_full", 0)
        entry["untracked"] += count("untracked", 0) + count("unrecorded", 0)
        entry["blind_ms"] += count("blind_ms", 0)
    return targets


class HealthReporter:
    """Reads the probe set's sources from the main loop, and hears from the probe set
    (a probe_set.ProbeSetListener) when a probe retires."""

    def __init__(
        self, probes: ProbeSet, dispatcher: Dispatcher, explain: Mapping[str, int] | None = None
    ) -> None:
        self._probes = probes
        self._dispatcher = dispatcher
        self._explain = explain  # the Explainer's counts, live, with [explain]
        # Records filtered by probes already closed, kept for the totals.
        self._filtered_retired = 0
        # Each running probe's figures (and undecodable records) at the last look: a
        # loss warning says what is new since then, and /metrics serves them. With the
        # counters of retired ones per (target, definition). Read by another thread.
        self._lock = threading.Lock()
        self._latest: dict[RunningProbe, tuple[ProbeFigures, int]] = {}
        self._retired_totals: dict[tuple[str, str, str], Counter[str]] = {}
        # The last figures of the last probe retired per (target, definition), for the
        # `stopped` line: one per key, so switches and upgrades do not pile them up.
        self._retired_last: dict[tuple[str, str, str], ProbeFigures] = {}

    def report_losses(self) -> None:
        for running in self._probes:
            self.report_losses_of(running)

    def report_losses_of(
        self, running: RunningProbe, attached_count: int | None = None
    ) -> ProbeFigures:
        figures = ProbeFigures.of(running, attached_count)
        now = figures.counters
        with self._lock:
            last = self._latest.get(running)
            self._latest[running] = (figures, _failed(running))
        before = last[0].counters if last is not None else {}
        # A source may say its own losses (what a count means for it, and the fix).
        source = running.source
        causes = source.loss_causes if isinstance(source, ExplainsLosses) else LOSS_CAUSES
        for counter, (event, cause, fix) in causes.items():
            if lost := now.get(counter, 0) - before.get(counter, 0):
                log.warning(
                    event,
                    probe=running.definition.name,
                    target=running.target.name,
                    **({"container": running.target.container} if running.target.container else {}),
                    count=lost,
                    cause=cause,
                    fix=fix,
                )
        return figures

    def retiring(self, running: RunningProbe) -> None:
        """A probe is stopped and about to be closed: report its last losses, keep its
        record totals, and its final figures (with the places it watched while attached:
        it is detached by now)."""
        key = _key(running)
        self._retired_last.pop(key, None)  # an earlier probe's: not this one's figures
        try:
            self._retired_last[key] = self.report_losses_of(running, running.attachments)
        finally:
            # Even when its counters could not be read: its last figures move to the
            # retired totals, and it no longer counts as attached.
            self._filtered_retired += running.collector.enricher.filtered
            with self._lock:
                last = self._latest.pop(running, None)
                if last is not None:
                    totals = self._retired_totals.setdefault(key, Counter())
                    totals.update(last[0].counters)
                    totals["undecodable"] += last[1]

    def fold_container(self, target: str, container: str) -> None:
        """A container's server is gone: its instance's totals join the target's GONE
        ones, so a host where containers come and go (a Kubernetes container gets a new
        id at every restart) does not list every one it ever saw."""
        with self._lock:
            for key in [k for k in self._retired_totals if k[:2] == (target, container)]:
                totals = self._retired_totals.setdefault((target, GONE, key[2]), Counter())
                totals.update(self._retired_totals.pop(key))
            for key in [k for k in self._retired_last if k[:2] == (target, container)]:
                del self._retired_last[key]

    def probe_totals(self) -> list[ProbeTotals]:
        """Every definition that ran on a target, as of the last `report_losses`."""
        with self._lock:
            totals = {key: Counter(counters) for key, counters in self._retired_totals.items()}
            attached: Counter[tuple[str, str, str]] = Counter(dict.fromkeys(totals, 0))
            for running, (figures, failed) in self._latest.items():
                key = _key(running)
                totals.setdefault(key, Counter()).update(figures.counters)
                totals[key]["undecodable"] += failed
                attached[key] += figures.attached_count
        return [
            ProbeTotals(target, definition, attached[key], dict(counters), container)
            for key, counters in sorted(totals.items())
            for target, container, definition in [key]
        ]

    def filtered_background(self) -> int:
        return self._filtered_retired + sum(r.collector.enricher.filtered for r in self._probes)

    def health(self) -> dict[str, object]:
        """The health line: the counters since the daemon started, as of the last
        `report_losses` (the main loop's), the very figures /metrics serves."""
        totals = self.probe_totals()
        return {
            "targets": sum_per_target(totals),
            "sinks": {name: asdict(stats) for name, stats in self._dispatcher.stats().items()},
            "undecodable_records": _undecodable(totals),
            **({"explain": dict(self._explain)} if self._explain is not None else {}),
        }

    def stopped(self, stopped: list[RunningProbe]) -> dict[str, object]:
        """The `stopped` line, once every probe is retired: the counters since start
        (probes replaced earlier included), and the places the last ones watched."""
        final = [f for r in stopped if (f := self._retired_last.get(_key(r))) is not None]
        totals = self.probe_totals()
        targets = sum_per_target(totals)
        for name, watched in sum_per_target(final).items():
            targets.setdefault(name, watched).update(
                probes_attached=watched["probes_attached"], attachments=watched["attachments"]
            )
        return {
            "targets": targets,
            "kernel_counters": {probe.name: probe.counters for probe in final},
            "filtered_background": self.filtered_background(),
            "failed_records": _undecodable(totals),
        }


def _undecodable(totals: list[ProbeTotals]) -> int:
    return sum(probe.counters.get("undecodable", 0) for probe in totals)


def _key(running: RunningProbe) -> tuple[str, str, str]:
    """target, container ("" outside containers), definition"""
    return running.target.name, running.target.container or "", running.definition.name


def _failed(running: RunningProbe) -> int:
    return running.collector.failed_records + running.collector.undecodable

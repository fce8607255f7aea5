"""Every running source with its collector, owned as one object per (target, definition).

A source without its collector would record statements nobody reads, and a
collector without its source would wait forever: so a RunningProbe exists only
once both have started, and stopping one stops, drains and frees both together.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from pgslowlog.collector import Collector
from pgslowlog.config import DaemonConfig
from pgslowlog.dispatcher import Dispatcher
from pgslowlog.enrichment import Enricher
from pgslowlog.log import get_logger
from pgslowlog.probes import OpenSource, ProbeDefinition
from pgslowlog.sources import StatementSource, open_source
from pgslowlog.targets import Target

log = get_logger(__name__)
T = TypeVar("T")
NEVER_NS = 2**63 - 1  # a threshold nothing reaches


@dataclass(eq=False)
class RunningProbe:
    source: StatementSource
    collector: Collector
    attachments: int  # places it watched once attached (attached_count is 0 after detach)
    handing_over: bool = False  # replaced on its target; stopped once `handed_over`

    @property
    def definition(self) -> ProbeDefinition:
        return self.source.definition

    @property
    def target(self) -> Target:
        return self.source.target

    @property
    def name(self) -> str:
        return f"{self.definition.name}@{self.target.name}"


def can_hand_over(source: StatementSource) -> bool:
    """Whether a source shares out its statements at a switch (sources.HandsOver)."""
    return hasattr(source, "hand_over") and hasattr(source, "handed_over")


class ProbeSet:
    def __init__(
        self,
        dispatcher: Dispatcher,
        daemon: DaemonConfig,
        on_failure: Callable[[str], None],
        opener: OpenSource = open_source,
    ) -> None:
        self._dispatcher = dispatcher
        self._daemon = daemon
        self._on_failure = on_failure
        self._open = opener
        self._running: list[RunningProbe] = []
        # The live threshold: a SIGHUP may have moved it since start-up, and a source
        # opened later (a target re-attached, a binary installed) must use it too.
        self._threshold_ns = round(daemon.threshold_ms * 1_000_000)

    def __iter__(self) -> Iterator[RunningProbe]:
        return iter(list(self._running))

    def __len__(self) -> int:
        return len(self._running)

    def start(
        self,
        target: Target,
        definitions: list[ProbeDefinition],
        attached: Callable[[StatementSource], None] | None = None,
    ) -> list[RunningProbe]:
        """Start every definition on `target`, or none: a failure stops those begun.
        `attached` sees each source once attached, before its collector reads anything.

        Raises sources.ProbeLoadError (or whatever a source raised) after cleaning up.
        """
        started: list[RunningProbe] = []
        try:
            for definition in definitions:
                started.append(self._start_one(target, definition, attached))
        except BaseException:
            self._stop(started, lambda _running: None)
            raise
        return started

    def _start_one(
        self,
        target: Target,
        definition: ProbeDefinition,
        attached: Callable[[StatementSource], None] | None,
    ) -> RunningProbe:
        source = self._open(definition, target, self._daemon)
        try:
            source.set_threshold_ns(self._threshold_ns)
            source.attach()
            if attached is not None:
                attached(source)
            attachments = source.attached_count
            daemon = self._daemon
            enricher = Enricher(
                definition.name,
                target.binary.path,
                target.name,
                daemon.include_background,
                daemon.max_backends,
                daemon.params_max_length,
                daemon.redact_literals,
            )
            name = f"{definition.name}@{target.name}"
            reader = source.reader()
            try:
                collector = Collector(name, reader, enricher, self._dispatcher, self._on_failure)
                collector.start()
            except BaseException:
                reader.close()
                raise
        except BaseException:
            source.close()
            raise
        running = RunningProbe(source, collector, attachments)
        self._running.append(running)
        log.info(
            "probe_attached",
            probe=definition.name,
            target=target.name,
            binary=target.binary.path,
            postgres_version=target.binary.version,
            **source.describe(),
        )
        return running

    def set_threshold_ns(self, threshold_ns: int) -> None:
        self._threshold_ns = threshold_ns
        for running in self._running:
            running.source.set_threshold_ns(threshold_ns)

    def tick(self, retire: Callable[[RunningProbe], object]) -> None:
        for running in self._running:
            running.source.tick()
        done = [
            r
            for r in self._running
            if r.handing_over and r.source.handed_over  # type: ignore[attr-defined]
        ]
        if done:
            self._stop(done, retire)
            for running in done:
                log.info(
                    "probe_handed_over", probe=running.definition.name, target=running.target.name
                )

    def switch(
        self,
        target: Target,
        definitions: list[ProbeDefinition],
        retire: Callable[[RunningProbe], object],
    ) -> list[str]:
        """Run `definitions` on `target` instead of what runs there now, with nothing lost
        in between: the new sources attach first (if one fails, the old ones keep
        running), then each old one either hands its running statements over (a source
        that can, see sources.HandsOver: it keeps running until they end) or stops.
        Returns the names started.

        Where an old one stops, a new source that can take over is told, once attached
        and before its collector reads, to report only what ends from now on, and the
        old one's threshold is raised at once: only a statement ending between those
        two steps (microseconds) can be reported by both. Where the old one hands over,
        the mark is taken once the new uprobes are live: a statement that begins
        between the two is reported by both, never by neither.
        """
        running = [
            r for r in self._running if r.target.index == target.index and not r.handing_over
        ]
        current = {r.definition for r in running}
        leaving = [r for r in running if r.definition not in definitions]
        handing = [r for r in leaving if can_hand_over(r.source)]
        stopping = [r for r in leaving if r not in handing]

        def take_over(source: StatementSource) -> None:
            if stopping and hasattr(source, "take_over"):
                source.take_over(time.time_ns())
                for old in stopping:
                    old.source.set_threshold_ns(NEVER_NS)  # what ends from now is the new one's

        try:
            started = self.start(target, [d for d in definitions if d not in current], take_over)
        except BaseException:
            for old in stopping:  # they keep running: as they were
                old.source.set_threshold_ns(self._threshold_ns)
            raise
        at_ns = time.time_ns()
        for old in handing:
            old.source.hand_over(at_ns)  # type: ignore[attr-defined]
            old.handing_over = True
        if stopping:
            self._stop(stopping, retire)
        return [r.definition.name for r in started]

    def stop_target(self, index: int, before_close: Callable[[RunningProbe], T]) -> list[T]:
        """Stop one target's probes. `before_close` sees each one detached and drained,
        its counters still readable; what it returns is returned, one per probe."""
        return self._stop([r for r in self._running if r.target.index == index], before_close)

    def stop_all(self, before_close: Callable[[RunningProbe], T]) -> list[T]:
        return self._stop(list(self._running), before_close)

    def _stop(
        self, stopping: list[RunningProbe], before_close: Callable[[RunningProbe], T]
    ) -> list[T]:
        # Detach all first, so that no statement begins or ends while others drain.
        for running in stopping:
            try:
                running.source.detach()
            except Exception as error:  # keep stopping the others
                log.error("probe_detach_failed", probe=running.name, error=str(error))
        for running in stopping:
            running.collector.stop()
        for running in stopping:
            running.collector.join()
        results = []
        for running in stopping:
            try:
                results.append(before_close(running))
            except Exception as error:
                log.error("probe_report_failed", probe=running.name, error=str(error))
            finally:
                try:
                    running.source.close()
                except Exception as error:
                    log.error("probe_close_failed", probe=running.name, error=str(error))
                if running in self._running:
                    self._running.remove(running)
        return results

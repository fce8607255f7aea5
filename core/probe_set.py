"""Every running source with its collector, owned as one object per (target, definition).

A source without its collector would record statements nobody reads, and a
collector without its source would wait forever: so a RunningProbe exists only
once both have started, and stopping one stops, drains and frees both together.
Listeners (health.py) see each probe once it is stopped and drained, before it is
freed. The probe set also follows "auto" live: when a reload moves the threshold
across a definition's floor, it switches the target to the definition "auto" now
picks, with nothing lost in between.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Optional, Protocol

from pgslowlog.collector import Collector
from pgslowlog.config import Config, DaemonConfig
from pgslowlog.containers import own_pid_namespace
from pgslowlog.dispatcher import HandsEventsOn
from pgslowlog.enrichment import Enricher
from pgslowlog.errors import UserError
from pgslowlog.log import get_logger
from pgslowlog.planner import Planner
from pgslowlog.probes import AUTO, ProbeDefinition
from pgslowlog.sources import AttachesLater, HandsOver, StatementSource
from pgslowlog.targets import Target, instance_name

log = get_logger(__name__)
NEVER_NS = 2**63 - 1  # a threshold nothing reaches
# How long "ready" waits for what sources attach in the background (a compile).
SETTLE_S = 120.0


def probe_label(definition: ProbeDefinition, target: Target) -> str:
    """What logs call a definition on a target: definition@target[container]."""
    return f"{definition.name}@{instance_name(target.name, target.container)}"


@dataclass(eq=False)
class RunningProbe:
    definition: ProbeDefinition
    target: Target
    source: StatementSource
    collector: Collector
    attachments: int  # places it watched once attached (attached_count is 0 after detach)
    handing_over: bool = False  # replaced on its target; stopped once `handed_over()`

    @property
    def name(self) -> str:
        return probe_label(self.definition, self.target)


class ProbeSetListener(Protocol):
    def retiring(self, running: RunningProbe, /) -> None:
        """`running` is stopped and drained, its counters still readable; it is freed next."""


class ProbeSet:
    def __init__(
        self, dispatcher: HandsEventsOn, daemon: DaemonConfig, on_failure: Callable[[str], None]
    ) -> None:
        self._dispatcher = dispatcher
        self._daemon = daemon
        self._on_failure = on_failure
        self._running: list[RunningProbe] = []
        self._listeners: list[ProbeSetListener] = []
        # The live threshold: a SIGHUP may have moved it since start-up, and a source
        # opened later (a target re-attached, a binary installed) must use it too.
        self.threshold_ns = round(daemon.threshold_ms * 1_000_000)
        # A reload's switch waits for a hand-over on its target to finish.
        self.auto_pending = False

    def __iter__(self) -> Iterator[RunningProbe]:
        return iter(list(self._running))

    def __len__(self) -> int:
        return len(self._running)

    def add_listener(self, listener: ProbeSetListener) -> None:
        self._listeners.append(listener)

    def settle(self, timeout_s: float = SETTLE_S) -> None:
        """Wait for the sources that attach more of themselves in the background."""
        deadline = time.monotonic() + timeout_s
        for running in list(self._running):
            if isinstance(running.source, AttachesLater):
                running.source.settle(max(0.0, deadline - time.monotonic()))

    @property
    def handing_over(self) -> bool:
        return any(r.handing_over for r in self._running)

    def start(
        self,
        target: Target,
        definitions: list[ProbeDefinition],
        attached: Optional[Callable[[StatementSource], None]] = None,
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
            self._stop(started, quietly=True)
            raise
        return started

    def _start_one(
        self,
        target: Target,
        definition: ProbeDefinition,
        attached: Optional[Callable[[StatementSource], None]],
    ) -> RunningProbe:
        source = definition.open(definition, target, self._daemon)
        try:
            source.set_threshold_ns(self.threshold_ns)
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
                target.server,
                target.scope != own_pid_namespace(),
                daemon.host_name(),
            )
            reader = source.reader()
            try:
                collector = Collector(
                    probe_label(definition, target),
                    reader,
                    enricher,
                    self._dispatcher,
                    self._on_failure,
                )
                collector.start()
            except BaseException:
                reader.close()
                raise
        except BaseException:
            source.close()
            raise
        running = RunningProbe(definition, target, source, collector, attachments)
        self._running.append(running)
        log.info(
            "probe_attached",
            probe=definition.name,
            target=target.name,
            binary=target.binary.path,
            postgres_version=target.binary.version,
            **({"container": target.container} if target.container is not None else {}),
            **source.describe(),
        )
        return running

    def set_threshold_ns(self, threshold_ns: int) -> None:
        self.threshold_ns = threshold_ns
        for running in self._running:
            running.source.set_threshold_ns(threshold_ns)

    def tick(self) -> None:
        """Every few seconds: sources keep their clocks; those done handing over stop."""
        for running in self._running:
            running.source.tick()
        done = [
            r
            for r in self._running
            if r.handing_over and isinstance(r.source, HandsOver) and r.source.handed_over()
        ]
        if done:
            self._stop(done)
            for running in done:
                log.info(
                    "probe_handed_over", probe=running.definition.name, target=running.target.name
                )

    def switch(self, target: Target, definitions: list[ProbeDefinition]) -> list[RunningProbe]:
        """Run `definitions` on `target` instead of what runs there now, with nothing lost
        in between: the new sources attach first (if one fails, the old ones keep
        running), then each old one either hands its running statements over (a source
        that can, sources.HandsOver: it keeps running until they end) or stops.
        Returns the probes started.

        Where an old one stops, a new source that can take over is told, once attached
        and before its collector reads, to report only what ends from now on, and the
        old one's threshold is raised at once: only a statement ending between those
        two steps (microseconds) can be reported by both. Where the old one hands over,
        the mark is taken once the new uprobes are live: a statement that begins
        between the two is reported by both, never by neither.
        """
        running = [r for r in self._running if r.target.key == target.key and not r.handing_over]
        current = {r.definition for r in running}
        leaving = [r for r in running if r.definition not in definitions]
        handing = [r for r in leaving if isinstance(r.source, HandsOver)]
        stopping = [r for r in leaving if r not in handing]

        def take_over(source: StatementSource) -> None:
            if stopping and isinstance(source, HandsOver):
                source.take_over(time.time_ns())
                for old in stopping:
                    old.source.set_threshold_ns(NEVER_NS)  # what ends from now is the new one's

        try:
            started = self.start(target, [d for d in definitions if d not in current], take_over)
        except BaseException:
            for old in stopping:  # they keep running: as they were
                old.source.set_threshold_ns(self.threshold_ns)
            raise
        at_ns = time.time_ns()
        for old in handing:
            assert isinstance(old.source, HandsOver)  # for the type checker: chosen so above
            old.source.hand_over(at_ns)
            old.handing_over = True
        if stopping:
            self._stop(stopping)
        return started

    def follow_auto(self, config: Config, planner: Planner) -> list[str]:
        """Where "auto" now picks other definitions (the threshold crossed a floor, such
        as sampled's), switch them live. Returns the probes started. A target still
        handing over from an earlier switch is left for later (`auto_pending`)."""
        switched: list[str] = []
        self.auto_pending = False
        # One per instance: a containers = true target has one per container.
        running = {r.target.key: r.target for r in self._running if not r.handing_over}
        handing_over = {r.target.key for r in self._running if r.handing_over}
        for key, current in running.items():
            target_config = config.target[current.index]
            if AUTO not in target_config.probes:
                continue
            if key in handing_over:
                self.auto_pending = True  # decided again once that switch is done
                continue
            active = {
                r.definition for r in self._running if r.target.key == key and not r.handing_over
            }
            try:
                # Decided on the binary already read: a reload (logrotate sends one a
                # day) re-reads the file only when the choice changes.
                wanted = planner.choose(target_config, current.binary, current.label, config.daemon)
                if set(wanted) == active:
                    continue
                target, definitions = planner.resolve(
                    target_config, current.index, config.daemon, current.server
                )
            except UserError as error:
                log.error("probe_switch_failed", target=current.name, error=str(error))
                continue
            with target.file:
                if target.file.identity != current.file.identity:
                    continue  # the binary was replaced: the watcher attaches to the new one
                try:
                    started = self.switch(target, definitions)
                except Exception as error:  # ProbeLoadError, or a third-party source's
                    log.error("probe_switch_failed", target=current.name, error=str(error))
                    continue
            switched += [r.name for r in started]
        return switched

    def stop_target(self, index: int, container: str | None = None) -> list[RunningProbe]:
        """Stop one target's probes (of one container's instance, for a containers =
        true target); the listeners see each before it is freed."""
        key = (index, container)
        return self._stop([r for r in self._running if r.target.key == key])

    def stop_all(self) -> list[RunningProbe]:
        return self._stop(list(self._running))

    def _stop(self, stopping: list[RunningProbe], quietly: bool = False) -> list[RunningProbe]:
        """Detach, drain and free; `quietly`: probes that never ran for the listeners
        (a start that failed half-way)."""
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
        for running in stopping:
            try:
                if not quietly:
                    for listener in self._listeners:
                        listener.retiring(running)
            except Exception as error:
                log.error("probe_report_failed", probe=running.name, error=str(error))
            finally:
                try:
                    running.source.close()
                except Exception as error:
                    log.error("probe_close_failed", probe=running.name, error=str(error))
                if running in self._running:
                    self._running.remove(running)
        return stopping

"""Delivers events to sinks: one bounded queue and one worker thread per sink.

A sink that blocks, slows down or raises only affects its own lane: when its queue
is full its *oldest* event is dropped and counted (the newest say most about what
is slow now). Exceptions from a sink are caught per batch. On shutdown each sink
gets its own time budget; what it could not deliver is counted and logged.
The collectors (collector.py) hand events over in batches, from their own threads.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pgslowlog.errors import UserError
from pgslowlog.event import SlowQuery
from pgslowlog.log import get_logger
from pgslowlog.sinks import CommonSinkOptions, Sink, SinkType

log = get_logger(__name__)


@dataclass
class SinkStats:
    delivered: int = 0
    retried: int = 0
    failed: int = 0
    dropped: int = 0  # queue full (oldest first), or still queued when time ran out
    spooled: int = 0  # held in the sink's own spool now, to be delivered (clickhouse)


class _Lane:
    """One sink, its queue and its worker thread."""

    def __init__(self, name: str, sink: Sink, queue_size: int, shutdown_timeout_s: float) -> None:
        self.name = name
        self.sink = sink
        self.queue_size = queue_size
        self.shutdown_timeout_s = shutdown_timeout_s
        self.stats = SinkStats()
        self._events: deque[SlowQuery] = deque()
        self._changed = threading.Condition()
        self._reopen_requested = False
        self._closing = False
        self.deadline = float("inf")
        self._in_flight = 0  # events inside the current write()
        self._abandoned = False  # given up at shutdown while stuck in write()
        self.thread = threading.Thread(target=self._run, name=f"sink-{name}", daemon=True)

    def put_many(self, events: list[SlowQuery]) -> None:
        """Queue a batch under one lock; when full, the oldest events make room."""
        with self._changed:
            self._events.extend(events)
            if (excess := len(self._events) - self.queue_size) > 0:
                before = self.stats.dropped
                for _ in range(excess):
                    self._events.popleft()
                self.stats.dropped += excess
                # Said on the first drop and about every thousand after it, not per event.
                if before == 0 or before // 1000 != self.stats.dropped // 1000:
                    log.warning(
                        "sink_queue_full",
                        sink=self.name,
                        dropped=self.stats.dropped,
                        fix=f"the sink is too slow: raise sinks.{self.name}.queue_size or fix it",
                    )
            self._changed.notify()

    def request_reopen(self) -> None:
        with self._changed:
            self._reopen_requested = True
            self._changed.notify()

    def begin_close(self, now: float) -> None:
        with self._changed:
            self._closing = True
            self.deadline = now + self.shutdown_timeout_s
            self._changed.notify()

    def _next_batch(self) -> list[SlowQuery] | None:
        """Wait for work; None when closing and nothing is left (or time is up)."""
        with self._changed:
            self._changed.wait_for(lambda: self._events or self._closing or self._reopen_requested)
            if self._reopen_requested:
                self._reopen_requested = False
                return []
            if self._closing and (not self._events or time.monotonic() >= self.deadline):
                self._give_up_queued()
                return None
            delay = self.sink.max_delay_s
            if delay > 0 and not self._closing and len(self._events) < self.sink.max_batch:
                self._changed.wait_for(
                    lambda: len(self._events) >= self.sink.max_batch or self._closing, delay
                )
            if len(self._events) <= self.sink.max_batch:
                batch = list(self._events)  # the usual case: take all, in one copy
                self._events.clear()
                return batch
            return [self._events.popleft() for _ in range(self.sink.max_batch)]

    def _give_up_queued(self) -> None:
        if self._events:
            self.stats.dropped += len(self._events)
            log.error(
                "sink_undelivered_at_shutdown",
                sink=self.name,
                events=len(self._events),
                fix=f"raise sinks.{self.name}.shutdown_timeout_s or fix the sink",
            )
            self._events.clear()

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            if not batch:
                self.call("reopen")
                continue
            self._in_flight = len(batch)
            held = 0  # kept in the sink's spool: its own count says how that ends
            try:
                answer = self.sink.write(batch)
                # Only a count of the batch's events means anything (a third party's
                # sink may return whatever its client returned).
                if isinstance(answer, int) and not isinstance(answer, bool):
                    held = min(max(answer, 0), len(batch))
                outcome = "delivered"
            except Exception as error:
                outcome = "failed"
                log.error("sink_write_failed", sink=self.name, events=len(batch), error=str(error))
            with self._changed:
                # An abandoned write that returns late was counted as dropped already.
                if not self._abandoned:
                    done = len(batch) - held
                    setattr(self.stats, outcome, getattr(self.stats, outcome) + done)
                self._in_flight = 0
        self.call("close")

    def abandon(self) -> None:
        """The worker is stuck in write(): count what it holds and what waits as dropped."""
        with self._changed:
            lost = len(self._events) + self._in_flight
            self._events.clear()
            self._abandoned = True
            self.stats.dropped += lost
        log.error("sink_stuck_at_shutdown", sink=self.name, undelivered=lost)

    def call(self, method: str) -> None:
        try:
            getattr(self.sink, method)()
        except Exception as error:
            log.error(f"sink_{method}_failed", sink=self.name, error=str(error))

    def snapshot(self) -> SinkStats:
        stats = self.stats
        sink = self.sink  # a third party's sink may implement the protocol without spool
        return SinkStats(
            delivered=stats.delivered + getattr(sink, "delivered_later", 0),
            retried=sink.retried,
            failed=stats.failed,
            dropped=stats.dropped + getattr(sink, "dropped_later", 0),
            spooled=getattr(sink, "spooled", 0),
        )


class HandsEventsOn(Protocol):
    """What a collector hands its events to: the Dispatcher, or the Explainer before it."""

    def dispatch_many(self, events: list[SlowQuery], /) -> None: ...


class Dispatcher:
    def __init__(self) -> None:
        self._lanes: list[_Lane] = []
        # Called with every batch once the sinks have it (metrics.py counts there).
        self.observers: list[Callable[[list[SlowQuery]], None]] = []

    def add_sink(self, name: str, sink: Sink, queue_size: int, shutdown_timeout_s: float) -> None:
        self._lanes.append(_Lane(name, sink, queue_size, shutdown_timeout_s))

    def sink_names(self) -> list[str]:
        return [lane.name for lane in self._lanes]

    def start(self) -> None:
        for lane in self._lanes:
            lane.thread.start()

    def dispatch_many(self, events: list[SlowQuery]) -> None:
        for lane in self._lanes:
            lane.put_many(events)
        for observe in self.observers:
            try:
                observe(events)
            except Exception:
                # Counting must never cost an event, nor stop the collector that calls.
                log.exception("observer_failed", events=len(events))

    def reopen(self) -> None:
        for lane in self._lanes:
            lane.request_reopen()

    def stats(self) -> dict[str, SinkStats]:
        return {lane.name: lane.snapshot() for lane in self._lanes}

    def close(self) -> dict[str, SinkStats]:
        """Deliver what is queued within each sink's shutdown_timeout_s, then close it."""
        now = time.monotonic()
        for lane in self._lanes:
            lane.begin_close(now)
        for lane in self._lanes:
            lane.thread.join(max(0.0, lane.deadline - time.monotonic()))
            if lane.thread.is_alive():
                # Stuck inside write(): ask it to give up, allow a moment, then leave it.
                lane.call("interrupt")
                lane.thread.join(1.0)
            if lane.thread.is_alive():
                lane.abandon()
        return self.stats()


def start_sinks(
    sink_options: dict[str, tuple[CommonSinkOptions, object]],
    sink_types: dict[str, SinkType],
    default_queue_size: int,
) -> Dispatcher:
    """A dispatcher with every configured sink that could start (not yet running);
    UserError if none could."""
    dispatcher = Dispatcher()
    failed = []
    for name, (common, options) in sink_options.items():
        try:
            sink = sink_types[name].create(options)
        except Exception as error:  # a third-party sink may raise anything
            failed.append(f"sink {name} cannot start: {error}")
            log.error("sink_start_failed", sink=name, error=str(error))
            continue
        queue_size = common.queue_size or default_queue_size
        dispatcher.add_sink(name, sink, queue_size, common.shutdown_timeout_s)
    if len(failed) == len(sink_options):
        raise UserError(
            "; ".join(failed),
            "fix the [sinks.NAME] options, the path's permissions, or the plugin",
        )
    return dispatcher

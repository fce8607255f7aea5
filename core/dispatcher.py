"""Delivers events to sinks: one bounded queue and one thread per sink.

A slow or failing sink only fills its own queue; when a queue is full the event is
dropped for that sink alone, counted and logged. Sink exceptions are caught per
event. Never called from the ring-buffer callback: collector.py hands over batches.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

from pgslowlog.event import SlowQuery
from pgslowlog.log import get_logger
from pgslowlog.sinks import Sink

log = get_logger(__name__)

_REOPEN = object()
_STOP = object()


@dataclass
class SinkStats:
    delivered: int = 0
    failed: int = 0
    dropped: int = 0


@dataclass
class _Lane:
    name: str
    sink: Sink
    queue: queue.Queue[object]
    stats: SinkStats = field(default_factory=SinkStats)
    thread: threading.Thread | None = None


class Dispatcher:
    def __init__(self, sinks: dict[str, Sink], queue_size: int) -> None:
        self._lanes = [_Lane(name, sink, queue.Queue(queue_size)) for name, sink in sinks.items()]
        self._lock = threading.Lock()  # collectors of several probes dispatch concurrently

    def start(self) -> None:
        for lane in self._lanes:
            lane.thread = threading.Thread(
                target=self._deliver, args=(lane,), name=f"sink-{lane.name}", daemon=True
            )
            lane.thread.start()

    def dispatch(self, event: SlowQuery) -> None:
        with self._lock:
            for lane in self._lanes:
                try:
                    lane.queue.put_nowait(event)
                except queue.Full:
                    lane.stats.dropped += 1
                    if lane.stats.dropped == 1 or lane.stats.dropped % 1000 == 0:
                        log.warning(
                            "sink_queue_full",
                            sink=lane.name,
                            dropped=lane.stats.dropped,
                            fix="the sink is too slow: raise daemon.sink_queue_size or fix it",
                        )

    def reopen(self) -> None:
        for lane in self._lanes:
            lane.queue.put(_REOPEN)

    def close(self) -> dict[str, SinkStats]:
        """Deliver everything queued, then close each sink."""
        for lane in self._lanes:
            lane.queue.put(_STOP)
        for lane in self._lanes:
            if lane.thread is not None:
                lane.thread.join()
        return {lane.name: lane.stats for lane in self._lanes}

    def _deliver(self, lane: _Lane) -> None:
        while True:
            item = lane.queue.get()
            if item is _STOP:
                self._call(lane, "close")
                return
            if item is _REOPEN:
                self._call(lane, "reopen")
                continue
            assert isinstance(item, SlowQuery)
            try:
                lane.sink.write(item)
                lane.stats.delivered += 1
            except Exception as error:
                lane.stats.failed += 1
                log.error("sink_write_failed", sink=lane.name, pid=item.pid, error=str(error))

    def _call(self, lane: _Lane, method: str) -> None:
        try:
            getattr(lane.sink, method)()
        except Exception as error:
            log.error(f"sink_{method}_failed", sink=lane.name, error=str(error))

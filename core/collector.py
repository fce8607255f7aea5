"""Drains one probe's ring buffer in its own thread: decode, enrich, dispatch.

Records come in batches (ringbuf.py takes everything committed at each look), and
the batch's events reach the dispatcher in one hand-over: at threshold 0 every
statement is a record, and per-record locking and wake-ups cost PostgreSQL's CPU.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from pgslowlog.decoder import BackendNotice, DecodeError, RawStatement, decode
from pgslowlog.dispatcher import Dispatcher
from pgslowlog.enrichment import Enricher
from pgslowlog.loader import LoadedProbe
from pgslowlog.log import get_logger

log = get_logger(__name__)
# How often the reader looks without being woken: the kernel wakes it only when
# records pile up, so this bounds how late a lone slow statement is written.
POLL_INTERVAL_MS = 20
BATCH_RECORDS = 4096  # records handled per hand-over: bounds the memory of a burst


class Collector(threading.Thread):
    def __init__(
        self,
        probe: LoadedProbe,
        enricher: Enricher,
        dispatcher: Dispatcher,
        on_failure: Callable[[str], None],
    ) -> None:
        super().__init__(
            name=f"collector-{probe.definition.name}-{probe.target.index}", daemon=True
        )
        self.probe = probe
        self.enricher = enricher
        self.dispatcher = dispatcher
        self.on_failure = on_failure
        self.undecodable = 0
        self.failed_records = 0
        self._stop_requested = threading.Event()
        # The main ring buffer wakes us; the spill one (records the main one refused,
        # rare) is read at every look.
        self._rings = probe.ring_buffers()

    def run(self) -> None:
        try:
            while not self._stop_requested.is_set():
                self._rings[0].wait(POLL_INTERVAL_MS)
                self._drain()
            # The probes are detached by now: take what is left in the ring buffers.
            self._drain()
        except Exception as error:
            # No more events would flow for this probe: the daemon must not go on as if.
            log.exception("collector_failed", probe=self.probe.definition.name)
            self.on_failure(f"collector of {self.probe.definition.name} failed: {error}")
        finally:
            for ring in self._rings:
                ring.close()

    def stop(self) -> None:
        self._stop_requested.set()

    def _drain(self) -> None:
        for ring in self._rings:
            while records := ring.read(BATCH_RECORDS):
                self._handle_batch(records)
                if len(records) < BATCH_RECORDS:
                    break

    def _handle_batch(self, records: list[bytes]) -> None:
        self.enricher.sync_clock()
        enrich = self.enricher.enrich
        events = []
        for record in records:
            try:
                raw = decode(record)
                # Statements first: at threshold 0 nearly every record is one.
                if type(raw) is RawStatement:
                    if (event := enrich(raw)) is not None:
                        events.append(event)
                elif isinstance(raw, BackendNotice):
                    self.enricher.note(raw)
                else:
                    self.enricher.note_bind(raw)
            except DecodeError as error:
                self.undecodable += 1
                log.error("undecodable_record", error=str(error))
            except Exception:
                # A bug in one record's handling must not stop the stream.
                self.failed_records += 1
                log.exception("record_failed", probe=self.probe.definition.name)
        if events:
            self.dispatcher.dispatch_many(events)

"""Drains one source's records in its own thread: decode, enrich, dispatch.

Records come in batches (a ring buffer gives everything committed at each look),
and the batch's events reach the dispatcher in one hand-over: at threshold 0 every
statement is a record, and per-record locking and wake-ups cost PostgreSQL's CPU.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from pgslowlog.dispatcher import HandsEventsOn
from pgslowlog.enrichment import Enricher
from pgslowlog.log import get_logger
from pgslowlog.records import BackendNotice, RawStatement
from pgslowlog.sources import DecodeError, RecordReader

log = get_logger(__name__)
# How often the reader looks without being woken: the kernel wakes it only when
# records pile up, so this bounds how late a lone slow statement is written.
POLL_INTERVAL_MS = 20
BATCH_RECORDS = 4096  # records handled per hand-over: bounds the memory of a burst


class Collector(threading.Thread):
    def __init__(
        self,
        name: str,
        reader: RecordReader,
        enricher: Enricher,
        dispatcher: HandsEventsOn,
        on_failure: Callable[[str], None],
    ) -> None:
        super().__init__(name=f"collector-{name}", daemon=True)
        self.source_name = name
        self.reader = reader
        self.enricher = enricher
        self.dispatcher = dispatcher
        self.on_failure = on_failure
        self.undecodable = 0
        self.failed_records = 0
        self._stop_requested = threading.Event()

    def run(self) -> None:
        try:
            while not self._stop_requested.is_set():
                self.reader.wait(POLL_INTERVAL_MS)
                self._drain()
            # The source is detached by now: take what it still holds.
            self._drain()
        except Exception as error:
            # No more events would flow from this source: the daemon must not go on as if.
            log.exception("collector_failed", source=self.source_name)
            self.on_failure(f"collector of {self.source_name} failed: {error}")
        finally:
            self.reader.close()

    def stop(self) -> None:
        self._stop_requested.set()

    def _drain(self) -> None:
        while records := self.reader.read(BATCH_RECORDS):
            self.handle_batch(records)
            if len(records) < BATCH_RECORDS:
                break

    def handle_batch(self, records: list[Any]) -> None:
        enrich = self.enricher.enrich
        decode = self.reader.decode
        events = []
        for record in records:
            try:
                raw = decode(record)
                # Statements first, by exact type: at threshold 0 nearly every record is one.
                if type(raw) is RawStatement or isinstance(raw, RawStatement):
                    if (event := enrich(raw)) is not None:
                        events.append(event)
                elif isinstance(raw, BackendNotice):
                    self.enricher.note(raw)
                elif raw is not None:  # None: nothing for the pipeline (a Bind, say)
                    raise TypeError(f"a reader decoded a record to {type(raw).__name__}")
            except DecodeError as error:
                self.undecodable += 1
                log.error("undecodable_record", source=self.source_name, error=str(error))
            except Exception:
                # A bug in one record's handling must not stop the stream.
                self.failed_records += 1
                log.exception("record_failed", source=self.source_name)
        if events:
            self.dispatcher.dispatch_many(events)

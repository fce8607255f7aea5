"""Drains one probe's ring buffer in its own thread: decode, enrich, dispatch.

The ring-buffer callback only copies the record into a list; decoding, the /proc
look-up and the hand-over to the dispatcher happen after each poll returns, so the
callback never blocks and never raises into bcc's C code.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from pgslowlog.decoder import BackendNotice, BindMessage, DecodeError, decode
from pgslowlog.dispatcher import Dispatcher
from pgslowlog.enrichment import Enricher
from pgslowlog.loader import LoadedProbe
from pgslowlog.log import get_logger

log = get_logger(__name__)
POLL_TIMEOUT_MS = 100


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
        self._pending: list[bytes] = []
        self._stop_requested = threading.Event()
        probe.open_ring_buffer(self._pending.append)

    def run(self) -> None:
        try:
            while not self._stop_requested.is_set():
                self.probe.poll(POLL_TIMEOUT_MS)
                self._flush()
            # The probes are detached by now: take what is left in the ring buffer.
            self.probe.consume()
            self._flush()
        except Exception as error:
            # No more events would flow for this probe: the daemon must not go on as if.
            log.exception("collector_failed", probe=self.probe.definition.name)
            self.on_failure(f"collector of {self.probe.definition.name} failed: {error}")

    def stop(self) -> None:
        self._stop_requested.set()

    def _flush(self) -> None:
        if not self._pending:
            return
        # The callback holds a reference to this very list: copy and clear it in place.
        records = self._pending.copy()
        self._pending.clear()
        self.enricher.sync_clock()
        for record in records:
            try:
                self._handle(record)
            except Exception:
                # A bug in one record's handling must not stop the stream.
                self.failed_records += 1
                log.exception("record_failed", probe=self.probe.definition.name)

    def _handle(self, record: bytes) -> None:
        try:
            raw = decode(record)
        except DecodeError as error:
            self.undecodable += 1
            log.error("undecodable_record", error=str(error))
            return
        if isinstance(raw, BackendNotice):
            self.enricher.note(raw)
            return
        if isinstance(raw, BindMessage):
            self.enricher.note_bind(raw)
            return
        event = self.enricher.enrich(raw)
        if event is not None:
            self.dispatcher.dispatch(event)

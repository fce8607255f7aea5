"""Where statement records come from: one probe definition, on one target.

Every definition gives the daemon a StatementSource per target: the daemon opens
it (which may compile), attaches it, reads its records in a collector thread,
tunes it (threshold, clock) and stops it. A compiled BPF program with uprobes
(loader.LoadedProbe) is one kind; a definition that reads PostgreSQL's own
bookkeeping from user space provides another through ProbeDefinition.open_source,
and the daemon, the collector and the dispatcher treat both alike.
"""

from __future__ import annotations

from typing import Any, Protocol

from pgslowlog.config import DaemonConfig
from pgslowlog.decoder import Record
from pgslowlog.probes import ProbeDefinition
from pgslowlog.targets import Target

# What every source counts, summed since it was opened (the health line and the
# loss warnings read them): statements begun, slow ones emitted, statements that
# could not be tracked (no kernel memory), records dropped because the buffer was
# full, statements PostgreSQL kept no record of.
COUNTERS = ("statements", "emitted", "untracked", "ringbuf_full", "unrecorded")


class ProbeLoadError(Exception):
    """The kernel or the compiler refused a source: not a config mistake."""


class RecordReader(Protocol):
    """The records of one source, read by its collector thread only."""

    def wait(self, timeout_ms: int) -> None:
        """Sleep until records may be ready, or `timeout_ms` passed."""

    def read(self, limit: int) -> list[Any]:
        """Up to `limit` records, oldest first, in the source's own form."""

    def decode(self, record: Any) -> Record:
        """One record as a decoder type; raises decoder.DecodeError if it cannot."""

    def close(self) -> None:
        """Release what reading held; called once, by the collector, at its end."""


class StatementSource(Protocol):
    """One probe definition's statements on one target."""

    definition: ProbeDefinition
    target: Target

    @property
    def attached_count(self) -> int:
        """How many places it watches (uprobes and USDT probes for a BPF program; what
        a source that is not one counts as watched, at least 1); 0 when not attached."""

    def describe(self) -> dict[str, object]:
        """Figures for the `probe_attached` log line (for example uprobes: 3)."""

    def attach(self) -> None:
        """Start seeing statements; ProbeLoadError when the kernel refuses."""

    def reader(self) -> RecordReader:
        """The reader its collector drains; called once, after attach()."""

    def set_threshold_ns(self, threshold_ns: int) -> None:
        """The live threshold: only statements at or over it leave the source."""

    def tick(self) -> None:
        """Called every few seconds from the main loop (keeps clocks in step)."""

    def counters(self) -> dict[str, int]:
        """Every name in COUNTERS, summed since the source was opened. A source whose
        losses mean something else than a BPF program's may also have an attribute
        `loss_causes` like health.LOSS_COUNTERS: counter -> (log event, cause, fix)."""

    def detach(self) -> None:
        """Stop seeing statements; what was already recorded stays readable."""

    def close(self) -> None:
        """Detach and free everything; the reader must be closed already."""


# When a SIGHUP moves the threshold across a definition's floor, "auto" switches the
# target's definition live (probe_set.ProbeSet.switch): the new source attaches
# before the old one lets go. A source that reads PostgreSQL's own timestamps may
# share out the statements around that moment exactly, so nothing is lost or twice:
class HandsOver(Protocol):
    def take_over(self, at_ns: int) -> None:
        """From now on report only statements that end at or after `at_ns` (Unix ns):
        the source it replaces reported the others. Called once attached, before its
        collector reads anything."""

    def hand_over(self, at_ns: int) -> None:
        """Report only statements that began before `at_ns` (Unix ns): its successor
        reports the others. It keeps running until `handed_over`."""

    @property
    def handed_over(self) -> bool:
        """No client statement that began before the hand-over is left running."""


def open_source(
    definition: ProbeDefinition, target: Target, daemon: DaemonConfig
) -> StatementSource:
    """The definition's source for `target`, ready to attach (a BPF program is compiled)."""
    if definition.open_source is not None:
        return definition.open_source(definition, target, daemon)
    from pgslowlog.loader import LoadedProbe  # libbcc_bpf is loaded only when needed

    return LoadedProbe(definition, target, daemon)

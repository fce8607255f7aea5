"""Where statement records come from: what the daemon asks of a source.

Every probe definition opens a StatementSource per target (probes.ProbeDefinition.open):
the daemon attaches it, its collector thread drains the RecordReader it gives, the
main loop tunes it (threshold, tick) and reads its counters, and the daemon stops it.
A compiled BPF program (bpf/) is one kind; the sampler (sampled/), which reads
PostgreSQL's own bookkeeping from outside, is another; a third party may add more.
The daemon, the collector and the dispatcher treat every kind alike.

What only some sources can do is declared, not guessed: a source that can share out
its statements at a live switch is a HandsOver, one whose losses mean something else
than a BPF program's is an ExplainsLosses; the daemon checks with isinstance().
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, Optional, Protocol, runtime_checkable

from pgslowlog.records import Record

# What every source counts, summed since it was opened (the health line, the loss
# warnings and /metrics read them): statements seen (a trapping program counts each
# as it begins; backend_status and the sampler each as it ends), slow ones emitted,
# statements that could not be tracked (no kernel memory), records dropped because
# the buffer was full, slow statements PostgreSQL kept no record of. A source that
# cannot know a figure leaves it out.
COUNTERS = ("statements", "emitted", "untracked", "ringbuf_full", "unrecorded")


class ProbeLoadError(Exception):
    """The kernel or the compiler refused a source: not a config mistake."""


def start_failure(error: Exception) -> str:
    """What a log line says of a source that did not start: a ProbeLoadError's own
    sentence, or the repr of anything else a third party's source raised."""
    return str(error) if isinstance(error, ProbeLoadError) else repr(error)


class RecordReader(Protocol):
    """The records of one source, read by its collector thread only."""

    # Parameters before `/` are passed by position: an implementation may name them.
    def wait(self, timeout_ms: int, /) -> None:
        """Sleep until records may be ready, or `timeout_ms` passed."""

    def read(self, limit: int, /) -> list[Any]:
        """Up to `limit` records, oldest first, in the source's own form."""

    def decode(self, record: Any, /) -> Optional[Record]:
        """One record as a records.Record; None when it is not one for the pipeline
        (for example a Bind message kept for the statement that follows). Raises
        DecodeError if it cannot be read."""

    def close(self) -> None:
        """Release what reading held; called once, by the collector, at its end."""


class DecodeError(ValueError):
    """A record could not be read: counted and logged, and the next one is read."""


class StatementSource(Protocol):
    """One probe definition's statements on one target."""

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

    def set_threshold_ns(self, threshold_ns: int, /) -> None:
        """The live threshold: only statements at or over it leave the source."""

    def tick(self) -> None:
        """Called every few seconds from the main loop (keeps clocks in step)."""

    def counters(self) -> dict[str, int]:
        """Names of COUNTERS, summed since the source was opened."""

    def detach(self) -> None:
        """Stop seeing statements; what was already recorded stays readable."""

    def close(self) -> None:
        """Detach and free everything; the reader must be closed already."""


# When a SIGHUP moves the threshold across a definition's floor, "auto" switches the
# target's definition live (probe_set.ProbeSet.switch): the new source attaches
# before the old one lets go. A source that reads PostgreSQL's own timestamps may
# share out the statements around that moment exactly, so nothing is lost or twice.
@runtime_checkable
class HandsOver(Protocol):
    """Methods, not properties: isinstance() on a runtime-checkable protocol reads each
    member (Python 3.9-3.11), and a property would run."""

    def take_over(self, at_ns: int, /) -> None:
        """From now on report only statements that end at or after `at_ns` (Unix ns):
        the source it replaces reported the others. Called once attached, before its
        collector reads anything."""

    def hand_over(self, at_ns: int, /) -> None:
        """Report only statements that began before `at_ns` (Unix ns): its successor
        reports the others. It keeps running until `handed_over()`."""

    def handed_over(self) -> bool:
        """No client statement that began before the hand-over is left running."""


@runtime_checkable
class AttachesLater(Protocol):
    """A source that works once attach() returns and attaches more of itself in the
    background (sampled looks at once; its outcome uprobes follow when compiled)."""

    def settle(self, timeout_s: float, /) -> None:
        """Wait until it has attached all it will (or failed to: it says so itself)."""


class LossCause(NamedTuple):
    """What a loss counter that moved means, said in a warning: its log event, why
    statements were lost, and what to do."""

    event: str
    cause: str
    fix: str


@runtime_checkable
class ExplainsLosses(Protocol):
    """A source whose loss counters mean something else than a BPF program's
    (health.LOSS_CAUSES): counter -> what a rise means."""

    @property
    def loss_causes(self) -> Mapping[str, LossCause]: ...

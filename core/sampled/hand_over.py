"""Which statements are this source's around a live definition switch (sources.HandsOver).

When "auto" switches a target to `sampled`, the source it replaces reported what
ended before the switch: this one reports from then on (`take_over`). When it
switches away, this one keeps reporting what began before the switch, until none of
it is left running, and its successor reports the rest (`hand_over`). PostgreSQL's
own start and end times decide, so nothing is reported twice or lost.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from typing import Optional

from pgslowlog.sampled.statements import InFlight


class HandOverWindow:
    def __init__(self) -> None:
        self.ends_from_us: Optional[int] = None  # taken over: what ended before is not ours
        self.starts_before_us: Optional[int] = None  # handed over: what began after is not
        self._first_look = 0  # the first look to begin after the hand-over

    def take_over(self, at_us: int) -> None:
        self.ends_from_us = at_us

    def hand_over(self, at_us: int, looks_begun: int) -> None:
        self.starts_before_us = at_us
        # A look under way may have missed a statement that had just begun: wait for
        # one that began after this.
        self._first_look = looks_begun + 1

    def owns(self, start_us: int, end_us: int) -> bool:
        """Whether a statement that ran from `start_us` to `end_us` is this source's."""
        if self.ends_from_us is not None and end_us < self.ends_from_us:
            return False  # ended before a switch to this definition: the old one reported it
        # Began after a switch away from it: its successor reports it.
        return self.starts_before_us is None or start_us < self.starts_before_us

    def done(
        self, running: Iterable[InFlight], background: AbstractSet[int], looks_done: int
    ) -> bool:
        """Handed over, and no client statement that began before is left running (a
        walsender's or worker's "statement" may run for ever: only clients are waited for)."""
        if self.starts_before_us is None or looks_done < self._first_look:
            return False
        before = self.starts_before_us
        return all(s.start_us >= before or s.pid in background for s in running)

"""Which threshold judges a statement: the one in effect when it ended.

A reload changes the threshold in the main thread while the looks run in the
collector's; a statement that ended a look before the reload was slow or not by the
threshold of its time, not the new one.
"""

from __future__ import annotations

KEPT = 8  # earlier thresholds remembered: reloads come seconds apart, looks milliseconds


class ThresholdHistory:
    def __init__(self, threshold_us: int) -> None:
        self.current_us = threshold_us
        # (changed at, the threshold before) in PostgreSQL microseconds, oldest first.
        self._earlier: list[tuple[int, int]] = []

    def change(self, threshold_us: int, at_us: int) -> None:
        # A new list, not appended to: the collector's thread may be reading the old one.
        self._earlier = [*self._earlier[-(KEPT - 1) :], (at_us, self.current_us)]
        self.current_us = threshold_us

    def at(self, end_us: int) -> int:
        """The threshold in effect at `end_us`: the one set before the first change
        that came after it, or the current one."""
        for changed_us, before in self._earlier:
            if end_us < changed_us:
                return before
        return self.current_us

"""When `sampled` looks: the interval that follows the threshold, the longer pause
while nothing needs following, and the time no look was taken when one was due.

A statement is seen running at some look and followed from then on. What the
interval buys is how well its end and its waits are known, and that its text is read
before it ends (TEXT_MARGIN_INTERVALS before the threshold). So the looks come every
interval only while a statement is followed; while none is, they pause for longer,
as long as a statement that starts just after a look is still followed before its
text is due. Pure logic, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

# A statement's text is read once it is this many intervals short of the threshold:
# one that reaches the threshold is still running at some look after that.
TEXT_MARGIN_INTERVALS = 3
# Unset, the interval follows the threshold: threshold / INTERVALS_PER_THRESHOLD, within
# these bounds. Below 2 ms a look's cost per second grows past the daemon's budget; above
# 10 ms the end of a statement that ended between looks is known less well than
# operators expect of a slow-query log.
INTERVALS_PER_THRESHOLD = 5
INTERVAL_MIN_MS = 2.0
INTERVAL_MAX_MS = 10.0
# "auto" picks sampled from this threshold when the interval follows the threshold;
# with the interval set, from INTERVALS_PER_THRESHOLD intervals. Not lower: under 50 ms
# the looks come every interval (no room for a pause) and bench/daemon_cost.py put the
# daemon at 2.9-3.6% of a core at 20 ms (240 looks/s; 100-1,000 idle backends), 1.8-2.1%
# at 50 ms, 0.5-0.8% at 200 ms. On this VM a wake-up alone costs 25-60 us of CPU.
AUTO_FLOOR_MS = 50.0
# While nothing is followed, looks pause for at most this share of the threshold (the
# first moments of a slow statement are sampled that much less finely: its waits), and
# at most PAUSE_MAX_MS (how soon a stop or a lowered threshold is acted on).
PAUSE_SHARE = 0.25
PAUSE_MAX_MS = 100


def interval_ms(configured: float | None, threshold_ms: float) -> float:
    if configured is not None:
        return configured
    wanted = threshold_ms / INTERVALS_PER_THRESHOLD
    return min(INTERVAL_MAX_MS, max(INTERVAL_MIN_MS, wanted))


def auto_floor_ms(configured: float | None) -> float:
    if configured is None:
        return AUTO_FLOOR_MS
    return INTERVALS_PER_THRESHOLD * configured


@dataclass(frozen=True)
class Schedule:
    """The looks' timing at one threshold (all in microseconds)."""

    interval_us: int  # between looks while a statement is followed
    pause_us: int  # between looks while none is
    follow_age_us: int  # a running statement is followed from this age on
    text_age_us: int  # ... and its text read from this age on

    @classmethod
    def at(cls, threshold_us: int, configured_ms: float | None) -> Schedule:
        interval = round(interval_ms(configured_ms, threshold_us / 1000) * 1000)
        text_age = threshold_us - TEXT_MARGIN_INTERVALS * interval
        # A statement younger than one interval is not followed yet (at threshold 0,
        # every one is). One that starts right after a look is seen at the next, maybe
        # still younger than that, and followed at the one after: by follow_age + pause
        # at the latest, which must not be later than its text is due.
        follow_age = min(interval, threshold_us // 2)
        pause = min(text_age - follow_age, round(PAUSE_SHARE * threshold_us), PAUSE_MAX_MS * 1000)
        return cls(interval, max(interval, pause), follow_age, max(0, text_age))

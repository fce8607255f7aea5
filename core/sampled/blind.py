"""Blind time: moments a look was due and none was taken, counted and said.

A statement that starts and ends while the daemon does not look is never seen, so
the time by which a look came late is counted per cause, summed in the health line
(`blind_ms`) and /metrics, and warned about with its cause once it adds up. The
cause is told from the looking thread's own scheduler figures over the late stretch:
- cpu_starved: the thread was ready to run but got no CPU (its run delay grew: an
  overloaded machine, a CPU quota);
- held_up: the daemon itself was busy (its CPU time grew: a garbage collection,
  another thread holding the interpreter, a slow look), where that grew more;
- stopped: neither (SIGSTOP, a frozen cgroup, a paused machine);
- cluster_unreadable: a cluster's memory could not be read (made anew after a crash)
  from the last look that read it until its successor's.
"""

from __future__ import annotations

import os
import threading
import time

from pgslowlog.log import get_logger

log = get_logger(__name__)

CAUSES = {
    "stopped": "the daemon was stopped or frozen (SIGSTOP, a frozen cgroup, a paused VM)",
    "cpu_starved": "the daemon was ready to look but got no CPU (an overloaded machine, "
    "a CPU quota)",
    "held_up": "the daemon was busy with work of its own (a garbage collection, another "
    "of its threads)",
    "cluster_unreadable": "a cluster's shared memory could not be read (made anew after "
    "a backend crashed, or its postmaster restarting)",
}
ACTIONS = {
    "stopped": "find what stopped the daemon; statements that ran meanwhile may be missing",
    "cpu_starved": "give the daemon CPU (its unit's CPUQuota, the machine's load), or raise "
    "threshold_ms",
    "held_up": "raise threshold_ms, or report it: the daemon should not hold itself up",
    "cluster_unreadable": "statements that ran meanwhile may be missing; see the server's log",
}
WARN_AFTER_MS = 250  # blind time summed since the last warning that makes one
WARN_EVERY_S = 10.0  # at most one warning this often; the rest adds up into the next
BASELINE_EVERY_S = 0.25  # how often the scheduler figures are read (a late look reads them)


def _run_delay_ns(descriptor: int) -> int:
    """The run delay of the thread whose schedstat `descriptor` is: the time it was
    ready to run and waited for a CPU."""
    return int(os.pread(descriptor, 128, 0).split()[1])


class BlindTime:
    """The blind time of one source, counted in the thread that looks."""

    def __init__(self, target: str) -> None:
        self._target = target
        self.ms = dict.fromkeys(CAUSES, 0.0)
        self._pending = dict.fromkeys(CAUSES, 0.0)  # since the last warning
        self._warned_at = 0.0
        self._schedstat: int | None = None
        self._thread = 0  # whose schedstat is open
        self._base = (0.0, 0, 0.0)  # when, the thread's run delay, the process's CPU

    def counters(self) -> dict[str, int]:
        counts = {f"blind_ms_{cause}": round(ms) for cause, ms in self.ms.items()}
        counts["blind_ms"] = round(sum(self.ms.values()))
        return counts

    def baseline(self, now: float) -> None:
        """Called at every look; reads the figures every BASELINE_EVERY_S."""
        if now - self._base[0] >= BASELINE_EVERY_S:
            self._base = (now, self._run_delay(), time.process_time())

    def _run_delay(self) -> int:
        thread = threading.get_native_id()
        try:
            if self._thread != thread:  # the first look is the main thread's
                if self._schedstat is not None:
                    os.close(self._schedstat)
                    self._schedstat = None
                self._schedstat = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
                self._thread = thread
                self._base = (0.0, 0, 0.0)  # the last baseline was another thread's
            assert self._schedstat is not None
            return _run_delay_ns(self._schedstat)
        except (OSError, ValueError, IndexError):
            return 0  # no schedstat (a kernel without it): no cause reads "cpu_starved"

    def late(self, late_s: float, now: float) -> None:
        """A look came `late_s` later than planned (more than an interval)."""
        delay_now, process_now = self._run_delay(), time.process_time()  # may reset _base
        _, delay, process = self._base
        # Over the stretch since the figures were last read (BASELINE_EVERY_S more at most):
        # the larger of the time this thread waited for a CPU and the process's CPU
        # time, if it covers half the lateness; neither, it was not running at all.
        starved, busy = (delay_now - delay) / 1e9, process_now - process
        if max(starved, busy) < late_s / 2:
            cause = "stopped"
        else:
            cause = "cpu_starved" if starved >= busy else "held_up"
        self._base = (now, delay_now, process_now)
        self.add(cause, late_s * 1000, now)

    def add(self, cause: str, ms: float, now: float) -> None:
        self.ms[cause] += ms
        self._pending[cause] += ms
        pending = sum(self._pending.values())
        if pending < WARN_AFTER_MS or now - self._warned_at < WARN_EVERY_S:
            return
        worst = max(self._pending, key=lambda name: self._pending[name])
        log.warning(
            "blind_time",
            target=self._target,
            blind_ms=round(pending),
            cause=worst,
            why=CAUSES[worst],
            action=ACTIONS[worst],
            **{f"{name}_ms": round(ms) for name, ms in self._pending.items() if ms},
        )
        self._pending = dict.fromkeys(CAUSES, 0.0)
        self._warned_at = now

    def close(self) -> None:
        if self._schedstat is not None:
            os.close(self._schedstat)
            self._schedstat = None

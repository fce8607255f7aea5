"""How a statement the looks timed ended: ok, error or cancelled.

A look sees a statement running and then over, never how it ended. A small BPF
program (outcomes.c) reports each error (AbortCurrentTransaction) and cancel
(StatementCancelHandler), which run only when a statement fails, and each backend's
proc_exit, once per backend. The OutcomeMatcher pairs those reports with the
statements by pid and time.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from dataclasses import replace
from pathlib import Path

from pgslowlog.bpf.attachments import EXIT_UPROBE, outcome_uprobes
from pgslowlog.bpf.decoder import Failure
from pgslowlog.bpf.program import BpfProgram
from pgslowlog.elf import PostgresBinary
from pgslowlog.sampled.pg_time import pg_us
from pgslowlog.sampled.statements import Finished

# A failure is matched with the statement that ran in its backend when it happened;
# PostgreSQL marks the end (the idle state) after the abort, so only clock
# conversion separates them.
FAILURE_SLACK_US = 1000

# The BPF half of `sampled`: the shared outcome uprobes, built to report failures, and
# proc_exit.
OUTCOMES_PROGRAM = BpfProgram(
    c_file=Path(__file__).with_name("outcomes.c"),
    attachments=(EXIT_UPROBE,),
    cflags=lambda _binary: ["-DREPORT_FAILURES=1"],
    report_backend_exit=False,
    # Failures and exits only, drained at every look that finds any: 1 MiB holds
    # thousands of them.
    ring_buffer_mib=1,
)


def reports_outcomes(binary: PostgresBinary) -> bool:
    """Whether the binary exports proc_exit and the failure paths (every build seen
    does): where it does not, outcomes are what the looks could read."""
    return binary.function_offset(EXIT_UPROBE.symbol) is not None and bool(outcome_uprobes(binary))


class OutcomeMatcher:
    """The failure and exit reports of backends with a statement in flight."""

    def __init__(self) -> None:
        # pid -> (PostgreSQL microseconds, "error" or "cancelled") since its statement began
        self._failures: dict[int, list[tuple[int, str]]] = {}
        # pid -> (when, "ok" or "error") of its exit: proc_exit's code 0 or another
        self._exits: dict[int, tuple[int, str]] = {}

    def note(self, failure: Failure) -> None:
        at_us = pg_us(failure.at_unix_ns)
        if failure.exited:
            self._exits.setdefault(failure.pid, (at_us, failure.outcome))
        else:
            self._failures.setdefault(failure.pid, []).append((at_us, failure.outcome))

    def outcome(self, finished: Finished) -> str:
        """ok, error or cancelled, from the reports of the statement's backend."""
        failures = self._failures.get(finished.pid, ())
        start, end = finished.start_us, finished.end_us + FAILURE_SLACK_US
        aborts = [at for at, outcome in failures if outcome == "error" and start <= at <= end]
        if not aborts:
            # Its backend went while it ran (terminated, FATAL: no abort path runs), or
            # its slot was taken before the end was read and no exit was reported.
            return finished.outcome if finished.backend_exited else "ok"
        cancels = [at for at, outcome in failures if outcome == "cancelled" and at >= start]
        return "cancelled" if any(at <= aborts[0] for at in cancels) else "error"

    def settle_exit(self, finished: Finished) -> Finished:
        """A statement still running at the last look that saw its backend: the
        backend's own exit (proc_exit) tells whether it had ended first (code 0: the
        client left after it) or was cut short, and bounds the end more closely than
        the look that found the backend gone (the end stays an upper bound)."""
        exit_seen = self._exits.get(finished.pid)
        if exit_seen is None or exit_seen[0] < finished.start_us:
            return finished
        at, outcome = exit_seen
        return replace(
            finished,
            end_us=max(min(at, finished.end_us), finished.start_us),
            backend_exited=outcome != "ok",
            outcome=outcome,
        )

    def keep_only(self, pids: AbstractSet[int]) -> None:
        """Forget the reports of backends with no statement of their own left to explain."""
        for pid in self._failures.keys() - pids:
            del self._failures[pid]
        for pid in self._exits.keys() - pids:
            del self._exits[pid]

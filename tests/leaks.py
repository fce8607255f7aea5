"""What the tests started and did not stop: processes and listening sockets.

A fixture that starts a cluster, a daemon, rsyslogd, an nspawn container or a
receiver must stop it on every path. conftest.py looks after every test for
processes that were not there when the session began, remembers which test they
appeared in, and fails the run when any of them outlives the session, naming the
process and that test. Only processes of this test run count: descendants of pytest,
and processes that carry this run's mark in their environment (every child inherits
it, so a server that daemonized is still known), so other work on the machine, a
second test run included, is left alone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

from waiting import wait_until

_KERNEL_THREAD = 0x00200000  # PF_KTHREAD, in /proc/PID/stat's flags
MARK = "PGSLOWLOG_TEST_SESSION"


@dataclass(frozen=True)
class Process:
    pid: int
    start_ticks: int  # with the pid, tells a process from a later one with its pid
    parent: int
    kernel_thread: bool
    zombie: bool  # exited, waiting for its parent to reap it: nothing runs
    command: str

    @property
    def key(self) -> tuple[int, int]:
        return (self.pid, self.start_ticks)

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.command[:160]})"


def _read(pid: int) -> Process | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None  # gone in between
    # The command name is in parentheses and may hold spaces: split after the last ')'.
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    command = raw.replace(b"\0", b" ").decode(errors="replace").strip() or f"[{name}]"
    return Process(
        pid=pid,
        start_ticks=int(fields[19]),
        parent=int(fields[1]),
        kernel_thread=bool(int(fields[6]) & _KERNEL_THREAD),
        zombie=fields[0] == "Z",
        command=command,
    )


def processes() -> dict[tuple[int, int], Process]:
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (process := _read(int(entry))) is not None:
            found[process.key] = process
    return found


def _marked(pid: int, mark: bytes) -> bool:
    try:
        return mark in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False  # gone, or another user's


def of_the_run(
    now: dict[tuple[int, int], Process], before: set[tuple[int, int]], root: int, mark: bytes
) -> list[Process]:
    """Processes that are new since `before` and belong to the run rooted at `root`."""
    by_pid = {process.pid: process for process in now.values()}

    def belongs(process: Process) -> bool:
        """A descendant of pytest, or of a process carrying the run's mark (a postgres
        backend's title overwrites its environment, its postmaster's does not)."""
        for _ in range(64):  # a chain of ancestors, never a loop
            if process.parent == root or _marked(process.pid, mark):
                return True
            parent = by_pid.get(process.parent)
            if parent is None or parent.key in before:
                return False  # reached the machine's own processes
            process = parent
        return False

    return [
        process
        for key, process in now.items()
        if key not in before and not process.kernel_thread and not process.zombie
        if process.pid != root and belongs(process)
    ]


def listening_sockets(pid: int) -> set[str]:
    """Loopback addresses this process listens on (TCP), as 'address:port' in hex."""
    listening = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                listening[fields[9]] = fields[1]
    owned = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and (inode := link[8:-1]) in listening:
            owned.add(listening[inode])
    return owned


def start_ticks(pid: int) -> int | None:
    """When a process started, in clock ticks since boot: with the pid, tells it from a
    later process given the same pid. None when it is gone."""
    process = _read(pid)
    return process.start_ticks if process is not None else None


def run_mark(pid: int) -> str:
    """A run's mark: its pid and when it started, so whether it still runs is known."""
    return f"{pid}-{start_ticks(pid)}"


def marked_pids(mark: bytes) -> list[int]:
    """The processes running with `mark` (VARIABLE=value) in their environment."""
    pids = (int(entry) for entry in os.listdir("/proc") if entry.isdigit())
    return sorted(pid for pid in pids if _marked(pid, mark) and running(pid))


def running(pid: int) -> bool:
    """The process is there and not a zombie (killed, not yet reaped by its parent)."""
    process = _read(pid)
    return process is not None and not process.zombie


def mark_alive(value: str) -> bool:
    """Whether the run (or process) of a mark still runs; True for a mark not made by
    run_mark(): what is not known to be dead is left alone."""
    pid, _, ticks = value.partition("-")
    if not (pid.isdigit() and ticks.isdigit()):
        return True
    process = _read(int(pid))
    if process is None or process.zombie:  # a zombie: killed, not yet reaped
        return False
    uptime_ticks = float(Path("/proc/uptime").read_text().split()[0]) * os.sysconf("SC_CLK_TCK")
    if int(ticks) > uptime_ticks:
        return True  # an older mark (<pid>-<time in ns>): only the pid tells
    return process.start_ticks == int(ticks)


def reclaim_dead_runs() -> list[str]:
    """Processes of test runs that were killed (a cluster, a daemon: each carries its
    run's mark, or is the child of one that does, as a postgres backend is): SIGKILLed,
    and their clusters' directories removed. One line for each."""
    by_pid = {process.pid: process for process in processes().values()}
    dead = set()
    for pid in by_pid:
        with contextlib.suppress(OSError):
            for variable in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                name, _, value = variable.decode(errors="replace").partition("=")
                if name == MARK and not mark_alive(value):
                    dead.add(pid)
    grew = True
    while grew:  # and their descendants
        found = {p.pid for p in by_pid.values() if p.parent in dead} - dead
        dead |= found
        grew = bool(found)
    lines, clusters = [], set()
    for pid in sorted(dead):
        command = by_pid[pid].command.split()
        if "-D" in command[:-1]:  # a postmaster: its data directory's parent
            base = Path(command[command.index("-D") + 1]).parent
            if base.name.startswith("pgslowlog-cluster-"):
                clusters.add(base)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        lines.append(f"{by_pid[pid]} killed")

    with contextlib.suppress(AssertionError):  # what is left, the leak check names
        wait_until(lambda: not any(map(running, dead)), 10, "the killed run's processes gone", 0.1)
    for base in sorted(clusters):
        shutil.rmtree(base, ignore_errors=True)
        lines.append(f"cluster directory {base} removed")
    return lines


class LeakWatch:
    def __init__(self) -> None:
        self.root = os.getpid()
        value = run_mark(self.root)
        os.environ[MARK] = value  # inherited by everything the tests start
        self.mark = f"{MARK}={value}".encode()
        self.before = set(processes())
        self.sockets_before = listening_sockets(self.root)
        self.first_seen: dict[tuple[int, int], str] = {}

    def after_test(self, nodeid: str) -> None:
        for process in of_the_run(processes(), self.before, self.root, self.mark):
            self.first_seen.setdefault(process.key, nodeid)

    def _left(self) -> tuple[list[Process], set[str]]:
        now = processes()
        left = of_the_run(now, self.before, self.root, self.mark)
        # Also whatever was seen during a test and still runs, mark or not: a
        # container's init (nspawn gives it a fresh environment) whose nspawn died.
        left += [
            process
            for key, process in now.items()
            if key in self.first_seen and not process.zombie and process not in left
        ]
        return left, listening_sockets(self.root) - self.sockets_before

    def leftovers(self, grace_s: float = 20) -> list[str]:
        """What is still there at the end, after `grace_s` for things already stopping."""
        with contextlib.suppress(AssertionError):  # what is left is named below
            wait_until(lambda: self._left() == ([], set()), grace_s, "nothing left", interval=0.5)
        left, sockets = self._left()
        lines = [
            f"{process} still running; it appeared during "
            f"{self.first_seen.get(process.key, 'the session set-up or tear-down')}"
            for process in left
        ]
        lines += [f"a listening socket {address} is still open in pytest" for address in sockets]
        return lines

"""PostgreSQL servers in containers on this host: postmasters in other pid namespaces.

One scan of /proc at start. After it the kernel says when a program called
`postgres` is exec'd anywhere (bpf/exec_notice.c: a container's postmaster is exec'd
by its runtime, entrypoint or pg_ctl, while backends are forked and send nothing),
and only those pids are looked at. A rescan every RESCAN_EVERY_S catches what a
notice could miss, and one follows at once when the ring was full. What finding
costs is counted: the scans, the notices, the CPU time. A postmaster is found by its
command name, `postgres` or `postmaster`: a binary by another name is not.

A postmaster is a process running `postgres` whose parent does not, started in none of
main()'s other modes (initdb's `postgres --single` forks `locale -a`), with a child
already (`postgres -C` has none, and a postmaster forks its checkpointer within
milliseconds). An exec'd pid is watched for SETTLE_S until it has one.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pgslowlog.bpf.compiler import RAW_TRACEPOINT, CompileError, compile_program
from pgslowlog.bpf.libbcc import libbcc
from pgslowlog.bpf.ringbuf import RingBuffer, ring_buffer_fd_size
from pgslowlog.containers import (
    ContainerServer,
    container_hostname,
    container_of,
    own_pid_namespace,
    pid_namespace,
)
from pgslowlog.log import get_logger
from pgslowlog.sampled.procfs import process_stat, serves

log = get_logger(__name__)
POSTGRES_COMMS = ("postgres", "postmaster")  # 13-15 still install the old name as a link
RESCAN_EVERY_S = 60.0  # the safety net behind the exec notices
SETTLE_S = 5.0  # an exec'd postgres is a postmaster once it has a child: watched this long
CHECK_PENDING_S = 0.1  # how often a pending one is looked at
EXEC_FUNCTION = "raw_tracepoint__sched_process_exec"


class ExecNotifier:
    """The pids of programs called postgres as they are exec'd, from the kernel."""

    def __init__(self) -> None:
        program = Path(__file__).with_name("bpf").joinpath("exec_notice.c").read_bytes()
        compiled = compile_program(
            program, [], [(EXEC_FUNCTION, RAW_TRACEPOINT)], ["execs", "lost"]
        )
        self._compiled = compiled
        try:
            ring_fd = compiled.maps["execs"]
            self._ring = RingBuffer(ring_fd, ring_buffer_fd_size(ring_fd))
        except BaseException:
            compiled.close()
            raise
        fd = libbcc().attach_raw_tracepoint(
            compiled.functions[EXEC_FUNCTION], b"sched_process_exec"
        )
        if fd < 0:
            error = ctypes.get_errno()
            self._ring.close()
            compiled.close()
            raise OSError(error, f"attaching to sched_process_exec failed: {os.strerror(error)}")
        self._tracepoint_fd = fd

    def wait(self, timeout_ms: int) -> None:
        self._ring.wait(timeout_ms)

    def pids(self) -> list[int]:
        return [int.from_bytes(record[:4], "little") for record in self._ring.read()]

    def lost(self) -> int:
        """Notices the ring refused (it was full): the next rescan finds those servers."""
        key, value = ctypes.c_int(0), ctypes.c_uint64(0)
        if libbcc().lookup_elem(
            self._compiled.maps["lost"], ctypes.byref(key), ctypes.byref(value)
        ):
            return 0
        return value.value

    def close(self) -> None:
        os.close(self._tracepoint_fd)
        self._ring.close()
        self._compiled.close()


class ServerFinder:
    """The postmasters running in other pid namespaces, kept current by `poll()`."""

    def __init__(self, wake: Callable[[], None], notices: bool = True) -> None:
        self.servers: dict[int, ContainerServer] = {}  # postmaster's pid here -> server
        self._starts: dict[int, str] = {}  # its start time: a reused pid is another process
        self._pending: dict[int, float] = {}  # exec'd pid -> give up after
        self._noticed: list[int] = []
        self._lock = threading.Lock()
        self._wake = wake
        self._next_scan = 0.0
        self.figures = {"scans": 0, "exec_notices": 0, "exec_notices_lost": 0, "cpu_ms": 0.0}
        self._notifier: ExecNotifier | None = None
        self._stop = threading.Event()
        self._notifier_failed = False
        self._thread: threading.Thread | None = None
        try:
            self._notifier = ExecNotifier() if notices else None
        except (CompileError, OSError, ValueError) as error:
            log.warning(
                "exec_notices_unavailable",
                error=str(error),
                action="looking for containerised servers by scanning /proc every second",
            )
        if self._notifier is not None:
            self._thread = threading.Thread(target=self._listen, name="exec-notices", daemon=True)
            self._thread.start()

    @property
    def _notices_work(self) -> bool:
        with self._lock:
            return self._notifier is not None and not self._notifier_failed

    def _listen(self) -> None:
        """Its own thread: a notice wakes the main loop, which finds the server."""
        assert self._notifier is not None
        while not self._stop.is_set():
            try:
                self._notifier.wait(500)
                if pids := self._notifier.pids():
                    with self._lock:
                        self._noticed += pids
                    self._wake()
            except Exception as error:  # never silently: the rescans go on without it
                log.error("exec_notices_failed", error=repr(error), action="rescanning /proc")
                with self._lock:
                    self._notifier_failed = True
                return

    def due_in(self) -> float:
        """Seconds until `poll()` has something to do (a pending exec: soon)."""
        if self._pending:
            return CHECK_PENDING_S
        return 1.0

    def poll(self) -> dict[int, ContainerServer]:
        """Servers now: gone ones dropped, new ones found. Called from the main loop."""
        began = time.thread_time()
        now = time.monotonic()
        with self._lock:
            noticed, self._noticed = self._noticed, []
        self.figures["exec_notices"] += len(noticed)
        if self._notifier is not None:
            lost = self._notifier.lost()
            if lost > self.figures["exec_notices_lost"]:
                log.warning(
                    "exec_notices_lost",
                    count=lost - self.figures["exec_notices_lost"],
                    action="a full rescan of /proc now",
                )
                self.figures["exec_notices_lost"] = lost
                self._next_scan = now
        for pid in noticed:
            self._pending[pid] = now + SETTLE_S
        for pid in [pid for pid in self.servers if not self._alive(pid)]:
            del self.servers[pid]
            self._starts.pop(pid, None)
        if now >= self._next_scan:
            self._scan()
            self._next_scan = now + (RESCAN_EVERY_S if self._notices_work else 1.0)
        for pid, until in list(self._pending.items()):
            if self._consider(pid) or now >= until or process_stat(pid) is None:
                del self._pending[pid]
        self.figures["cpu_ms"] += (time.thread_time() - began) * 1000
        return dict(self.servers)

    def _alive(self, pid: int) -> bool:
        process = process_stat(pid)
        return process is not None and process.state != "Z" and process.start == self._starts[pid]

    def _scan(self) -> None:
        self.figures["scans"] += 1
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) not in self.servers:
                self._consider(int(entry))

    def _consider(self, pid: int) -> bool:
        """Whether `pid` is a postmaster in another pid namespace (taken up if so)."""
        if pid in self.servers:
            return True
        process = process_stat(pid)
        if process is None or process.comm not in POSTGRES_COMMS or process.state == "Z":
            return False
        parent = process_stat(process.parent)
        if parent is not None and parent.comm in POSTGRES_COMMS:
            return False  # a backend or an auxiliary process
        namespace = pid_namespace(pid)
        if namespace is None or namespace == own_pid_namespace():
            return False  # the ordinary targets' business
        if not serves(pid):
            return False  # not serving (yet): `postgres --single`, or still starting
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            return False
        self.servers[pid] = ContainerServer(
            host_pid=pid,
            namespace=namespace,
            container=container_of(pid, namespace),
            hostname=container_hostname(pid),
            exe=exe,
        )
        self._starts[pid] = process.start
        return True

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._notifier is not None:
            self._notifier.close()


def servers_now() -> list[ContainerServer]:
    """One scan, no notices: what `check` and `probes` list."""
    finder = ServerFinder(lambda: None, notices=False)
    try:
        return sorted(finder.poll().values(), key=lambda server: server.name)
    finally:
        finder.close()

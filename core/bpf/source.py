"""A compiled BPF program on one target: the BPF kind of sources.StatementSource.

The program arrives compiled and loaded (program.py, compiler.py): this object owns
its program and map fds, attaches it, tunes it (threshold, clock), reads its counters
and hands its ring buffers to the collector. Uprobes are attached through libbcc_bpf's
C function with its full prototype (libbcc.py: the 7th argument, ref_ctr_offset, keeps
USDT semaphores) and detached by closing the perf event: a perf-PMU uprobe needs no
tracefs, and bcc's own clean-up would write to /sys/kernel/tracing/uprobe_events,
which may not be mounted. pid -1: every process that maps the binary, present and
future. Attaching goes through the target's open file, the one whose offsets were
read (elf.BinaryFile), never by its path again.
"""

from __future__ import annotations

import ctypes
import os
import time

from pgslowlog.bpf.attachments import Attachment, Usdt
from pgslowlog.bpf.compiler import Compiled
from pgslowlog.bpf.decoder import RecordDecoder, realtime_offset_ns
from pgslowlog.bpf.libbcc import libbcc, possible_cpus
from pgslowlog.bpf.ringbuf import RingBuffer, RingBufferReader, ring_buffer_fd_size
from pgslowlog.config import DaemonConfig
from pgslowlog.sources import COUNTERS, ProbeLoadError
from pgslowlog.targets import Target

# Indexes into the settings map (slow_query.h).
SETTING_THRESHOLD = 0
SETTING_REALTIME_OFFSET = 1
SETTING_ATTACHED_REALTIME = 2
# slow_query.h's maps user space touches; "spill" takes what "events" refuses.
RING_BUFFERS = ("events", "spill")
MAPS = ["settings", "counters", *RING_BUFFERS]
# slow_query.h's RAW_TRACEPOINT_PROBE(sched_process_exit) names its function so.
EXIT_TRACEPOINT = "sched_process_exit"
EXIT_TRACEPOINT_FUNCTION = f"raw_tracepoint__{EXIT_TRACEPOINT}"


class BpfSource:
    """One definition's program, compiled for one target: attach, tune, read, detach.

    `attachments` are the program's own and the outcome uprobes the binary takes;
    `compiled` holds a BPF function for each, and the exit tracepoint's.
    """

    def __init__(
        self,
        name: str,
        target: Target,
        attachments: list[Attachment],
        compiled: Compiled,
        daemon: DaemonConfig,
    ) -> None:
        self._name = name
        self._target = target
        self._attachments = attachments
        self._compiled = compiled
        self.compiler_peak_rss_mb = compiled.compiler_peak_rss_mb
        self._perf_fds: list[int] = []
        self._tracepoint_fd: int | None = None
        self._cpus = possible_cpus()
        self._max_backends = daemon.max_backends  # bounds what its decoder holds
        try:
            self.set_threshold_ns(round(daemon.threshold_ms * 1_000_000))
            self.sync_clock()
        except BaseException:
            compiled.close()  # the programs and maps the child handed over
            raise

    def attach(self) -> None:
        binary = self._target.binary
        attach_path = self._target.file.attach_path.encode()
        # Statements that began before this are not this attach's to report.
        self._set(SETTING_ATTACHED_REALTIME, time.clock_gettime_ns(time.CLOCK_REALTIME), "the time")
        # Backend exits first: a statement cut short by one is then never left behind.
        fd = libbcc().attach_raw_tracepoint(
            self._compiled.functions[EXIT_TRACEPOINT_FUNCTION], EXIT_TRACEPOINT.encode()
        )
        if fd < 0:
            raise ProbeLoadError(
                f"attaching {self._name} to the {EXIT_TRACEPOINT} tracepoint failed: "
                f"{os.strerror(ctypes.get_errno())}"
            )
        self._tracepoint_fd = fd
        for attachment in self._attachments:
            program = self._compiled.functions[attachment.function]
            if isinstance(attachment, Usdt):
                note = binary.usdt[(attachment.provider, attachment.name)]
                retprobe, offset, semaphore = False, note.offset, note.semaphore_offset
                where = f"USDT {attachment.provider}:{attachment.name}"
            else:
                retprobe, offset, semaphore = (
                    attachment.retprobe,
                    binary.functions[attachment.symbol].offset,
                    0,
                )
                where = attachment.symbol
            event_name = f"pgslowlog_{os.getpid()}_{len(self._perf_fds)}".encode()
            # With a semaphore offset the kernel raises the semaphore in every process
            # mapping the binary, now and later: USDT probes guarded by it start firing.
            fd = libbcc().attach_uprobe(
                program, int(retprobe), event_name, attach_path, offset, -1, semaphore
            )
            if fd < 0:
                error = os.strerror(ctypes.get_errno())
                self.detach()
                raise ProbeLoadError(
                    f"attaching {self._name} to {where} in {binary.path} failed: {error}"
                )
            self._perf_fds.append(fd)

    @property
    def attached_count(self) -> int:
        return len(self._perf_fds)

    def describe(self) -> dict[str, object]:
        return {
            "uprobes": self.attached_count,
            "compiler_peak_rss_mb": self.compiler_peak_rss_mb,
        }

    def tick(self) -> None:
        self.sync_clock()

    def set_threshold_ns(self, threshold_ns: int) -> None:
        self._set(SETTING_THRESHOLD, threshold_ns, "the threshold")

    def sync_clock(self) -> None:
        """Tell the kernel CLOCK_REALTIME - CLOCK_MONOTONIC, for programs that read
        PostgreSQL's timestamps. Called again every few seconds: NTP moves it."""
        self._set(SETTING_REALTIME_OFFSET, realtime_offset_ns(), "the clock offset")

    def _set(self, index: int, number: int, what: str) -> None:
        key, value = ctypes.c_uint32(index), ctypes.c_uint64(number)
        if (
            libbcc().update_elem(
                self._compiled.maps["settings"], ctypes.byref(key), ctypes.byref(value), 0
            )
            != 0
        ):
            raise ProbeLoadError(f"setting {what} failed: {os.strerror(ctypes.get_errno())}")

    def counters(self) -> dict[str, int]:
        """The kernel's counters, summed over CPUs (a per-CPU array: one u64 per CPU)."""
        values = (ctypes.c_uint64 * self._cpus)()
        totals = {}
        for index, name in enumerate(COUNTERS):
            key = ctypes.c_uint32(index)
            if (
                libbcc().lookup_elem(self._compiled.maps["counters"], ctypes.byref(key), values)
                != 0
            ):
                raise OSError(ctypes.get_errno(), f"reading counter {name} failed")
            totals[name] = sum(values)
        return totals

    def reader(self) -> RingBufferReader:
        """The ring buffers, read from their shared memory (ringbuf.py): events, spill."""
        fds = [self._compiled.maps[name] for name in RING_BUFFERS]
        return RingBufferReader(
            [RingBuffer(fd, ring_buffer_fd_size(fd)) for fd in fds],
            RecordDecoder(self._max_backends),
        )

    def detach(self) -> None:
        """Stop probing: no statement begins or ends any more. The ring buffer stays readable."""
        while self._perf_fds:
            libbcc().close_perf_event(self._perf_fds.pop())
        if self._tracepoint_fd is not None:
            os.close(self._tracepoint_fd)
            self._tracepoint_fd = None

    def close(self) -> None:
        self.detach()
        self._compiled.close()

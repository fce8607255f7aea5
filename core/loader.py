"""Compiles a probe definition's BPF program for one target and attaches it.

The compile runs in a child process (compiler.py), so the daemon never loads
LLVM. Uprobes are attached through libbcc_bpf's C function with its full
prototype (bcc's Python wrapper omits the 7th argument, ref_ctr_offset, that USDT
semaphores need) and detached by closing the perf event: a perf-PMU uprobe needs
no tracefs, and bcc's own clean-up would write to
/sys/kernel/tracing/uprobe_events, which may not be mounted. pid -1: every process
that maps the binary, present and future.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time
from importlib.resources import files
from pathlib import Path

from pgslowlog.compiler import KPROBE, RAW_TRACEPOINT, CompileError, compile_program
from pgslowlog.config import DaemonConfig
from pgslowlog.decoder import Record, decode, layout_cflags
from pgslowlog.probes import OUTCOME_UPROBES, ProbeDefinition, Uprobe, Usdt
from pgslowlog.ringbuf import RingBuffer, ring_buffer_fd_size
from pgslowlog.sources import COUNTERS, ProbeLoadError
from pgslowlog.targets import Target

# slow_query.h: the maps user space touches; "spill" takes what "events" refuses.
MAPS = ["settings", "counters", "events", "spill"]
# Indexes into the settings map (bpf/slow_query.h).
SETTING_THRESHOLD = 0
SETTING_REALTIME_OFFSET = 1
SETTING_ATTACHED_REALTIME = 2
RING_BUFFERS = ("events", "spill")
# slow_query.h's RAW_TRACEPOINT_PROBE(sched_process_exit) names its function so.
EXIT_TRACEPOINT = "sched_process_exit"
EXIT_TRACEPOINT_FUNCTION = f"raw_tracepoint__{EXIT_TRACEPOINT}"
LIBBCC_BPF = "libbcc_bpf.so.0"
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
SHARED_SOURCE = files("pgslowlog") / "bpf" / "slow_query.h"


class _Libbcc:
    """libbcc_bpf: bcc's syscall wrappers, without the LLVM that libbcc itself loads.

    The prototypes are our own: bcc's Python wrapper declares bpf_attach_uprobe
    without its 7th argument, ref_ctr_offset, which USDT semaphores need.
    """

    def __init__(self) -> None:
        library = ctypes.CDLL(ctypes.util.find_library("bcc_bpf") or LIBBCC_BPF, use_errno=True)
        self.attach_uprobe = library.bpf_attach_uprobe
        self.attach_uprobe.restype = ctypes.c_int
        self.attach_uprobe.argtypes = [
            ctypes.c_int,  # progfd
            ctypes.c_int,  # attach type: 0 entry, 1 return
            ctypes.c_char_p,  # event name (used only on the tracefs fallback)
            ctypes.c_char_p,  # binary path
            ctypes.c_uint64,  # file offset
            ctypes.c_int,  # pid, -1 for all
            ctypes.c_uint32,  # ref_ctr_offset (USDT semaphore), 0 for none
        ]
        self.close_perf_event = library.bpf_close_perf_event_fd
        self.close_perf_event.restype = ctypes.c_int
        self.close_perf_event.argtypes = [ctypes.c_int]
        self.attach_raw_tracepoint = library.bpf_attach_raw_tracepoint
        self.attach_raw_tracepoint.restype = ctypes.c_int
        self.attach_raw_tracepoint.argtypes = [ctypes.c_int, ctypes.c_char_p]
        self.update_elem = library.bpf_update_elem
        self.update_elem.restype = ctypes.c_int
        self.update_elem.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_ulonglong,
        ]
        self.lookup_elem = library.bpf_lookup_elem
        self.lookup_elem.restype = ctypes.c_int
        self.lookup_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]


_libbcc: _Libbcc | None = None


def libbcc() -> _Libbcc:
    global _libbcc
    if _libbcc is None:
        _libbcc = _Libbcc()
    return _libbcc


def possible_cpus() -> int:
    """How many values a per-CPU map holds: one per possible CPU ("0-3,8-11")."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    count = 0
    for part in text.split(","):
        first, _, last = part.partition("-")
        count += int(last or first) - int(first) + 1
    return count


def program_text(definition: ProbeDefinition) -> bytes:
    """The shared part, then the probe's own files: one translation unit for bcc.

    bcc rewrites map calls only in the main file, so the shared code cannot be an
    #include. The #line directives keep compiler messages pointing at the real files.
    """
    assert definition.source is not None  # sources.open_source sends only BPF definitions
    parts = [SHARED_SOURCE, *definition.extra_sources, definition.source]
    return "\n".join(f'#line 1 "{path}"\n{path.read_text()}' for path in parts).encode()


def outcome_uprobes(target: Target) -> list[Uprobe]:
    """The shared outcome probes this binary can take (it exports their functions)."""
    return [u for u in OUTCOME_UPROBES if target.binary.function_offset(u.symbol) is not None]


def shared_layout_cflags() -> list[str]:
    """What user space assumes of slow_query.h, for its _Static_asserts: the record
    layout (decoder.py), the counters and the settings indexes (here)."""
    return [
        *layout_cflags(),
        *(f"-DPY_COUNTER_{name.upper()}={index}" for index, name in enumerate(COUNTERS)),
        f"-DPY_COUNTER_COUNT={len(COUNTERS)}",
        f"-DPY_SETTING_THRESHOLD={SETTING_THRESHOLD}",
        f"-DPY_SETTING_REALTIME_OFFSET={SETTING_REALTIME_OFFSET}",
        f"-DPY_SETTING_ATTACHED_REALTIME={SETTING_ATTACHED_REALTIME}",
    ]


def cflags_for(definition: ProbeDefinition, target: Target, daemon: DaemonConfig) -> list[str]:
    binary = target.binary
    ring_pages = daemon.ring_buffer_mib * 1024 * 1024 // PAGE_SIZE
    anchors = []
    for attachment in (*definition.attachments, *outcome_uprobes(target)):
        if isinstance(attachment, Usdt):
            address = binary.usdt[(attachment.provider, attachment.name)].vaddr
        else:
            address = binary.functions[attachment.symbol].vaddr
        anchors.append(f"-DVADDR_{attachment.anchor}={address:#x}ULL")
    return [
        f"-DQUERY_MAX_BYTES={daemon.query_max_bytes}",
        f"-DRINGBUF_PAGES={ring_pages}",
        # Sizes the per-pid hash maps used where bcc has no task storage (slow_query.h).
        f"-DMAX_BACKENDS={daemon.max_backends}",
        f"-DREPORT_BACKEND_EXIT={int(definition.report_backend_exit)}",
        f"-DPROTOCOL={int(definition.protocol)}",
        f"-DAPPLICATION_NAME_VADDR={binary.objects.get('application_name', 0):#x}ULL",
        f"-DCAPTURE_PARAMS={int(daemon.capture_params)}",
        *sorted(set(anchors)),
        *shared_layout_cflags(),
        *definition.cflags(binary),
    ]


class RingBufferReader:
    """The records of one BPF program: its main ring buffer, then its spill one.

    The main ring buffer wakes the reader; the spill one (records the main one
    refused, rare) is read at every look.
    """

    def __init__(self, rings: list[RingBuffer]) -> None:
        self._rings = rings

    def wait(self, timeout_ms: int) -> None:
        self._rings[0].wait(timeout_ms)

    def read(self, limit: int) -> list[bytes]:
        records: list[bytes] = []
        for ring in self._rings:
            if len(records) < limit:
                records += ring.read(limit - len(records))
        return records

    def decode(self, record: bytes) -> Record:
        return decode(record)

    def close(self) -> None:
        for ring in self._rings:
            ring.close()


class LoadedProbe:
    """One probe definition compiled for one target: attach, tune, read, detach.

    The BPF kind of sources.StatementSource. Compiling and loading happen in a
    child process (compiler.py); this object owns the program and map fds it
    hands back. Uprobes are attached through the target's open file, the one
    whose offsets were read (elf.BinaryFile), never by its path again.
    """

    def __init__(self, definition: ProbeDefinition, target: Target, daemon: DaemonConfig) -> None:
        self.definition = definition
        self.target = target
        functions = [(a.function, KPROBE) for a in self._attachments()]
        functions.append((EXIT_TRACEPOINT_FUNCTION, RAW_TRACEPOINT))
        try:
            self._compiled = compile_program(
                program_text(definition),
                cflags_for(definition, target, daemon),
                list(dict.fromkeys(functions)),  # a function may serve two attachments
                MAPS,
            )
        except CompileError as error:
            raise ProbeLoadError(
                f"loading probe {definition.name} failed ({error}); run `pgslowlog check` "
                "to see whether kernel headers or privileges are missing"
            ) from None
        self.compiler_peak_rss_mb = self._compiled.compiler_peak_rss_mb
        self._perf_fds: list[int] = []
        self._tracepoint_fd: int | None = None
        self._cpus = possible_cpus()
        try:
            self.set_threshold_ns(round(daemon.threshold_ms * 1_000_000))
            self.sync_clock()
        except BaseException:
            self._compiled.close()  # the programs and maps the child handed over
            raise

    def _attachments(self) -> list[Uprobe | Usdt]:
        return [*self.definition.attachments, *outcome_uprobes(self.target)]

    def attach(self) -> None:
        binary = self.target.binary
        attach_path = self.target.file.attach_path.encode()
        # Statements that began before this are not this attach's to report.
        self._set(SETTING_ATTACHED_REALTIME, time.clock_gettime_ns(time.CLOCK_REALTIME), "the time")
        # Backend exits first: a statement cut short by one is then never left behind.
        fd = libbcc().attach_raw_tracepoint(
            self._compiled.functions[EXIT_TRACEPOINT_FUNCTION], EXIT_TRACEPOINT.encode()
        )
        if fd < 0:
            raise ProbeLoadError(
                f"attaching {self.definition.name} to the {EXIT_TRACEPOINT} tracepoint failed: "
                f"{os.strerror(ctypes.get_errno())}"
            )
        self._tracepoint_fd = fd
        for attachment in self._attachments():
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
                    f"attaching {self.definition.name} to {where} in {binary.path} failed: {error}"
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
        """Tell the kernel CLOCK_REALTIME - CLOCK_MONOTONIC, for definitions that read
        PostgreSQL's timestamps. Called again every few seconds: NTP moves it."""
        offset = time.clock_gettime_ns(time.CLOCK_REALTIME) - time.monotonic_ns()
        self._set(SETTING_REALTIME_OFFSET, offset, "the clock offset")

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
        return RingBufferReader([RingBuffer(fd, ring_buffer_fd_size(fd)) for fd in fds])

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

"""Compiles a probe definition's BPF program for one target and attaches it.

Uprobes are attached through libbcc's C function with its full prototype (bcc's
Python wrapper omits the 7th argument, ref_ctr_offset, that USDT semaphores need)
and detached by closing the perf event: a perf-PMU uprobe needs no tracefs, and
bcc's own clean-up would write to /sys/kernel/tracing/uprobe_events, which may not
be mounted. pid -1: every process that maps the binary, present and future.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from importlib.resources import files
from typing import TYPE_CHECKING, Any

from pgslowlog.config import DaemonConfig
from pgslowlog.errors import UserError
from pgslowlog.probes import OUTCOME_UPROBES, ProbeDefinition, Uprobe, Usdt
from pgslowlog.targets import Target

if TYPE_CHECKING:
    from collections.abc import Callable

COUNTERS = ("statements", "emitted", "untracked", "ringbuf_full")  # enum counter
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
SHARED_SOURCE = files("pgslowlog") / "bpf" / "slow_query.h"
BCC_MISSING = (
    "bcc's Python module is not importable",
    "apt-get install python3-bpfcc libbpfcc, and create the venv with --system-site-packages",
)


def import_bcc() -> Any:
    try:
        import bcc
    except ImportError:
        raise UserError(*BCC_MISSING) from None
    return bcc


class _Libbcc:
    """The two libbcc calls we make with our own prototypes."""

    def __init__(self) -> None:
        # A CDLL of our own: setting argtypes here does not change bcc's function objects.
        library = ctypes.CDLL(ctypes.util.find_library("bcc") or "libbcc.so.0", use_errno=True)
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


_libbcc: _Libbcc | None = None


def libbcc() -> _Libbcc:
    global _libbcc
    if _libbcc is None:
        _libbcc = _Libbcc()
    return _libbcc


class ProbeLoadError(Exception):
    """The kernel or the compiler refused a probe: not a config mistake."""


def program_text(definition: ProbeDefinition) -> bytes:
    """The shared part, then the probe's own files: one translation unit for bcc.

    bcc rewrites map calls only in the main file, so the shared code cannot be an
    #include. The #line directives keep compiler messages pointing at the real files.
    """
    parts = [SHARED_SOURCE, *definition.extra_sources, definition.source]
    return "\n".join(f'#line 1 "{path}"\n{path.read_text()}' for path in parts).encode()


def outcome_uprobes(target: Target) -> list[Uprobe]:
    """The shared outcome probes this binary can take (it exports their functions)."""
    return [u for u in OUTCOME_UPROBES if target.binary.function_offset(u.symbol) is not None]


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
        f"-DREPORT_BACKEND_EXIT={int(definition.report_backend_exit)}",
        f"-DPROTOCOL={int(definition.protocol)}",
        f"-DAPPLICATION_NAME_VADDR={binary.objects.get('application_name', 0):#x}ULL",
        f"-DCAPTURE_PARAMS={int(daemon.capture_params)}",
        *sorted(set(anchors)),
        *definition.cflags(binary),
    ]


class LoadedProbe:
    """One probe definition compiled for one target: attach, tune, poll, detach."""

    def __init__(self, definition: ProbeDefinition, target: Target, daemon: DaemonConfig) -> None:
        self.definition = definition
        self.target = target
        bcc = import_bcc()
        self._bcc = bcc
        try:
            self.bpf = bcc.BPF(
                text=program_text(definition), cflags=cflags_for(definition, target, daemon)
            )
        except Exception as error:
            raise ProbeLoadError(
                f"compiling probe {definition.name} failed ({error}); run `pgslowlog check` "
                "to see whether kernel headers or privileges are missing"
            ) from None
        self._perf_fds: list[int] = []
        self.set_threshold_ns(round(daemon.threshold_ms * 1_000_000))

    def _attachments(self) -> list[Uprobe | Usdt]:
        return [*self.definition.attachments, *outcome_uprobes(self.target)]

    def verify(self) -> None:
        """Load every function into the kernel: the verifier runs, nothing is attached."""
        for attachment in self._attachments():
            self._load(attachment.function)

    def _load(self, function: str) -> Any:
        try:
            return self.bpf.load_func(function.encode(), self._bcc.BPF.KPROBE)
        except Exception as error:
            raise ProbeLoadError(
                f"the kernel rejected {self.definition.name}.{function}: {error}"
            ) from None

    def attach(self) -> None:
        binary = self.target.binary
        for attachment in self._attachments():
            function = self._load(attachment.function)
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
                function.fd, int(retprobe), event_name, binary.path.encode(), offset, -1, semaphore
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

    def set_threshold_ns(self, threshold_ns: int) -> None:
        settings = self.bpf["settings"]
        settings[settings.Key(0)] = settings.Leaf(threshold_ns)

    def counters(self) -> dict[str, int]:
        table = self.bpf["counters"]
        return {
            name: sum(int(value) for value in table[table.Key(index)])
            for index, name in enumerate(COUNTERS)
        }

    def open_ring_buffer(self, on_record: Callable[[bytes], None]) -> None:
        def callback(_ctx: Any, data: Any, size: int) -> int:
            on_record(ctypes.string_at(data, size))  # copy out; decoding happens later
            return 0

        self.bpf["events"].open_ring_buffer(callback)

    def poll(self, timeout_ms: int) -> None:
        self.bpf.ring_buffer_poll(timeout_ms)

    def consume(self) -> None:
        self.bpf.ring_buffer_consume()

    def detach(self) -> None:
        """Stop probing: no statement begins or ends any more. The ring buffer stays readable."""
        while self._perf_fds:
            libbcc().close_perf_event(self._perf_fds.pop())

    def close(self) -> None:
        self.detach()
        self.bpf.cleanup()  # nothing of ours is left for its tracefs clean-up to touch

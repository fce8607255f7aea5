"""A definition's BPF program: what it is, and the factory that builds it for a target.

A BpfProgram names its C file and where its functions attach; as a definition's
`open` (probes.OpenSource) it compiles the program for one target (compiler.py, in
a child) and returns the BpfSource that attaches it (source.py). The C file needs no
#include: slow_query.h, the code every program shares (statement_begin,
statement_end, the outcome handlers, the ring buffer), is put in front of it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Optional

from pgslowlog.bpf.attachments import (
    OUTCOME_UPROBES,
    Attachment,
    Uprobe,
    Usdt,
    WireProtocol,
    outcome_uprobes,
)
from pgslowlog.bpf.compiler import KPROBE, RAW_TRACEPOINT, CompileError, compile_program
from pgslowlog.bpf.decoder import layout_cflags
from pgslowlog.bpf.source import (
    EXIT_TRACEPOINT_FUNCTION,
    MAPS,
    SETTING_ATTACHED_REALTIME,
    SETTING_REALTIME_OFFSET,
    SETTING_THRESHOLD,
    BpfSource,
)
from pgslowlog.config import DaemonConfig
from pgslowlog.containers import in_initial_pid_namespace, own_pid_namespace
from pgslowlog.elf import PostgresBinary
from pgslowlog.probes import ProbeDefinition
from pgslowlog.sources import COUNTERS, ProbeLoadError
from pgslowlog.targets import Target

SHARED_C_FILE = files("pgslowlog.bpf") / "slow_query.h"
# Exported globals the shared code reads where the binary has them (plain C types).
APPLICATION_NAME = "application_name"
SHARED_GLOBALS = (APPLICATION_NAME,)
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _no_cflags(binary: PostgresBinary) -> list[str]:
    return []


def _no_requirement(binary: PostgresBinary) -> Optional[str]:
    return None


@dataclass(frozen=True)
class BpfProgram:
    """A BPF program whose functions run at `attachments` and call statement_begin /
    statement_end (slow_query.h).

    c_file: the .c file holding the functions `attachments` name.
    attachments: uprobes and USDT probes, each naming the BPF function it runs.
    protocol: SIMPLE or EXTENDED if every statement it sees is of that protocol;
        COUNTED: told from how many times a statement reports it runs.
    cflags: extra -D flags for one binary (for example version-dependent constants).
    report_backend_exit: report a statement whose backend exits mid-way; off for a
        program that misses some statement ends, whose stale entries would be misreported.
    extra_c_files: other .c files put before `c_file`, to build on another program's
        functions instead of copying them.
    globals: exported globals the program reads; their file addresses are in
        binary.objects for `cflags`, and a binary without them cannot take it.
    requirement: why a binary cannot take the program beyond missing symbols (for
        example an unknown struct layout), or None.
    ring_buffer_mib: its ring's size where not daemon.ring_buffer_mib: a program that
        reports only rare records needs less of the kernel's locked memory, which each
        instance of a containers = true target takes again.
    """

    c_file: Path
    attachments: tuple[Attachment, ...]
    protocol: WireProtocol = WireProtocol.COUNTED
    cflags: Callable[[PostgresBinary], list[str]] = field(default=_no_cflags, compare=False)
    report_backend_exit: bool = True
    extra_c_files: tuple[Path, ...] = ()
    globals: tuple[str, ...] = ()
    requirement: Callable[[PostgresBinary], Optional[str]] = field(
        default=_no_requirement, compare=False
    )
    ring_buffer_mib: Optional[int] = None

    # probes.ChecksBinary
    @property
    def symbols(self) -> frozenset[str]:
        own = {a.symbol for a in self.attachments if isinstance(a, Uprobe)}
        shared = {u.symbol for u in OUTCOME_UPROBES}
        return frozenset(own | shared | set(self.globals) | set(SHARED_GLOBALS))

    def unsupported_reason(self, binary: PostgresBinary) -> Optional[str]:
        for attachment in self.attachments:
            if isinstance(attachment, Usdt):
                if (attachment.provider, attachment.name) not in binary.usdt:
                    return (
                        f"no USDT probe {attachment.provider}:{attachment.name} in {binary.path} "
                        "(built without --enable-dtrace)"
                    )
            elif binary.function_offset(attachment.symbol) is None:
                why = (
                    "the binary is stripped; use a build with symbols"
                    if not binary.has_symtab
                    else "the function is inlined or absent in this build"
                )
                return f"no function {attachment.symbol} in {binary.path} ({why})"
        return binary.unexported(self.globals) or self.requirement(binary)

    # probes.OpenSource
    def __call__(
        self, definition: ProbeDefinition, target: Target, daemon: DaemonConfig
    ) -> BpfSource:
        """Compile and load the program for `target`; ProbeLoadError if refused."""
        attachments = self.attachments_on(target)
        functions = [(a.function, KPROBE) for a in attachments]
        functions.append((EXIT_TRACEPOINT_FUNCTION, RAW_TRACEPOINT))
        try:
            compiled = compile_program(
                self.text(),
                self.cflags_for(target, daemon),
                list(dict.fromkeys(functions)),  # a function may serve two attachments
                MAPS,
            )
        except CompileError as error:
            raise ProbeLoadError(
                f"loading probe {definition.name} failed ({error}); run `pgslowlog check` "
                "to see whether kernel headers or privileges are missing"
            ) from None
        return BpfSource(definition.name, target, attachments, compiled, daemon)

    def attachments_on(self, target: Target) -> list[Attachment]:
        """Its own attachments, and the outcome uprobes this binary can take (it exports
        their functions)."""
        return [*self.attachments, *outcome_uprobes(target.binary)]

    def text(self) -> bytes:
        """The shared part, then the program's own files: one translation unit for bcc.

        bcc rewrites map calls only in the main file, so the shared code cannot be an
        #include. The #line directives keep compiler messages pointing at the real files.
        """
        parts = [SHARED_C_FILE, *self.extra_c_files, self.c_file]
        return "\n".join(f'#line 1 "{path}"\n{path.read_text()}' for path in parts).encode()

    def cflags_for(self, target: Target, daemon: DaemonConfig) -> list[str]:
        binary = target.binary
        ring_mib = self.ring_buffer_mib or daemon.ring_buffer_mib
        ring_pages = ring_mib * 1024 * 1024 // PAGE_SIZE
        anchors = []
        for attachment in self.attachments_on(target):
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
            f"-DREPORT_BACKEND_EXIT={int(self.report_backend_exit)}",
            f"-DPROTOCOL={int(self.protocol)}",
            f"-DAPPLICATION_NAME_VADDR={binary.objects.get(APPLICATION_NAME, 0):#x}ULL",
            f"-DCAPTURE_PARAMS={int(daemon.capture_params)}",
            f"-DPID_NS_DEV={target.scope.device}ULL",
            f"-DPID_NS_INO={target.scope.inode}ULL",
            f"-DOWN_PID_NS_INIT={int(in_initial_pid_namespace())}",
            f"-DOWN_PID_NS_DEV={own_pid_namespace().device}ULL",
            f"-DOWN_PID_NS_INO={own_pid_namespace().inode}ULL",
            *sorted(set(anchors)),
            *shared_layout_cflags(),
            *self.cflags(binary),
        ]


def shared_layout_cflags() -> list[str]:
    """What user space assumes of slow_query.h, for its _Static_asserts: the record
    layout (decoder.py), the counters (sources.py) and the settings indexes (source.py)."""
    return [
        *layout_cflags(),
        *(f"-DPY_COUNTER_{name.upper()}={index}" for index, name in enumerate(COUNTERS)),
        f"-DPY_COUNTER_COUNT={len(COUNTERS)}",
        f"-DPY_SETTING_THRESHOLD={SETTING_THRESHOLD}",
        f"-DPY_SETTING_REALTIME_OFFSET={SETTING_REALTIME_OFFSET}",
        f"-DPY_SETTING_ATTACHED_REALTIME={SETTING_ATTACHED_REALTIME}",
    ]

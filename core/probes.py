"""Probe definitions: what to attach to, with which BPF program, on which binaries.

A definition is data. Plugins register them (hookspecs.pgslowlog_register_probes);
`select_probes` decides per target which ones attach, and loader.py attaches them
together with the outcome probes every definition shares (OUTCOME_UPROBES).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Union

from pgslowlog.config import DaemonConfig
from pgslowlog.elf import PostgresBinary
from pgslowlog.errors import UserError

if TYPE_CHECKING:
    from pgslowlog.sources import StatementSource
    from pgslowlog.targets import Target

AUTO = "auto"


@dataclass(frozen=True)
class Uprobe:
    """Run the BPF function `function` at entry (or return) of the function `symbol`."""

    symbol: str
    function: str
    retprobe: bool = False

    @property
    def anchor(self) -> str:
        """The VADDR_<anchor> cflag naming this attachment's file address."""
        return self.symbol


@dataclass(frozen=True)
class Usdt:
    """Run the BPF function `function` at the USDT probe `provider:name`.

    A probe with a semaphore has it maintained by the kernel (ref_ctr_offset) in
    every process that maps the binary, those started later included.
    """

    provider: str
    name: str
    function: str

    @property
    def anchor(self) -> str:
        return f"{self.provider}_{self.name}"


# Union, not `|`: an alias is evaluated at import, and 3.9 has no `type | type`.
Attachment = Union[Uprobe, Usdt]

# Shared by every definition, attached where the binary exports them: they set the
# statement's outcome (bpf/slow_query.h, on_cancel_request and on_transaction_abort).
OUTCOME_UPROBES = (
    Uprobe(symbol="StatementCancelHandler", function="on_cancel_request"),
    Uprobe(symbol="AbortCurrentTransaction", function="on_transaction_abort"),
)
# `sampled` also learns how each backend left: proc_exit(code), exported by every build
# (plugins/sampled_probe.c, on_backend_exit).
EXIT_UPROBE = Uprobe(symbol="proc_exit", function="on_backend_exit")
# Exported globals the shared code reads (plain C types, no struct layouts).
GLOBALS = ("application_name",)


class Protocol(enum.IntEnum):
    """What a definition knows about the wire protocol (PROTOCOL in slow_query.h)."""

    COUNTED = 0  # tell from the number of statement starts: extended reports several
    SIMPLE = 1
    EXTENDED = 2


def _no_cflags(binary: PostgresBinary) -> list[str]:
    return []


def _no_requirement(binary: PostgresBinary) -> str | None:
    return None


OpenSource = Callable[["ProbeDefinition", "Target", "DaemonConfig"], "StatementSource"]


@dataclass(frozen=True)
class ProbeDefinition:
    """A way of timing statements: a source of statement records for one target.

    Most definitions are a BPF program (`source`) whose functions run at
    `attachments` and call statement_begin/statement_end. A definition that is not
    a BPF program sets `open_source` instead (see sources.py).

    name: what users write in `probes = [...]` and what events carry as `probe`.
    source: the BPF C file; None for a definition with `open_source`.
    attachments: uprobes and USDT probes, each naming the BPF function it runs.
    priority: "auto" picks the supported definition with the highest priority.
    protocol: SIMPLE or EXTENDED if every statement it sees is of that protocol.
    cflags: extra -D flags for one binary (for example version-dependent constants).
    report_backend_exit: report a statement whose backend exits mid-way; off for a
        probe that misses some statement ends, whose stale entries would be misreported.
    extra_sources: other .c files put before `source`, to build on another
        definition's functions instead of copying them.
    globals: exported globals the BPF code reads; their file addresses are in
        binary.objects for `cflags`.
    requirement: why a binary cannot take the definition beyond missing symbols
        (for example an unknown struct layout), or None.
    automatic: whether "auto" may pick it; off for a definition with trade-offs a
        user should choose knowingly.
    auto_floor_ms: the lowest threshold (ms, given the daemon's settings) at which
        "auto" may pick it; None: any. A sampler sees every statement over the
        threshold only if the threshold is several sampling intervals long.
    open_source: makes the definition's StatementSource for one target, when it is
        not a BPF program with attachments (None: loader.LoadedProbe compiles `source`).
    """

    name: str
    description: str
    source: Path | None = None
    attachments: tuple[Attachment, ...] = ()
    priority: int = 0
    protocol: Protocol = Protocol.COUNTED
    cflags: Callable[[PostgresBinary], list[str]] = field(default=_no_cflags, compare=False)
    report_backend_exit: bool = True
    extra_sources: tuple[Path, ...] = ()
    globals: tuple[str, ...] = ()
    requirement: Callable[[PostgresBinary], str | None] = field(
        default=_no_requirement, compare=False
    )
    automatic: bool = True
    open_source: OpenSource | None = field(default=None, compare=False)
    auto_floor_ms: Callable[[DaemonConfig], float] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if (self.source is None) == (self.open_source is None):
            raise ValueError(
                f"probe definition {self.name!r} needs exactly one of source (a BPF C file) "
                "or open_source"
            )

    @property
    def symbols(self) -> set[str]:
        return {a.symbol for a in self.attachments if isinstance(a, Uprobe)} | set(self.globals)

    def unsupported_reason(self, binary: PostgresBinary) -> str | None:
        """None if the probe can attach to `binary`, else why not."""
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
        for name in self.globals:
            if name not in binary.objects:
                return f"no exported global {name} in {binary.path}"
        return self.requirement(binary)


def wanted_symbols(definitions: Iterable[ProbeDefinition]) -> frozenset[str]:
    """Every symbol worth looking up in a binary for these definitions."""
    symbols = {symbol for definition in definitions for symbol in definition.symbols}
    shared = {u.symbol for u in (*OUTCOME_UPROBES, EXIT_UPROBE)}
    return frozenset(symbols | shared | set(GLOBALS))


def select_probes(
    requested: Iterable[str],
    available: dict[str, ProbeDefinition],
    binary: PostgresBinary,
    label: str,
    daemon: DaemonConfig | None = None,
) -> list[ProbeDefinition]:
    """The definitions to attach for one target, or a UserError saying why none can.
    `daemon`: the settings "auto" weighs (the threshold); the defaults if None."""
    chosen: list[ProbeDefinition] = []
    for name in requested:
        if name == AUTO:
            best = _best_supported(available, binary, label, daemon)
            if best not in chosen:
                chosen.append(best)
            continue
        definition = available.get(name)
        if definition is None:
            known = ", ".join([AUTO, *sorted(available)])
            raise UserError(f"{label}: unknown probe {name!r}", f"use one of {known}")
        reason = definition.unsupported_reason(binary)
        if reason is not None:
            raise UserError(
                f"{label}: probe {name} cannot attach: {reason}",
                'use probes = ["auto"] to pick one that can',
            )
        if definition not in chosen:
            chosen.append(definition)
    return chosen


def auto_order(available: Iterable[ProbeDefinition]) -> list[ProbeDefinition]:
    """The definitions "auto" may pick, the one it tries first first."""
    return sorted((d for d in available if d.automatic), key=lambda d: -d.priority)


def below_floor(definition: ProbeDefinition, daemon: DaemonConfig) -> str | None:
    """Why "auto" does not pick `definition` at this threshold, or None."""
    if definition.auto_floor_ms is None:
        return None
    floor = definition.auto_floor_ms(daemon)
    if daemon.threshold_ms >= floor:
        return None
    return f"threshold_ms {daemon.threshold_ms:g} is under its floor of {floor:g} ms"


def _best_supported(
    available: dict[str, ProbeDefinition],
    binary: PostgresBinary,
    label: str,
    daemon: DaemonConfig | None,
) -> ProbeDefinition:
    settings = daemon or DaemonConfig()
    reasons = []
    for definition in auto_order(available.values()):
        reason = definition.unsupported_reason(binary) or below_floor(definition, settings)
        if reason is None:
            return definition
        reasons.append(f"{definition.name}: {reason}")
    if not reasons:
        raise UserError(f"{label}: no probe definition is installed", "reinstall pgslowlog")
    raise UserError(
        f"{label}: no probe can attach to {binary.path} ({'; '.join(reasons)})",
        "point the target at a PostgreSQL server binary",
    )

"""Probe definitions: which symbols to probe, with which BPF program, on which binaries.

A definition is data. Plugins register them (hookspecs.pgslowlog_register_probes);
`select_probes` decides per target which ones attach, and loader.py attaches them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pgslowlog.elf import PostgresBinary
from pgslowlog.errors import UserError

AUTO = "auto"


@dataclass(frozen=True)
class Uprobe:
    """Attach the BPF function `function` at entry (or return) of `symbol`."""

    symbol: str
    function: str
    retprobe: bool = False


def _no_cflags(binary: PostgresBinary) -> list[str]:
    return []


@dataclass(frozen=True)
class ProbeDefinition:
    """A way of timing statements; its BPF source includes bpf/slow_query.h.

    name: what users write in `probes = [...]` and what events carry as `probe`.
    priority: "auto" picks the supported definition with the highest priority.
    cflags: extra -D flags for one binary (for example version-dependent constants).
    report_backend_exit: report a statement whose backend exits mid-way; off for a
        probe that misses some statement ends, whose stale entries would be misreported.
    """

    name: str
    description: str
    source: Path
    uprobes: tuple[Uprobe, ...]
    priority: int = 0
    cflags: Callable[[PostgresBinary], list[str]] = field(default=_no_cflags, compare=False)
    report_backend_exit: bool = True

    @property
    def symbols(self) -> set[str]:
        return {uprobe.symbol for uprobe in self.uprobes}

    def unsupported_reason(self, binary: PostgresBinary) -> str | None:
        """None if the probe can attach to `binary`, else why not."""
        for symbol in sorted(self.symbols):
            if binary.function_offset(symbol) is None:
                why = (
                    "the binary is stripped; use a build with symbols"
                    if not binary.has_symtab
                    else "the function is inlined or absent in this build"
                )
                return f"no function {symbol} in {binary.path} ({why})"
        return None


def select_probes(
    requested: Iterable[str],
    available: dict[str, ProbeDefinition],
    binary: PostgresBinary,
    label: str,
) -> list[ProbeDefinition]:
    """The definitions to attach for one target, or a UserError saying why none can."""
    chosen: list[ProbeDefinition] = []
    for name in requested:
        if name == AUTO:
            best = _best_supported(available, binary, label)
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


def _best_supported(
    available: dict[str, ProbeDefinition], binary: PostgresBinary, label: str
) -> ProbeDefinition:
    reasons = []
    for definition in sorted(available.values(), key=lambda d: -d.priority):
        reason = definition.unsupported_reason(binary)
        if reason is None:
            return definition
        reasons.append(f"{definition.name}: {reason}")
    if not reasons:
        raise UserError(f"{label}: no probe definition is installed", "reinstall pgslowlog")
    raise UserError(
        f"{label}: no probe can attach to {binary.path} ({'; '.join(reasons)})",
        "point the target at a PostgreSQL server binary",
    )

"""Probe definitions: ways of timing statements, and which attach to a target.

A definition is data plus a factory. Plugins register them
(hookspecs.pgslowlog_register_probes); `select_probes` decides per target which ones
attach; `open` makes each one's StatementSource (sources.py). What kind of source it
opens is the factory's business: a BPF program (bpf.program.BpfProgram), the sampler
(sampled.source.OpenSampled), or a third party's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Optional, Protocol, runtime_checkable

from pgslowlog.config import DaemonConfig
from pgslowlog.elf import PostgresBinary
from pgslowlog.errors import UserError
from pgslowlog.sources import StatementSource
from pgslowlog.targets import Target

AUTO = "auto"


class OpenSource(Protocol):
    """Makes a definition's source for one target, ready to attach (it may compile);
    raises sources.ProbeLoadError when the kernel or the compiler refuses."""

    def __call__(
        self, definition: ProbeDefinition, target: Target, daemon: DaemonConfig, /
    ) -> StatementSource: ...


@runtime_checkable
class ChecksBinary(Protocol):
    """A factory that needs something of the binary: symbols to find, and a verdict.
    (isinstance() reads `symbols` on Python 3.9-3.11: keep it cheap and never raising.)"""

    @property
    def symbols(self) -> frozenset[str]:
        """Functions and exported globals to look up in the binary (elf.PostgresBinary
        .functions and .objects hold those found)."""

    def unsupported_reason(self, binary: PostgresBinary, /) -> Optional[str]:
        """None if a source can be opened on `binary`, else why not, in a few words."""


@dataclass(frozen=True)
class ProbeDefinition:
    """A way of timing statements.

    name: what users write in `probes = [...]` and what events carry as `probe`.
    description: the line `pgslowlog probes` shows for it.
    open: its factory (OpenSource); one that is also a ChecksBinary says what a
        binary must offer.
    priority: "auto" picks the supported definition with the highest priority.
    automatic: whether "auto" may pick it; off for a definition with trade-offs a
        user should choose knowingly.
    auto_floor_ms: the lowest threshold (ms, given the daemon's settings) at which
        "auto" may pick it; None: any. A sampler sees every statement over the
        threshold only if the threshold is several sampling intervals long.
    """

    name: str
    description: str
    # Not compared: a definition is known by its name (the plugins refuse a second one
    # of the same name), and a factory need not be hashable.
    open: OpenSource = field(compare=False)
    priority: int = 0
    automatic: bool = True
    auto_floor_ms: Optional[Callable[[DaemonConfig], float]] = field(default=None, compare=False)

    @property
    def symbols(self) -> frozenset[str]:
        return self.open.symbols if isinstance(self.open, ChecksBinary) else frozenset()

    def unsupported_reason(self, binary: PostgresBinary) -> str | None:
        """None if the definition can attach to `binary`, else why not."""
        if isinstance(self.open, ChecksBinary):
            return self.open.unsupported_reason(binary)
        return None


def wanted_symbols(definitions: Iterable[ProbeDefinition]) -> frozenset[str]:
    """Every symbol worth looking up in a binary for these definitions."""
    return frozenset(symbol for definition in definitions for symbol in definition.symbols)


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

"""Where a BPF program attaches in the postgres binary: uprobes and USDT probes."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Union

from pgslowlog.elf import PostgresBinary


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

# Added to every program, where the binary exports them: they set the statement's
# outcome (slow_query.h, on_cancel_request and on_transaction_abort).
OUTCOME_UPROBES = (
    Uprobe(symbol="StatementCancelHandler", function="on_cancel_request"),
    Uprobe(symbol="AbortCurrentTransaction", function="on_transaction_abort"),
)


def outcome_uprobes(binary: PostgresBinary) -> list[Uprobe]:
    """The outcome uprobes this binary can take (it exports their functions)."""
    return [u for u in OUTCOME_UPROBES if binary.function_offset(u.symbol) is not None]


# proc_exit(code), exported by every build: how a backend left (sampled/outcomes.c).
EXIT_UPROBE = Uprobe(symbol="proc_exit", function="on_backend_exit")


class WireProtocol(enum.IntEnum):
    """What a program knows about the wire protocol (PROTOCOL in slow_query.h)."""

    COUNTED = 0  # tell from the number of statement starts: extended reports several
    SIMPLE = 1
    EXTENDED = 2

"""`usdt`: the query__start / query__done USDT probes of --enable-dtrace builds."""

from __future__ import annotations

import re
from pathlib import Path

from pgslowlog.bpf.attachments import Usdt, WireProtocol
from pgslowlog.bpf.program import BpfProgram
from pgslowlog.elf import PostgresBinary
from pgslowlog.errors import UserError
from pgslowlog.hookspecs import hookimpl
from pgslowlog.plugin_manager import RegisterProbe
from pgslowlog.probes import ProbeDefinition

# x86-64 register names as the compiler writes them -> struct pt_regs fields.
_REGISTERS = {
    **{f"r{name}": name for name in ("ax", "bx", "cx", "dx", "si", "di", "bp", "sp", "ip")},
    **{f"r{n}": f"r{n}" for n in range(8, 16)},
}
# "8@%rbx" or "8@-144(%rbp)": size@register or size@offset(register)
_ARGUMENT = re.compile(r"^-?8@(?:%(?P<reg>\w+)|(?P<offset>-?\d+)\(%(?P<base>\w+)\))$")


def argument_cflags(prefix: str, spec: str) -> list[str]:
    """Where a pointer-sized USDT argument lives, as cflags for usdt_probe.c."""
    match = _ARGUMENT.match(spec)
    register = match and _REGISTERS.get(match["reg"] or match["base"])
    if not match or not register:
        raise UserError(
            f"USDT argument {spec!r} has a form pgslowlog cannot read",
            'use probes = ["activity"] for this binary',
        )
    deref = match["offset"] is not None
    return [
        f"-D{prefix}_REG={register}",
        f"-D{prefix}_OFFSET={int(match['offset'] or 0)}",
        f"-D{prefix}_DEREF={int(deref)}",
    ]


def query_start_cflags(binary: PostgresBinary) -> list[str]:
    note = binary.usdt[("postgresql", "query__start")]
    return argument_cflags("QUERY_START_ARG", note.arguments[0])


USDT = ProbeDefinition(
    name="usdt",
    description=(
        "USDT probes query__start and query__done (builds with --enable-dtrace, such as "
        "Debian's): simple protocol only; semaphores kept by the kernel for every backend"
    ),
    open=BpfProgram(
        c_file=Path(__file__).with_name("usdt_probe.c"),
        attachments=(
            Usdt(provider="postgresql", name="query__start", function="on_query_start"),
            Usdt(provider="postgresql", name="query__done", function="on_query_done"),
        ),
        protocol=WireProtocol.SIMPLE,
        cflags=query_start_cflags,
    ),
    priority=20,
)


@hookimpl
def pgslowlog_register_probes(register: RegisterProbe) -> None:
    register(USDT)

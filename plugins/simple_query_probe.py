"""`simple_query`: uprobe + uretprobe on exec_simple_query (needs a symbol table)."""

from __future__ import annotations

from pathlib import Path

from pgslowlog.bpf.attachments import Uprobe, WireProtocol
from pgslowlog.bpf.program import BpfProgram
from pgslowlog.hookspecs import hookimpl
from pgslowlog.plugin_manager import RegisterProbe
from pgslowlog.probes import ProbeDefinition

SIMPLE_QUERY = ProbeDefinition(
    name="simple_query",
    description=(
        "uprobe and uretprobe on the static exec_simple_query: simple protocol only; "
        "needs a binary with a symbol table"
    ),
    open=BpfProgram(
        c_file=Path(__file__).with_name("simple_query_probe.c"),
        attachments=(
            Uprobe(symbol="exec_simple_query", function="on_exec_simple_query"),
            Uprobe(
                symbol="exec_simple_query", function="on_exec_simple_query_return", retprobe=True
            ),
        ),
        protocol=WireProtocol.SIMPLE,
    ),
    priority=10,
)


@hookimpl
def pgslowlog_register_probes(register: RegisterProbe) -> None:
    register(SIMPLE_QUERY)

"""The original probe: uprobe + uretprobe on exec_simple_query (needs a symbol table)."""

from __future__ import annotations

from pathlib import Path

from pgslowlog.hookspecs import hookimpl
from pgslowlog.plugin_manager import RegisterProbe
from pgslowlog.probes import ProbeDefinition, Uprobe

EXEC_SIMPLE_QUERY = ProbeDefinition(
    name="exec_simple_query",
    description=(
        "uprobe and uretprobe on the static exec_simple_query: simple protocol only, "
        "failed statements are not seen; needs a binary with a symbol table"
    ),
    source=Path(__file__).with_name("exec_simple_query_probe.c"),
    uprobes=(
        Uprobe(symbol="exec_simple_query", function="on_exec_simple_query"),
        Uprobe(symbol="exec_simple_query", function="on_exec_simple_query_return", retprobe=True),
    ),
    priority=10,
    # An ERROR longjmps past the uretprobe: its entry stays until the next statement.
    report_backend_exit=False,
)


@hookimpl
def pgslowlog_register_probes(register: RegisterProbe) -> None:
    register(EXEC_SIMPLE_QUERY)

"""`extended`: activity plus exec_parse/bind/execute_message, for builds that keep them."""

from __future__ import annotations

from pathlib import Path

from pgslowlog.bpf.attachments import Uprobe, WireProtocol
from pgslowlog.bpf.program import BpfProgram
from pgslowlog.hookspecs import hookimpl
from pgslowlog.plugin_manager import RegisterProbe
from pgslowlog.plugins.activity_probe import (
    ACTIVITY_PROGRAM,
    backend_state_cflags,
    backend_states_unknown,
)
from pgslowlog.probes import ProbeDefinition

EXTENDED = ProbeDefinition(
    name="extended",
    description=(
        "activity plus exec_parse_message, exec_bind_message and exec_execute_message "
        "(builds that keep them, such as -O0): extended-protocol statements with their "
        "prepared statement name and, with capture_params, their parameter values; a "
        "pipeline or batch is one event, as with activity"
    ),
    open=BpfProgram(
        c_file=Path(__file__).with_name("extended_probe.c"),
        attachments=(
            Uprobe(symbol="pgstat_report_activity", function="on_report_activity"),
            Uprobe(symbol="exec_parse_message", function="on_parse_message"),
            Uprobe(symbol="exec_bind_message", function="on_bind_message"),
            Uprobe(symbol="exec_execute_message", function="on_execute_message"),
        ),
        protocol=WireProtocol.COUNTED,
        cflags=backend_state_cflags,
        requirement=backend_states_unknown,
        extra_c_files=(ACTIVITY_PROGRAM.c_file,),  # on_report_activity: start, end, text
    ),
    priority=110,  # everything activity sees, and more
)


@hookimpl
def pgslowlog_register_probes(register: RegisterProbe) -> None:
    register(EXTENDED)

"""`extended`: activity plus exec_parse/bind/execute_message, for builds that keep them."""

from __future__ import annotations

from pathlib import Path

from pgslowlog.hookspecs import hookimpl
from pgslowlog.plugin_manager import RegisterProbe
from pgslowlog.plugins.activity_probe import ACTIVITY, backend_state_cflags
from pgslowlog.probes import ProbeDefinition, Protocol, Uprobe

EXTENDED = ProbeDefinition(
    name="extended",
    description=(
        "activity plus exec_parse_message, exec_bind_message and exec_execute_message "
        "(builds that keep them, such as -O0): extended-protocol statements with their "
        "prepared statement name and, with capture_params, their parameter values; a "
        "pipeline or batch is one event, as with activity"
    ),
    source=Path(__file__).with_name("extended_probe.c"),
    attachments=(
        Uprobe(symbol="pgstat_report_activity", function="on_report_activity"),
        Uprobe(symbol="exec_parse_message", function="on_parse_message"),
        Uprobe(symbol="exec_bind_message", function="on_bind_message"),
        Uprobe(symbol="exec_execute_message", function="on_execute_message"),
    ),
    priority=110,  # everything activity sees, and more
    protocol=Protocol.COUNTED,
    cflags=backend_state_cflags,
    extra_sources=(ACTIVITY.source,),  # on_report_activity: start, end, text
)


@hookimpl
def pgslowlog_register_probes(register: RegisterProbe) -> None:
    register(EXTENDED)

"""`sampled`: slow statements found by looking, with no trap per statement.

`probes = ["auto"]` picks it from threshold_ms 50 (5 x sample_interval_ms, where set). The
source is pgslowlog's own (pgslowlog.sampled): this plugin only registers it.
"""

from __future__ import annotations

from pgslowlog.hookspecs import hookimpl
from pgslowlog.plugin_manager import RegisterProbe
from pgslowlog.probes import ProbeDefinition
from pgslowlog.sampled.source import OpenSampled, auto_floor_ms

SAMPLED = ProbeDefinition(
    name="sampled",
    description=(
        "no trap per statement: every backend's pg_stat_activity entry read from shared "
        "memory every few ms, and uprobes only on the error, cancel and exit paths (PostgreSQL "
        "14-18): each statement of a pipeline or batch on its own; the protocol is not "
        "told, statements under threshold + 2 intervals may go unseen"
    ),
    open=OpenSampled(),
    priority=200,  # "auto" picks it first, where the threshold allows
    auto_floor_ms=auto_floor_ms,
)


@hookimpl
def pgslowlog_register_probes(register: RegisterProbe) -> None:
    register(SAMPLED)

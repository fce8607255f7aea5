"""Example third-party probe definition: time utility statements.

[[target]]
binary = "/usr/lib/postgresql/15/bin/postgres"
probes = ["utility"]
"""

from __future__ import annotations

from pathlib import Path

from pgslowlog import ProbeDefinition, RegisterProbe, Uprobe, hookimpl
from pgslowlog.probes import Protocol

UTILITY = ProbeDefinition(
    name="utility",
    description="utility statements (DO, VACUUM, DDL) through standard_ProcessUtility",
    source=Path(__file__).with_name("utility.c"),
    attachments=(
        Uprobe(symbol="standard_ProcessUtility", function="on_utility"),
        Uprobe(symbol="standard_ProcessUtility", function="on_utility_return", retprobe=True),
    ),
    priority=0,  # never chosen by "auto": only when a target names it
    protocol=Protocol.COUNTED,
)


@hookimpl
def pgslowlog_register_probes(register: RegisterProbe) -> None:
    register(UTILITY)

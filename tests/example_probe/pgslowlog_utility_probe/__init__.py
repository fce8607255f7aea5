"""Example third-party probe definition: time utility statements.

[[target]]
binary = "/usr/lib/postgresql/15/bin/postgres"
probes = ["utility"]
"""

from __future__ import annotations

from pathlib import Path

from pgslowlog import BpfProgram, ProbeDefinition, RegisterProbe, Uprobe, hookimpl

UTILITY = ProbeDefinition(
    name="utility",
    description="utility statements (DO, VACUUM, DDL) through standard_ProcessUtility",
    open=BpfProgram(
        c_file=Path(__file__).with_name("utility.c"),
        attachments=(
            Uprobe(symbol="standard_ProcessUtility", function="on_utility"),
            Uprobe(symbol="standard_ProcessUtility", function="on_utility_return", retprobe=True),
        ),
    ),
    automatic=False,  # never chosen by "auto": only when a target names it
)


@hookimpl
def pgslowlog_register_probes(register: RegisterProbe) -> None:
    register(UTILITY)

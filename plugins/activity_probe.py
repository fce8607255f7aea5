"""`activity`, the default probe: one uprobe on pgstat_report_activity, exported by every build."""

from __future__ import annotations

from pathlib import Path

from pgslowlog.elf import PostgresBinary
from pgslowlog.hookspecs import hookimpl
from pgslowlog.plugin_manager import RegisterProbe
from pgslowlog.probes import ProbeDefinition, Protocol, Uprobe


def backend_state_cflags(binary: PostgresBinary) -> list[str]:
    """BackendState values (src/include/utils/backend_status.h) for this version.

    PostgreSQL 18 inserted STATE_STARTING after STATE_UNDEFINED, shifting the rest.
    """
    shift = 1 if binary.major >= 18 else 0
    return [
        f"-DSTATE_IDLE={1 + shift}",
        f"-DSTATE_RUNNING={2 + shift}",
        f"-DSTATE_IDLEINTRANSACTION={3 + shift}",
        f"-DSTATE_IDLEINTRANSACTION_ABORTED={5 + shift}",
    ]


ACTIVITY = ProbeDefinition(
    name="activity",
    description=(
        "uprobe on the exported pgstat_report_activity: every build, stripped ones too; "
        "simple and extended protocol (told apart by how often a statement reports it is "
        "running), failed and cancelled statements. A pipeline or batch (psycopg pipeline, "
        "JDBC executeBatch, asyncpg executemany) is one event, timed to its Sync, under its "
        "first statement's text: a statement ends when the backend reports idle, which a "
        "pipeline does only at its Sync"
    ),
    source=Path(__file__).with_name("activity_probe.c"),
    attachments=(Uprobe(symbol="pgstat_report_activity", function="on_report_activity"),),
    priority=100,
    protocol=Protocol.COUNTED,
    cflags=backend_state_cflags,
)


@hookimpl
def pgslowlog_register_probes(register: RegisterProbe) -> None:
    register(ACTIVITY)

"""`activity`, the default probe: one uprobe on pgstat_report_activity, exported by every build."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pgslowlog.bpf.attachments import Uprobe, WireProtocol
from pgslowlog.bpf.program import BpfProgram
from pgslowlog.elf import PostgresBinary
from pgslowlog.hookspecs import hookimpl
from pgslowlog.pg_layouts import layout_for, unverified
from pgslowlog.plugin_manager import RegisterProbe
from pgslowlog.probes import ProbeDefinition


def backend_state_cflags(binary: PostgresBinary) -> list[str]:
    """BackendState values (src/include/utils/backend_status.h) for this major, as
    pg_layouts derived them: PostgreSQL 18 inserted STATE_STARTING, shifting the rest."""
    layout = layout_for(binary.major)
    return [
        f"-DSTATE_IDLE={layout.state_idle}",
        f"-DSTATE_RUNNING={layout.state_running}",
        f"-DSTATE_IDLEINTRANSACTION={layout.state_idleintransaction}",
        f"-DSTATE_IDLEINTRANSACTION_ABORTED={layout.state_idleintransaction_aborted}",
    ]


def backend_states_unknown(binary: PostgresBinary) -> Optional[str]:
    """A wrong STATE_RUNNING would leave every statement unseen without a word: an
    unverified major is refused, never guessed."""
    return unverified(binary.major)


ACTIVITY_PROGRAM = BpfProgram(
    c_file=Path(__file__).with_name("activity_probe.c"),
    attachments=(Uprobe(symbol="pgstat_report_activity", function="on_report_activity"),),
    protocol=WireProtocol.COUNTED,
    cflags=backend_state_cflags,
    requirement=backend_states_unknown,
)
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
    open=ACTIVITY_PROGRAM,
    priority=100,
)


@hookimpl
def pgslowlog_register_probes(register: RegisterProbe) -> None:
    register(ACTIVITY)

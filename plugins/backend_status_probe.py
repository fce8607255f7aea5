"""`backend_status`: one uprobe per statement, reading PostgreSQL's own pg_stat_activity entry.

Opt-in (`probes = ["backend_status"]`), for the lowest cost per statement: the
statement's start, end and text come from the backend's PgBackendStatus entry at
ReadyForQuery, so a statement costs one trap instead of two (simple) or three
(prepared). What it gives up, compared with `activity`, is in docs/probes.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pgslowlog.bpf.attachments import EXIT_UPROBE, Uprobe, WireProtocol
from pgslowlog.bpf.program import BpfProgram
from pgslowlog.elf import PostgresBinary
from pgslowlog.hookspecs import hookimpl
from pgslowlog.pg_layouts import layout_for
from pgslowlog.plugin_manager import RegisterProbe
from pgslowlog.plugins.activity_probe import backend_state_cflags
from pgslowlog.probes import ProbeDefinition

# The majors this definition was tested on; the others are not offered.
TESTED_MAJORS = range(15, 19)
ENTRY_GLOBAL = "MyBEEntry"
QUERY_SIZE_GLOBAL = "pgstat_track_activity_query_size"


def layout_cflags(binary: PostgresBinary) -> list[str]:
    """Where PgBackendStatus keeps what the program reads, as pg_layouts derived it."""
    layout = layout_for(binary.major)
    return [
        *backend_state_cflags(binary),
        f"-DSTATE_DISABLED={layout.state_disabled}",
        f"-DOFFSET_ACTIVITY_START={layout.st_activity_start_timestamp:#x}",
        f"-DOFFSET_STATE_START={layout.st_state_start_timestamp:#x}",
        f"-DOFFSET_STATE={layout.st_state:#x}",
        f"-DOFFSET_ACTIVITY_RAW={layout.st_activity_raw:#x}",
        f"-DMYBEENTRY_VADDR={binary.objects[ENTRY_GLOBAL]:#x}ULL",
        f"-DQUERY_SIZE_VADDR={binary.objects[QUERY_SIZE_GLOBAL]:#x}ULL",
    ]


def layout_unsupported(binary: PostgresBinary) -> Optional[str]:
    if binary.major not in TESTED_MAJORS:
        return (
            f"backend_status is tested on PostgreSQL {TESTED_MAJORS.start}-"
            f"{TESTED_MAJORS.stop - 1}, not {binary.major}; use the activity probe"
        )
    return None


BACKEND_STATUS = ProbeDefinition(
    name="backend_status",
    description=(
        "one uprobe per statement, on the exported ReadyForQuery: start, end and text read "
        "from the backend's pg_stat_activity entry (PostgreSQL 15-18; text cut at "
        "track_activity_query_size, extended protocol timed from Execute, protocol not told, "
        "a pipeline reported by its last statement)"
    ),
    open=BpfProgram(
        c_file=Path(__file__).with_name("backend_status_probe.c"),
        attachments=(Uprobe(symbol="ReadyForQuery", function="on_ready_for_query"), EXIT_UPROBE),
        protocol=WireProtocol.COUNTED,
        cflags=layout_cflags,
        globals=(ENTRY_GLOBAL, QUERY_SIZE_GLOBAL),
        requirement=layout_unsupported,
    ),
    automatic=False,  # chosen knowingly: see the module docstring
)


@hookimpl
def pgslowlog_register_probes(register: RegisterProbe) -> None:
    register(BACKEND_STATUS)

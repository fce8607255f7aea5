"""`backend_status`: one uprobe per statement, reading PostgreSQL's own pg_stat_activity entry.

Opt-in (`probes = ["backend_status"]`), for the lowest cost per statement: the
statement's start, end and text come from the backend's PgBackendStatus entry at
ReadyForQuery, so a statement costs one trap instead of two (simple) or three
(prepared). What it gives up, compared with `activity`, is in the README.
"""

from __future__ import annotations

from pathlib import Path

from pgslowlog.elf import PostgresBinary
from pgslowlog.hookspecs import hookimpl
from pgslowlog.plugin_manager import RegisterProbe
from pgslowlog.plugins.activity_probe import backend_state_cflags
from pgslowlog.probes import ProbeDefinition, Protocol, Uprobe

# Offsets into PgBackendStatus (src/include/utils/backend_status.h) on x86-64 Linux,
# the same from 15 to 18: read off 15's debug information (gdb `ptype /o`) and
# compared field by field with 18's header. Other versions are not offered.
PG_BACKEND_STATUS_OFFSETS = {
    "OFFSET_ACTIVITY_START": 0x20,  # TimestampTz st_activity_start_timestamp
    "OFFSET_STATE_START": 0x28,  # TimestampTz st_state_start_timestamp (must follow it)
    "OFFSET_STATE": 0xE8,  # BackendState st_state
    "OFFSET_ACTIVITY_RAW": 0xF8,  # char *st_activity_raw
}
LAYOUT_MAJORS = range(15, 19)
ENTRY_GLOBAL = "MyBEEntry"
QUERY_SIZE_GLOBAL = "pgstat_track_activity_query_size"


def layout_cflags(binary: PostgresBinary) -> list[str]:
    shift = 1 if binary.major >= 18 else 0  # STATE_STARTING, as in backend_state_cflags
    return [
        *backend_state_cflags(binary),
        f"-DSTATE_DISABLED={6 + shift}",
        *(f"-D{name}={offset:#x}" for name, offset in PG_BACKEND_STATUS_OFFSETS.items()),
        f"-DMYBEENTRY_VADDR={binary.objects[ENTRY_GLOBAL]:#x}ULL",
        f"-DQUERY_SIZE_VADDR={binary.objects[QUERY_SIZE_GLOBAL]:#x}ULL",
    ]


def layout_unsupported(binary: PostgresBinary) -> str | None:
    if binary.major not in LAYOUT_MAJORS:
        return (
            f"PostgreSQL {binary.major}'s backend status layout is not known to pgslowlog "
            f"(known: {LAYOUT_MAJORS.start}-{LAYOUT_MAJORS.stop - 1}); use the activity probe"
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
    source=Path(__file__).with_name("backend_status_probe.c"),
    attachments=(
        Uprobe(symbol="ReadyForQuery", function="on_ready_for_query"),
        Uprobe(symbol="proc_exit", function="on_backend_exit"),
    ),
    automatic=False,  # chosen knowingly: see the module docstring
    protocol=Protocol.COUNTED,
    cflags=layout_cflags,
    globals=(ENTRY_GLOBAL, QUERY_SIZE_GLOBAL),
    requirement=layout_unsupported,
)


@hookimpl
def pgslowlog_register_probes(register: RegisterProbe) -> None:
    register(BACKEND_STATUS)

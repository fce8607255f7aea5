"""pg_wait_events: wait_event_info -> pg_stat_activity's names, per major.

Plain unit tests: no server, no root, nothing attached. The expected names were asked of
the real binaries (14.22, 15.20, 16.14, 17.11, 18.6: gdb calling their own
pgstat_get_wait_event(), as .ci/pg-wait-events does) and, for 13, read in 13.16's
source; .ci/pg-wait-events --check re-derives the whole table.
"""

from __future__ import annotations

import re

import pytest

from pgslowlog.pg_layouts import WAIT_EVENT_TYPES
from pgslowlog.pg_wait_events import EVENTS, WHOLE_CLASS, wait_event_name

MAJORS = (13, 14, 15, 16, 17, 18)
LWLOCK, LOCK, BUFFERPIN, ACTIVITY = 0x01000000, 0x03000000, 0x04000000, 0x05000000
CLIENT, EXTENSION, IPC, TIMEOUT, IO = 0x06000000, 0x07000000, 0x08000000, 0x09000000, 0x0A000000
INJECTIONPOINT = 0x0B000000


def test_every_major_is_tabled() -> None:
    assert sorted(EVENTS) == list(MAJORS)
    assert sorted(WHOLE_CLASS) == list(MAJORS)
    assert sorted(WAIT_EVENT_TYPES) == list(MAJORS)


@pytest.mark.parametrize("major", MAJORS)
def test_tables_are_well_formed(major: int) -> None:
    tabled = {LOCK, ACTIVITY, CLIENT, IPC, TIMEOUT, IO}
    tabled |= {BUFFERPIN, EXTENSION} if major >= 17 else set()
    assert set(EVENTS[major]) == tabled
    # 13-16 name BufferPin and Extension in pgstat_get_wait_event() itself, any id.
    whole = {BUFFERPIN: "BufferPin", EXTENSION: "Extension"} if major <= 16 else {}
    assert WHOLE_CLASS[major] == whole
    for class_id, names in EVENTS[major].items():
        assert class_id in WAIT_EVENT_TYPES[major]
        assert len(set(names)) == len(names), f"{major} {class_id:#x}: duplicate names"
        assert all(re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", name) for name in names)


# (major, wait_event_info, expected): one row per class per major at least.
KNOWN = [
    # Lock: LockTagType values; frozenid is 2 in 13.16 already, applytransaction 16+.
    *((major, LOCK | 5, "Lock:transactionid") for major in MAJORS),
    *((major, LOCK | 0, "Lock:relation") for major in MAJORS),
    *((major, LOCK | 2, "Lock:frozenid") for major in MAJORS),
    (15, LOCK | 10, "Lock:advisory"),
    (16, LOCK | 11, "Lock:applytransaction"),
    (18, LOCK | 11, "Lock:applytransaction"),
    # Timeout: CheckpointWriteDelay (15+) sits before PgSleep.
    (13, TIMEOUT | 1, "Timeout:PgSleep"),
    (14, TIMEOUT | 1, "Timeout:PgSleep"),
    (14, TIMEOUT | 2, "Timeout:RecoveryApplyDelay"),
    (15, TIMEOUT | 1, "Timeout:CheckpointWriteDelay"),
    *((major, TIMEOUT | 2, "Timeout:PgSleep") for major in (15, 16, 17, 18)),
    (13, TIMEOUT | 5, "Timeout:RegisterSyncRequest"),  # appended in a 13 minor release
    # Client
    *((major, CLIENT | 0, "Client:ClientRead") for major in MAJORS),
    *((major, CLIENT | 1, "Client:ClientWrite") for major in MAJORS),
    (16, CLIENT | 2, "Client:GSSOpenServer"),
    (17, CLIENT | 2, "Client:GssOpenServer"),  # 17+ CamelCase the upper-case name
    (18, CLIENT | 7, "Client:WalSenderWaitForWal"),
    # IO
    (13, IO | 13, "IO:DataFileRead"),
    (14, IO | 15, "IO:DataFileRead"),
    (14, IO | 13, "IO:DataFileImmediateSync"),
    (14, IO | 17, "IO:DataFileTruncate"),
    (15, IO | 13, "IO:DataFileExtend"),
    *((major, IO | 17, "IO:DataFileRead") for major in (15, 16, 17)),
    (18, IO | 13, "IO:ControlFileWriteUpdate"),
    (18, IO | 17, "IO:DataFileExtend"),
    (18, IO | 21, "IO:DataFileRead"),
    (13, IO | 67, "IO:WALWrite"),
    (16, IO | 73, "IO:WALWrite"),
    (17, IO | 76, "IO:WalWrite"),
    (18, IO | 80, "IO:WalWrite"),
    # IPC
    (13, IPC | 0, "IPC:BackupWaitWalArchive"),
    *((major, IPC | 0, "IPC:AppendReady") for major in (14, 15, 16, 17, 18)),
    (13, IPC | 26, "IPC:MessageQueueReceive"),
    (15, IPC | 31, "IPC:MessageQueueReceive"),
    (16, IPC | 49, "IPC:SyncRep"),
    (18, IPC | 35, "IPC:MessageQueueReceive"),
    (18, IPC | 51, "IPC:SafeSnapshot"),
    # Appended by minor releases (ABI order): 15.20, 17.11, 18.6 have it.
    (15, IPC | 51, "IPC:WalReceiverUpstreamCatchup"),
    (17, IPC | 57, "IPC:WalReceiverUpstreamCatchup"),
    (18, IPC | 57, "IPC:WalReceiverUpstreamCatchup"),
    # Activity
    *((major, ACTIVITY | 0, "Activity:ArchiverMain") for major in MAJORS),
    (13, ACTIVITY | 12, "Activity:WalWriterMain"),
    (15, ACTIVITY | 11, "Activity:WalWriterMain"),
    (16, ACTIVITY | 1, "Activity:AutoVacuumMain"),
    (17, ACTIVITY | 1, "Activity:AutovacuumMain"),
    (18, ACTIVITY | 17, "Activity:WalWriterMain"),
    # BufferPin and Extension
    *((major, BUFFERPIN, "BufferPin:BufferPin") for major in MAJORS),
    *((major, EXTENSION, "Extension:Extension") for major in MAJORS),
    *((major, BUFFERPIN | 1, "BufferPin:BufferPin") for major in (13, 14, 15, 16)),
    *((major, EXTENSION | 3, "Extension:Extension") for major in (13, 14, 15, 16)),
]


@pytest.mark.parametrize(("major", "info", "expected"), KNOWN)
def test_known_events(major: int, info: int, expected: str) -> None:
    assert wait_event_name(major, info) == expected


@pytest.mark.parametrize("major", MAJORS)
def test_not_waiting_is_cpu(major: int) -> None:
    assert wait_event_name(major, 0) == "CPU"


@pytest.mark.parametrize("major", MAJORS)
def test_lwlock_shows_the_type_alone(major: int) -> None:
    for tranche in (0, 1, 48, 0xFFFF):
        assert wait_event_name(major, LWLOCK | tranche) == "LWLock"


@pytest.mark.parametrize("major", MAJORS)
def test_unknown_class_is_question_marks(major: int) -> None:
    for info in (0x02000000, 0x0C000000, 0xFF000001, 0x00000001):
        assert wait_event_name(major, info) == "???"
    injection = "InjectionPoint" if major >= 17 else "???"
    assert wait_event_name(major, INJECTIONPOINT | 1) == injection


@pytest.mark.parametrize("major", MAJORS)
def test_unknown_event_id_shows_the_type_alone(major: int) -> None:
    for class_id in (LOCK, ACTIVITY, CLIENT, IPC, TIMEOUT, IO):
        beyond = len(EVENTS[major][class_id])
        type_name = WAIT_EVENT_TYPES[major][class_id]
        assert wait_event_name(major, class_id | beyond) == type_name
        assert wait_event_name(major, class_id | 0xFFFF) == type_name
    # The enum classes switch on the whole value: bits 16-23 make an unknown event ...
    assert wait_event_name(major, ACTIVITY | 0x010000) == "Activity"
    # ... while Lock's event id is a uint16 (GetLockNameFromTagType).
    assert wait_event_name(major, LOCK | 0x010005) == "Lock:transactionid"


@pytest.mark.parametrize("major", (17, 18))
def test_custom_events_show_the_type_alone(major: int) -> None:
    # 17+ register custom Extension events at run time, and BufferPin is an enum.
    assert wait_event_name(major, EXTENSION | 1) == "Extension"
    assert wait_event_name(major, BUFFERPIN | 1) == "BufferPin"


def test_last_event_of_each_class_is_reachable() -> None:
    for major, classes in EVENTS.items():
        for class_id, names in classes.items():
            type_name = WAIT_EVENT_TYPES[major][class_id]
            last = len(names) - 1
            assert wait_event_name(major, class_id | last) == f"{type_name}:{names[last]}"


def test_high_bits_beyond_32_are_ignored() -> None:
    assert wait_event_name(15, (1 << 32) | TIMEOUT | 2) == "Timeout:PgSleep"


@pytest.mark.parametrize("major", (12, 19))
def test_unknown_major_is_refused(major: int) -> None:
    with pytest.raises(ValueError, match=f"PostgreSQL {major}'s wait events"):
        wait_event_name(major, TIMEOUT)

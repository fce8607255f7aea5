"""Ring-buffer record -> records.py types. Mirrors struct record_header in slow_query.h.

The layout is written once here, as (field, struct format) pairs. `layout_cflags`
hands every offset, size and enum value to the compiler, and slow_query.h asserts
each one (_Static_assert): a change on one side that the other does not follow
stops every compile with the field's name, instead of misreading records.

The kernel stamps records with bpf_ktime_get_ns() (CLOCK_MONOTONIC); records.py
speaks Unix time. The decoder converts, with the offset between the two clocks
taken once per batch (`sync_clock`): the one place a kernel time becomes wall time.
A program that reads PostgreSQL's own timestamps (backend_status) stamps its records
in Unix time already, and says so (start_clock): those pass through.
A Bind message is held here until the statement it belongs to arrives, and goes out
inside that statement's record.
"""

from __future__ import annotations

import enum
import struct
import time
from typing import NamedTuple, Optional

import msgspec

from pgslowlog.records import BackendNotice, BoundParameter, NoticeKind, RawStatement, Record
from pgslowlog.sources import DecodeError

# struct record_header; a statement's text follows it.
HEADER_LAYOUT = (
    ("start_ns", "Q"),
    ("duration_ns", "Q"),
    ("pid", "I"),
    ("query_len", "I"),
    ("query_truncated", "B"),
    ("backend_exited", "B"),
    ("kind", "B"),
    ("outcome", "B"),
    ("protocol", "B"),
    ("start_clock", "B"),
    ("reserved", "2x"),
    ("application_name", "64s"),
)
# struct bind_record after its header; then params_len bytes of the Bind message's
# parameter section.
BIND_LAYOUT = (("portal", "64s"), ("statement", "64s"), ("message_len", "I"), ("params_len", "I"))
HEADER = struct.Struct("<" + "".join(code for _, code in HEADER_LAYOUT))
BIND_NAMES = struct.Struct("<" + "".join(code for _, code in BIND_LAYOUT))
OUTCOMES = ("ok", "error", "cancelled")  # enum outcome
PROTOCOLS = (None, "simple", "extended")  # enum protocol
START_CLOCKS = ("monotonic", "unix")  # enum start_clock


class RecordKind(enum.IntEnum):
    """enum record_kind: what a record is. The notices share records.NoticeKind's values."""

    STATEMENT = 0
    BACKEND_STARTED = NoticeKind.BACKEND_STARTED.value
    BACKEND_EXITED = NoticeKind.BACKEND_EXITED.value
    BIND = 3
    FAILURE = 4  # an error or cancel on its own (REPORT_FAILURES, for `sampled`)
    # `sampled` also reads BACKEND_EXITED from its program: a proc_exit, and its code.


def _offsets(layout: tuple[tuple[str, str], ...], start: int = 0) -> dict[str, int]:
    offsets, prefix = {}, "<"
    for name, code in layout:
        offsets[name] = start + struct.calcsize(prefix)
        prefix += code
    return offsets


def layout_cflags() -> list[str]:
    """-D flags that slow_query.h checks its structs and enums against."""
    flags = [f"-DPY_RECORD_HEADER_SIZE={HEADER.size}"]
    flags += [f"-DPY_HEADER_{name}={at}" for name, at in _offsets(HEADER_LAYOUT).items()]
    flags += [f"-DPY_BIND_{name}={at}" for name, at in _offsets(BIND_LAYOUT, HEADER.size).items()]
    flags += [f"-DPY_BIND_params={HEADER.size + BIND_NAMES.size}"]
    flags += [f"-DPY_RECORD_{kind.name}={kind.value}" for kind in RecordKind]
    flags += [f"-DPY_OUTCOME_{name.upper()}={value}" for value, name in enumerate(OUTCOMES)]
    flags += [
        f"-DPY_PROTOCOL_{(name or 'unknown').upper()}={value}"
        for value, name in enumerate(PROTOCOLS)
    ]
    flags += [f"-DPY_START_CLOCK_{name.upper()}={value}" for value, name in enumerate(START_CLOCKS)]
    return flags


def realtime_offset_ns() -> int:
    """CLOCK_REALTIME - CLOCK_MONOTONIC now: what turns a kernel stamp into Unix time.
    NTP moves it, so it is taken again for every batch."""
    return time.clock_gettime_ns(time.CLOCK_REALTIME) - time.monotonic_ns()


class Failure(NamedTuple):
    """A statement failed in backend `pid` at `at_unix_ns`, or the backend exited then
    (`exited`: outcome "ok" for exit code 0, else "error"): matched by the sampled
    definition with the statement it saw running then."""

    pid: int
    at_unix_ns: int
    outcome: str  # "error" or "cancelled"; of an exit, "ok" or "error"
    exited: bool = False


class _Bind(NamedTuple):
    """A Bind message waiting for its statement (same pid, same kernel start stamp)."""

    start_ns: int  # the kernel's stamp: compared, never converted
    statement: str
    params: Optional[list[BoundParameter]]


_STATEMENT = RecordKind.STATEMENT.value  # plain ints: compared once per record
_BIND = RecordKind.BIND.value
_FAILURE = RecordKind.FAILURE.value
_EXITED = RecordKind.BACKEND_EXITED.value
_UNIX = START_CLOCKS.index("unix")
# Raw application_name field -> text. Few distinct names, one per statement: cached.
_NAMES_CACHED = 1024


class RecordDecoder:
    """The decoder of one BPF source's records, used by its collector's thread only.

    Bind messages held for statements still to come are bounded by twice the backends
    the kernel tracks (`[daemon] max_backends`): their exit notices may be lost too.
    """

    def __init__(self, max_backends: int) -> None:
        self.offset_ns = realtime_offset_ns()
        self._max_binds = 2 * max_backends
        self._binds: dict[int, _Bind] = {}  # pid -> its last Bind, oldest first
        self._names: dict[bytes, str] = {}

    def sync_clock(self) -> None:
        self.offset_ns = realtime_offset_ns()

    def decode(self, record: bytes) -> Record | None:
        """The statement or notice; None for a Bind, which its statement carries."""
        if len(record) < HEADER.size:
            raise DecodeError(f"record of {len(record)} bytes is shorter than the header")
        (
            start_ns,
            duration_ns,
            pid,
            query_len,
            truncated,
            exited,
            kind,
            outcome,
            protocol,
            clock,
            name,
        ) = HEADER.unpack_from(record)
        if kind != _STATEMENT:
            if kind == _BIND:
                self._hold_bind(record, pid, start_ns)
                return None
            try:
                notice = BackendNotice(NoticeKind(kind), pid)
            except ValueError:
                raise DecodeError(f"unknown record kind {kind}") from None
            if kind == _EXITED:
                self._binds.pop(pid, None)  # a Bind whose statement never came
            return notice
        text = record[HEADER.size : HEADER.size + query_len]
        if len(text) != query_len:
            raise DecodeError(f"record announces {query_len} bytes of text but has {len(text)}")
        if outcome >= len(OUTCOMES) or protocol >= len(PROTOCOLS) or clock >= len(START_CLOCKS):
            raise DecodeError(f"unknown outcome {outcome}, protocol {protocol} or clock {clock}")
        try:
            query = text.decode()
        except UnicodeDecodeError:
            query = decode_text(text, bool(truncated))
        application_name = self._names.get(name)
        if application_name is None:
            if len(self._names) >= _NAMES_CACHED:
                self._names.clear()
            application_name = self._names[name] = _name(name)
        statement = RawStatement(
            start_ns if clock == _UNIX else start_ns + self.offset_ns,
            duration_ns,
            pid,
            query,
            bool(truncated),
            bool(exited),
            OUTCOMES[outcome],
            PROTOCOLS[protocol],
            application_name,
        )
        bind = self._binds.pop(pid, None) if self._binds else None
        if bind is None or bind.start_ns != start_ns:
            return statement  # none, or left over from a statement whose record was lost
        return msgspec.structs.replace(statement, statement_name=bind.statement, params=bind.params)

    def _hold_bind(self, record: bytes, pid: int, start_ns: int) -> None:
        if len(record) < HEADER.size + BIND_NAMES.size:
            raise DecodeError("bind record shorter than its names")
        _portal, statement, _message_len, params_len = BIND_NAMES.unpack_from(record, HEADER.size)
        section = record[HEADER.size + BIND_NAMES.size :]
        if len(section) != params_len:
            raise DecodeError(f"bind record announces {params_len} bytes but has {len(section)}")
        params = parse_bind_parameters(section) if params_len else None
        self._binds.pop(pid, None)  # the newest goes last: the oldest is evicted first
        self._binds[pid] = _Bind(start_ns, _name(statement), params)
        if len(self._binds) > self._max_binds:
            del self._binds[next(iter(self._binds))]

    def failure(self, record: bytes) -> Failure:
        """A failure or exit record of sampled's outcome program."""
        if len(record) < HEADER.size:
            raise DecodeError(f"record of {len(record)} bytes is shorter than the header")
        at_ns, _, pid, _, _, _, kind, outcome, *_ = HEADER.unpack_from(record)
        exited = kind == _EXITED
        if not (exited or kind == _FAILURE) or outcome >= len(OUTCOMES):
            raise DecodeError(f"record kind {kind} (outcome {outcome}) is not a failure")
        return Failure(pid, at_ns + self.offset_ns, OUTCOMES[outcome], exited)


def decode_text(text: bytes, truncated: bool) -> str:
    """UTF-8 text; a character cut in half by truncation is dropped, not mangled."""
    try:
        return text.decode()
    except UnicodeDecodeError as error:
        if truncated and error.start >= len(text) - 3 and error.reason == "unexpected end of data":
            return text[: error.start].decode(errors="replace")
        return text.decode(errors="replace")


def _name(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def parse_bind_parameters(section: bytes) -> list[BoundParameter]:
    """The parameter values of a Bind message body, from just after the two names.

    Int16 count and codes of the formats, Int16 count of the values, then each as
    Int32 length (-1: NULL) and bytes; network byte order. A copy cut short gives
    what it holds, the value it ended in marked `cut`.
    """
    position = 0

    def take(size: int) -> bytes | None:
        nonlocal position
        if position + size > len(section):
            return None
        chunk = section[position : position + size]
        position += size
        return chunk

    head = take(2)
    if head is None:
        return []
    (format_count,) = struct.unpack(">h", head)
    format_bytes = take(2 * format_count)
    if format_bytes is None:
        return []
    formats = struct.unpack(f">{format_count}h", format_bytes)
    count_bytes = take(2)
    if count_bytes is None:
        return []
    (count,) = struct.unpack(">h", count_bytes)
    params: list[BoundParameter] = []
    for index in range(count):
        binary = bool(formats[0] if format_count == 1 else formats[index] if formats else 0)
        length_bytes = take(4)
        if length_bytes is None:
            return params
        (length,) = struct.unpack(">i", length_bytes)
        if length < 0:
            params.append(BoundParameter(None, binary, cut=False))
            continue
        value = take(length)
        if value is None:
            params.append(BoundParameter(section[position:], binary, cut=True))
            return params
        params.append(BoundParameter(value, binary, cut=False))
    return params

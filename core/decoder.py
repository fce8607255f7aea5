"""Ring-buffer record -> Python object. Mirrors struct record_header in bpf/slow_query.h.

The layout is written once here, as (field, struct format) pairs. `layout_cflags`
hands every offset, size and enum value to the compiler, and slow_query.h asserts
each one (_Static_assert): a change on one side that the other does not follow
stops every compile with the field's name, instead of misreading records.
"""

from __future__ import annotations

import enum
import struct
from typing import Optional, Union

import msgspec

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
    ("reserved", "3x"),
    ("application_name", "64s"),
)
# struct bind_record after its header; then params_len bytes of the Bind message's
# parameter section.
BIND_LAYOUT = (("portal", "64s"), ("statement", "64s"), ("message_len", "I"), ("params_len", "I"))
HEADER = struct.Struct("<" + "".join(code for _, code in HEADER_LAYOUT))
BIND_NAMES = struct.Struct("<" + "".join(code for _, code in BIND_LAYOUT))
OUTCOMES = ("ok", "error", "cancelled")  # enum outcome
PROTOCOLS = (None, "simple", "extended")  # enum protocol


class RecordKind(enum.IntEnum):
    STATEMENT = 0
    BACKEND_STARTED = 1
    BACKEND_EXITED = 2
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
    return flags


class DecodeError(ValueError):
    pass


# msgspec structs, not dataclasses: at threshold 0 one is made per statement, and a
# frozen dataclass costs several times as much to create.
class RawStatement(msgspec.Struct, frozen=True, gc=False):
    start_ns: int  # CLOCK_MONOTONIC
    duration_ns: int
    pid: int
    query: str
    query_truncated: bool
    backend_exited: bool
    outcome: str
    protocol: Optional[str]
    application_name: str
    # Known to a definition that samples PostgreSQL's bookkeeping (sampled):
    duration_exact: bool = True  # False: the end is an upper bound
    query_id: Optional[int] = None
    waits: Optional[dict[str, int]] = None  # samples per wait event type, "CPU" for none


class BackendNotice(msgspec.Struct, frozen=True, gc=False):
    kind: RecordKind  # BACKEND_STARTED or BACKEND_EXITED
    pid: int


class Failure(msgspec.Struct, frozen=True, gc=False):
    """A statement failed in backend `pid` at `at_ns` (CLOCK_MONOTONIC), or the backend
    exited then (`exited`: "ok" for exit code 0, else "error"): matched by the sampled
    definition with the statement it saw running then."""

    pid: int
    at_ns: int
    outcome: str  # "error" or "cancelled"; of an exit, "ok" or "error"
    exited: bool = False


def decode_failure(record: bytes) -> Failure:
    if len(record) < HEADER.size:
        raise DecodeError(f"record of {len(record)} bytes is shorter than the header")
    at_ns, _, pid, _, _, _, kind, outcome, *_ = HEADER.unpack_from(record)
    exited = kind == RecordKind.BACKEND_EXITED
    if not (exited or kind == RecordKind.FAILURE) or outcome >= len(OUTCOMES):
        raise DecodeError(f"record kind {kind} (outcome {outcome}) is not a failure")
    return Failure(pid, at_ns, OUTCOMES[outcome], exited)


class BoundParameter(msgspec.Struct, frozen=True, gc=False):
    value: Optional[bytes]  # None: SQL NULL
    binary: bool  # sent in binary format
    cut: bool  # the copy ended inside this value


class BindMessage(msgspec.Struct, frozen=True):
    """The Bind message of the statement that follows from the same pid."""

    pid: int
    start_ns: int
    portal: str
    statement: str
    params: Optional[list[BoundParameter]]  # None: values were not captured
    complete: bool  # every value is in `params`


# What a record decodes to, whatever its source.
# Union, not `|`: an alias is evaluated at import, and 3.9 has no `type | type`.
Record = Union[RawStatement, BackendNotice, BindMessage]

_STATEMENT = RecordKind.STATEMENT.value  # plain ints: compared once per record
_BIND = RecordKind.BIND.value
# Raw application_name field -> text. Few distinct names, one per statement: cached.
_names: dict[bytes, str] = {}
_NAMES_CACHED = 1024


def decode(record: bytes) -> Record:
    if len(record) < HEADER.size:
        raise DecodeError(f"record of {len(record)} bytes is shorter than the header")
    (start_ns, duration_ns, pid, query_len, truncated, exited, kind, outcome, protocol, name) = (
        HEADER.unpack_from(record)
    )
    if kind != _STATEMENT:
        if kind == _BIND:
            return _decode_bind(record, pid, start_ns)
        try:
            return BackendNotice(RecordKind(kind), pid)
        except ValueError:
            raise DecodeError(f"unknown record kind {kind}") from None
    text = record[HEADER.size : HEADER.size + query_len]
    if len(text) != query_len:
        raise DecodeError(f"record announces {query_len} bytes of text but has {len(text)}")
    if outcome >= len(OUTCOMES) or protocol >= len(PROTOCOLS):
        raise DecodeError(f"unknown outcome {outcome} or protocol {protocol}")
    try:
        query = text.decode()
    except UnicodeDecodeError:
        query = decode_text(text, bool(truncated))
    application_name = _names.get(name)
    if application_name is None:
        if len(_names) >= _NAMES_CACHED:
            _names.clear()
        application_name = _names[name] = _name(name)
    return RawStatement(
        start_ns,
        duration_ns,
        pid,
        query,
        bool(truncated),
        bool(exited),
        OUTCOMES[outcome],
        PROTOCOLS[protocol],
        application_name,
    )


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


def _decode_bind(record: bytes, pid: int, start_ns: int) -> BindMessage:
    if len(record) < HEADER.size + BIND_NAMES.size:
        raise DecodeError("bind record shorter than its names")
    portal, statement, _message_len, params_len = BIND_NAMES.unpack_from(record, HEADER.size)
    section = record[HEADER.size + BIND_NAMES.size :]
    if len(section) != params_len:
        raise DecodeError(f"bind record announces {params_len} bytes but has {len(section)}")
    params, complete = (None, True) if not params_len else parse_bind_parameters(section)
    return BindMessage(pid, start_ns, _name(portal), _name(statement), params, complete)


def parse_bind_parameters(section: bytes) -> tuple[list[BoundParameter], bool]:
    """The parameter values of a Bind message body, from just after the two names.

    Int16 count and codes of the formats, Int16 count of the values, then each as
    Int32 length (-1: NULL) and bytes; network byte order. A copy cut short gives
    what it holds, the last value marked cut.
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
        return [], False
    (format_count,) = struct.unpack(">h", head)
    format_bytes = take(2 * format_count)
    if format_bytes is None:
        return [], False
    formats = struct.unpack(f">{format_count}h", format_bytes)
    count_bytes = take(2)
    if count_bytes is None:
        return [], False
    (count,) = struct.unpack(">h", count_bytes)
    params = []
    for index in range(count):
        binary = bool(formats[0] if format_count == 1 else formats[index] if formats else 0)
        length_bytes = take(4)
        if length_bytes is None:
            return params, False
        (length,) = struct.unpack(">i", length_bytes)
        if length < 0:
            params.append(BoundParameter(None, binary, cut=False))
            continue
        value = take(length)
        if value is None:
            params.append(BoundParameter(section[position:], binary, cut=True))
            return params, False
        params.append(BoundParameter(value, binary, cut=False))
    return params, True

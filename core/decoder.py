"""Ring-buffer record -> Python object. Mirrors struct record_header in bpf/slow_query.h."""

from __future__ import annotations

import enum
import struct

import msgspec

# u64 start_ns, u64 duration_ns, u32 pid, u32 query_len, u8 query_truncated,
# u8 backend_exited, u8 kind, u8 outcome, u8 protocol, u8 reserved[3],
# char application_name[64]; a statement's text follows.
HEADER = struct.Struct("<QQIIBBBBB3x64s")
# struct bind_record after its header: portal[64], statement[64], u32 message_len,
# u32 params_len, then params_len bytes of the Bind message's parameter section.
BIND_NAMES = struct.Struct("<64s64sII")
OUTCOMES = ("ok", "error", "cancelled")  # enum outcome
PROTOCOLS = (None, "simple", "extended")  # enum protocol


class RecordKind(enum.IntEnum):
    STATEMENT = 0
    BACKEND_STARTED = 1
    BACKEND_EXITED = 2
    BIND = 3


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
    protocol: str | None
    application_name: str


class BackendNotice(msgspec.Struct, frozen=True, gc=False):
    kind: RecordKind  # BACKEND_STARTED or BACKEND_EXITED
    pid: int


class BoundParameter(msgspec.Struct, frozen=True, gc=False):
    value: bytes | None  # None: SQL NULL
    binary: bool  # sent in binary format
    cut: bool  # the copy ended inside this value


class BindMessage(msgspec.Struct, frozen=True):
    """The Bind message of the statement that follows from the same pid."""

    pid: int
    start_ns: int
    portal: str
    statement: str
    params: list[BoundParameter] | None  # None: values were not captured
    complete: bool  # every value is in `params`


# What a record decodes to, whatever its source.
Record = RawStatement | BackendNotice | BindMessage

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

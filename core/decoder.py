"""Ring-buffer record -> Python object. Mirrors struct record_header in bpf/slow_query.h."""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

# u64 start_ns, u64 duration_ns, u32 pid, u32 query_len, u8 query_truncated,
# u8 backend_exited, u8 kind, u8 outcome, u8 protocol, u8 reserved[3],
# char application_name[64]; a statement's text follows.
HEADER = struct.Struct("<QQIIBBBBB3x64s")
OUTCOMES = ("ok", "error", "cancelled")  # enum outcome
PROTOCOLS = (None, "simple", "extended")  # enum protocol


class RecordKind(enum.IntEnum):
    STATEMENT = 0
    BACKEND_STARTED = 1
    BACKEND_EXITED = 2


class DecodeError(ValueError):
    pass


@dataclass(slots=True, frozen=True)
class RawStatement:
    start_ns: int  # CLOCK_MONOTONIC
    duration_ns: int
    pid: int
    query: str
    query_truncated: bool
    backend_exited: bool
    outcome: str
    protocol: str | None
    application_name: str


@dataclass(slots=True, frozen=True)
class BackendNotice:
    kind: RecordKind  # BACKEND_STARTED or BACKEND_EXITED
    pid: int


def decode(record: bytes) -> RawStatement | BackendNotice:
    if len(record) < HEADER.size:
        raise DecodeError(f"record of {len(record)} bytes is shorter than the header")
    (start_ns, duration_ns, pid, query_len, truncated, exited, kind, outcome, protocol, name) = (
        HEADER.unpack_from(record)
    )
    if kind != RecordKind.STATEMENT:
        try:
            return BackendNotice(RecordKind(kind), pid)
        except ValueError:
            raise DecodeError(f"unknown record kind {kind}") from None
    text = record[HEADER.size : HEADER.size + query_len]
    if len(text) != query_len:
        raise DecodeError(f"record announces {query_len} bytes of text but has {len(text)}")
    if outcome >= len(OUTCOMES) or protocol >= len(PROTOCOLS):
        raise DecodeError(f"unknown outcome {outcome} or protocol {protocol}")
    return RawStatement(
        start_ns=start_ns,
        duration_ns=duration_ns,
        pid=pid,
        query=decode_text(text, bool(truncated)),
        query_truncated=bool(truncated),
        backend_exited=bool(exited),
        outcome=OUTCOMES[outcome],
        protocol=PROTOCOLS[protocol],
        application_name=name.split(b"\0", 1)[0].decode(errors="replace"),
    )


def decode_text(text: bytes, truncated: bool) -> str:
    """UTF-8 text; a character cut in half by truncation is dropped, not mangled."""
    try:
        return text.decode()
    except UnicodeDecodeError as error:
        if truncated and error.start >= len(text) - 3 and error.reason == "unexpected end of data":
            return text[: error.start].decode(errors="replace")
        return text.decode(errors="replace")

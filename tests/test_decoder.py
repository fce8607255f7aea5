"""The BPF decoder without root: records as the kernel writes them, decoded.

Records are packed here with the decoder's own layout (the compile checks that layout
against slow_query.h: test_loading.py); Bind messages as a client sends them.
"""

from __future__ import annotations

import struct
import time

import pytest

from pgslowlog.bpf.decoder import (
    BIND_NAMES,
    HEADER,
    START_CLOCKS,
    RecordDecoder,
    RecordKind,
    decode_text,
    parse_bind_parameters,
    realtime_offset_ns,
)
from pgslowlog.enrichment import format_parameter
from pgslowlog.records import BackendNotice, BoundParameter, NoticeKind, RawStatement
from pgslowlog.sources import DecodeError


def record(
    query: bytes = b"select 1",
    truncated: int = 0,
    kind: int = RecordKind.STATEMENT,
    pid: int = 42,
    outcome: int = 0,
    start_ns: int = 10,
    clock: int = 0,  # START_CLOCKS: the kernel's own
) -> bytes:
    header = HEADER.pack(
        start_ns, 300_000_000, pid, len(query), truncated, 0, kind, outcome, 2, clock, b"app"
    )
    return header + query


def bind_section(formats: list[int], values: list[bytes | None]) -> bytes:
    """A Bind message's body after the two names, as a client sends it."""
    body = struct.pack(">h", len(formats)) + b"".join(struct.pack(">h", f) for f in formats)
    body += struct.pack(">h", len(values))
    for value in values:
        body += struct.pack(">i", -1) if value is None else struct.pack(">i", len(value)) + value
    return body + struct.pack(">h", 0)  # no result formats


def bind(pid: int, start_ns: int, name: str = "", *values: bytes | None) -> bytes:
    section = bind_section([0], list(values)) if values else b""
    header = HEADER.pack(start_ns, 0, pid, 0, 0, 0, RecordKind.BIND, 0, 0, 0, b"")
    return header + BIND_NAMES.pack(b"portal", name.encode(), 0, len(section)) + section


def decoder(max_backends: int = 16) -> RecordDecoder:
    return RecordDecoder(max_backends)


def statement(decode: RecordDecoder, pid: int, start_ns: int) -> RawStatement:
    raw = decode.decode(record(pid=pid, start_ns=start_ns))
    assert isinstance(raw, RawStatement)
    return raw


def test_decode_statement():
    raw = decoder().decode(record(b"select 1", outcome=2))
    assert isinstance(raw, RawStatement)
    assert (raw.pid, raw.duration_ns, raw.query, raw.query_truncated) == (
        42,
        300_000_000,
        "select 1",
        False,
    )
    assert (raw.outcome, raw.protocol, raw.application_name) == ("cancelled", "extended", "app")
    assert (raw.statement_name, raw.params) == (None, None)  # no Bind came before it


def test_the_kernel_clock_becomes_unix_time_once_per_batch():
    decode = decoder()
    decode.sync_clock()
    monotonic, wall = time.monotonic_ns(), time.time_ns()
    raw = statement(decode, 42, monotonic - 2_000_000_000)
    assert abs(raw.start_unix_ns - (wall - 2_000_000_000)) < 50_000_000
    # The offset holds until the next batch: records of one batch are stamped alike.
    offset = decode.offset_ns
    assert statement(decode, 42, 5).start_unix_ns == 5 + offset
    assert abs(realtime_offset_ns() - offset) < 50_000_000


def test_a_start_already_in_unix_time_passes_through():
    """backend_status reads PostgreSQL's own timestamps: its records say so."""
    decode = decoder()
    unix = START_CLOCKS.index("unix")
    raw = decode.decode(record(start_ns=1_733_000_000_123_456_000, clock=unix))
    assert isinstance(raw, RawStatement) and raw.start_unix_ns == 1_733_000_000_123_456_000


def test_decode_backend_notice():
    exited = decoder().decode(record(b"", kind=RecordKind.BACKEND_EXITED, pid=7))
    assert exited == BackendNotice(NoticeKind.BACKEND_EXITED, 7)


@pytest.mark.parametrize(
    "broken",
    [
        b"short",
        record(b"abc")[:-1],
        record(b"", kind=9),
        record(b"", kind=RecordKind.FAILURE),  # only sampled's program sends these
        record(b"", outcome=7),
        bind(42, 10, "s", b"v")[:-1],
    ],
)
def test_decode_rejects_broken_records(broken):
    with pytest.raises(DecodeError):
        decoder().decode(broken)


def test_failures_are_decoded_with_unix_times():
    decode = decoder()
    failure = decode.failure(record(b"", kind=RecordKind.FAILURE, outcome=2, pid=9, start_ns=5))
    assert (failure.pid, failure.at_unix_ns, failure.outcome, failure.exited) == (
        9,
        5 + decode.offset_ns,
        "cancelled",
        False,
    )
    exit_record = record(b"", kind=RecordKind.BACKEND_EXITED, outcome=0, pid=9)
    assert decode.failure(exit_record).exited
    with pytest.raises(DecodeError):
        decode.failure(record(b"select 1"))


def test_truncation_drops_half_a_character():
    assert decode_text("héé".encode()[:-1], truncated=True) == "hé"
    assert decode_text(b"a\xffb", truncated=False) == "a\ufffdb"


def test_bind_parameters_text_binary_null_and_cut():
    section = bind_section([0, 1, 0], [b"0.3", b"\x3f\xd3\x33\x33\x33\x33\x33\x33", None])
    params = parse_bind_parameters(section)
    assert [format_parameter(p, 1024) for p in params] == ["0.3", "\\x3fd3333333333333", None]
    assert not any(p.cut for p in params)
    # one format code applies to every value; a value over the limit is cut like PostgreSQL's
    params = parse_bind_parameters(bind_section([0], [b"abcdef", "日本".encode()]))
    assert [format_parameter(p, 4) for p in params] == ["abcd...", "日..."]
    # a copy that ends inside the second value (5 bytes short: 2 of the trailer, 3 of it)
    params = parse_bind_parameters(bind_section([], [b"first", b"second"])[:-5])
    assert [p.cut for p in params] == [False, True]
    assert [format_parameter(p, 1024) for p in params] == ["first", "sec..."]


def test_a_bind_goes_out_with_the_statement_of_its_pid_and_start_only():
    decode = decoder()
    assert decode.decode(bind(101, 1_000, "for_101", b"a")) is None  # held, not handed on
    assert decode.decode(bind(105, 1_000, "for_105", b"b")) is None
    other, own = statement(decode, 105, 1_000), statement(decode, 101, 1_000)
    value = [BoundParameter(b"b", binary=False, cut=False)]
    assert (other.statement_name, other.params) == ("for_105", value)
    assert (own.statement_name, own.params) == ("for_101", [BoundParameter(b"a", False, False)])
    # Used once: the next statement of the same pid has no Bind of its own.
    again = statement(decode, 101, 1_000)
    assert (again.statement_name, again.params) == (None, None)
    # A Bind from an earlier statement whose record was lost pairs with nothing, and
    # is gone: the statement after it does not get it either.
    decode.decode(bind(101, 1_500, "stale", b"old"))
    later = statement(decode, 101, 2_000)
    assert later.params is None and later.statement_name is None
    # A backend that exits takes its unpaired Bind with it (its pid may come back).
    decode.decode(bind(101, 3_000, "orphan", b"x"))
    decode.decode(record(b"", kind=RecordKind.BACKEND_EXITED, pid=101))
    assert statement(decode, 101, 3_000).params is None


def test_the_unnamed_statement_and_uncaptured_values():
    decode = decoder()
    decode.decode(bind(101, 1_000, ""))  # capture_params off: names only
    raw = statement(decode, 101, 1_000)
    assert (raw.statement_name, raw.params) == ("", None)


def test_unpaired_binds_are_bounded_when_exit_notices_are_lost():
    decode = decoder(max_backends=16)  # 32 kept at most
    for pid in range(1, 33):
        decode.decode(bind(pid, pid, f"s{pid}", b"v"))
    decode.decode(bind(1, 100, "again", b"w"))  # pid 1's next Bind: now the newest
    decode.decode(bind(33, 33, "s33", b"v"))  # one too many: the oldest, pid 2's, goes
    oldest, renewed, newest = (statement(decode, *at) for at in ((2, 2), (1, 100), (33, 33)))
    assert oldest.params is None
    assert renewed.statement_name == "again" and newest.statement_name == "s33"

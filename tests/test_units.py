"""Pure logic: process titles, config defaults, plugin isolation, redaction, ring buffer."""

from __future__ import annotations

import struct

import pytest

from pgslowlog.bpf.ringbuf import BUSY_BIT, DISCARD_BIT, take_records
from pgslowlog.config import parse_config
from pgslowlog.enrichment import parse_process_title
from pgslowlog.errors import UserError
from pgslowlog.hookspecs import hookimpl
from pgslowlog.machine import check_architecture
from pgslowlog.plugin_manager import Plugins
from pgslowlog.redaction import redact_literals, redact_parameters


@pytest.mark.parametrize(
    ("title", "expected"),
    [
        ("postgres: 15/main: app shop 10.1.2.3(50312) idle", ("client", "app", "shop")),
        ("postgres: app shop [local] SELECT", ("client", "app", "shop")),
        ("postgres: 15/main: autovacuum worker shop", ("background", None, None)),
        ("postgres: 15/main: checkpointer ", ("background", None, None)),
        (
            "postgres: walsender repl 10.0.0.2(5555) streaming 0/3000148",
            ("walsender", "repl", None),
        ),
        ("postgres: parallel worker for PID 1234", ("background", None, None)),
        ("/usr/bin/python3 something", ("background", None, None)),
    ],
)
def test_parse_process_title(title, expected):
    backend = parse_process_title(title)
    assert (backend.kind, backend.user, backend.database) == expected


BASE = {"target": [{"binary": "/x/postgres"}], "sinks": {"file": {"path": "/tmp/x"}}}


def test_defaults_and_no_threshold_cap():
    config = parse_config(BASE)
    assert config.daemon.threshold_ms == 200
    assert config.daemon.query_max_bytes == 4096
    assert config.target[0].probes == ["auto"]
    big = parse_config({**BASE, "daemon": {"threshold_ms": 3_600_000}})
    assert big.threshold_ns == 3_600_000_000_000  # an hour: no 2-second cap
    most = parse_config({**BASE, "daemon": {"query_max_bytes": 16384}})
    assert most.daemon.query_max_bytes == 16384  # the limit itself is accepted


@pytest.mark.parametrize(
    ("daemon", "message"),
    [
        ({"ring_buffer_mib": 3}, "not a power of two"),
        ({"threshold_ms": -1}, "daemon.threshold_ms: expected `float` >= 0"),
        ({"log_level": "loud"}, "is not a level"),
    ],
)
def test_config_semantic_errors(daemon, message):
    with pytest.raises(UserError, match=message):
        parse_config({**BASE, "daemon": daemon})


def test_a_failing_plugin_does_not_stop_the_others():
    class Broken:
        @hookimpl
        def pgslowlog_register_sinks(self, register):
            raise RuntimeError("boom")

    class Misspelled:
        @hookimpl
        def pgslowlog_register_sinkz(self, register):
            pass

    plugins = Plugins.load()
    plugins.register(Broken(), "broken")
    plugins.register(Misspelled(), "misspelled")
    plugins.sink_types.clear()
    plugins.probe_definitions.clear()
    plugins._collect()
    assert "file" in plugins.sink_types
    shipped = {"activity", "backend_status", "extended", "sampled", "simple_query", "usdt"}
    assert shipped <= set(plugins.probe_definitions)
    assert any("broken failed in pgslowlog_register_sinks: boom" in f for f in plugins.failures)
    assert any("misspelled was rejected" in f for f in plugins.failures)


def test_every_hook_is_documented_in_the_plugin_guide():
    from pathlib import Path

    from pgslowlog import hookspecs

    guide = (Path(__file__).parent.parent / "docs" / "plugins.md").read_text()
    hooks = [name for name in dir(hookspecs) if name.startswith("pgslowlog_")]
    assert hooks
    assert [hook for hook in hooks if f"`{hook}(" not in guide] == []


def test_every_shipped_sink_is_documented():
    from pathlib import Path

    sinks_page = (Path(__file__).parent.parent / "docs" / "sinks.md").read_text()
    example = (Path(__file__).parent.parent / "etc" / "pgslowlog.toml").read_text()
    shipped = [
        name
        for name, sink in Plugins.load().sink_types.items()
        if sink.create.__module__.startswith("pgslowlog.plugins.")
    ]
    assert sorted(shipped) == ["clickhouse", "console", "file", "syslog", "webhook"]
    assert [
        n for n in shipped if f"`[sinks.{n}]`" not in sinks_page or f"[sinks.{n}]" not in example
    ] == []


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        (
            "select 'a''b', 1.5, 42 from t where c = 'x' /* keep */",
            "select $1, $2, $3 from t where c = $4 /* keep */",
        ),
        ("select $1, 'x', $$dollar$$", "select $1, $2, $3"),
        ("select E'a\\'b', U&'d\\0061', B'101', X'1f'", "select $1, $2, $3, $4"),
        ("select 1, 'cut by query_max_by", "select $1, $2"),  # the cut literal goes whole
        ("not sql at all 'x' 5", "not sql at all $1 $2"),
        ("select 'é日本', 2; select 3", "select $1, $2; select $3"),
        ("", ""),
    ],
)
def test_redact_literals(text, redacted):
    assert redact_literals(text) == redacted


def test_redact_parameters_keeps_count_and_nulls():
    assert redact_parameters(["alice", None, "\\x00ff"]) == ["<redacted>", None, "<redacted>"]
    assert redact_parameters(None) is None


def ring(size: int, records: list[tuple[int, bytes]], start: int = 0) -> tuple[bytearray, int]:
    """A ring buffer's data area as the kernel lays it out, mapped twice; records from
    `start` as (flags, payload). Returns the area and the producer position."""
    area = bytearray(size)
    position = start
    for flags, payload in records:
        header = struct.pack("<II", len(payload) | flags, 0)
        for offset, byte in enumerate(header + payload):
            area[(position + offset) % size] = byte
        position += (len(payload) + 8 + 7) & ~7
    return area + area, position


def test_ring_records_in_order_across_the_wrap_skipping_discarded():
    payloads = [
        (0, b"first"),
        (DISCARD_BIT, b"thrown away"),
        (0, b"wraps around the end"),
        (0, b"x"),
    ]
    data, producer = ring(128, payloads, start=120)  # "first" crosses the end
    records, consumer = take_records(memoryview(data), 120, producer, 127, 100)
    assert records == [b"first", b"wraps around the end", b"x"]
    assert consumer == producer


def test_ring_stops_at_a_record_still_being_written():
    data, producer = ring(256, [(0, b"done"), (BUSY_BIT, b"writing"), (0, b"after")])
    records, consumer = take_records(data, 0, producer, 255, 100)
    assert records == [b"done"]
    assert consumer == 16  # the busy record and the one after it wait for the next look
    records, consumer = take_records(data, 0, producer, 255, 1)
    assert (records, consumer) == ([b"done"], 16)


@pytest.mark.parametrize(("key", "shown"), [("\n", "'\\n'"), ("a\x1bb", "'a\\x1bb'")])
def test_an_unknown_key_with_a_control_character_is_one_quoted_line(key, shown):
    with pytest.raises(UserError) as refused:
        parse_config({**BASE, "daemon": {key: 0}})
    assert str(refused.value).startswith(f"config config: unknown key daemon.{shown}; ")
    assert "\n" not in str(refused.value) and "\x1b" not in str(refused.value)


def test_x86_64_is_the_supported_architecture():
    assert check_architecture("x86_64").ok
    refused = check_architecture("aarch64")
    assert not refused.ok and refused.text.startswith("architecture aarch64 is not supported")

"""Sinks against real receivers, fed by real PostgreSQL through real probes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from receivers import start_rsyslog

from pgslowlog.event import SlowQuery
from pgslowlog.plugins.syslog_sink import SyslogOptions, SyslogSink, fit_event

# Newlines, both quote kinds, a backslash and non-ASCII text must survive every hop.
AWKWARD = "select pg_sleep(0.25) /* {marker} \"double\" 'single' \\ é ü 日本 */\n-- second line"


@pytest.fixture(scope="module")
def rsyslog(tmp_path_factory):
    receiver = start_rsyslog(tmp_path_factory.mktemp("rsyslog"))
    yield receiver
    receiver.stop()


@pytest.mark.ebpf
@pytest.mark.parametrize("transport", ["udp", "tcp", "unix"])
def test_syslog_delivers_intact_events(pg18, start_daemon, rsyslog, transport):
    address = {
        "udp": f"udp://127.0.0.1:{rsyslog.udp_port}",
        "tcp": f"tcp://127.0.0.1:{rsyslog.tcp_port}",
        "unix": f"unix://{rsyslog.socket_path}",
    }[transport]
    marker = f"syslog-{transport}"
    daemon = start_daemon(
        pg18,
        sinks={"syslog": {"address": address, "facility": "local3", "severity": "warning"}},
    )
    query = AWKWARD.format(marker=marker)
    pg18.psql(query, check=True)
    (expected,) = daemon.wait_for_events(marker, 1)
    (message,) = rsyslog.wait_for(marker, 1)
    assert message["event"] == expected
    assert message["event"]["query"] == query
    assert (message["app"], message["msgid"]) == ("pgslowlog", "slowquery")
    assert (message["facility"], message["severity"]) == ("local3", "warning")
    assert message["procid"] == str(daemon.process.process.pid)


@pytest.mark.ebpf
def test_syslog_message_over_the_limit_arrives_whole(pg18, start_daemon, rsyslog):
    daemon = start_daemon(
        pg18,
        query_max_bytes=4096,
        sinks={
            "syslog": {
                "address": f"tcp://127.0.0.1:{rsyslog.tcp_port}",
                "max_message_bytes": 600,
            }
        },
    )
    query = "select pg_sleep(0.25) /* syslog-long " + '"é"\n' * 500 + "*/"
    pg18.psql(query, check=True)
    (full,) = daemon.wait_for_events("syslog-long", 1)
    (message,) = rsyslog.wait_for("syslog-long", 1)
    assert full["query"] == query
    assert message["event"]["query_truncated"] is True
    assert query.startswith(message["event"]["query"])
    assert len(message["event"]["query"]) > 100


def event(query: str) -> SlowQuery:
    return SlowQuery(
        ts=datetime(2026, 11, 25, tzinfo=UTC),
        duration_ms=1.5,
        query=query,
        query_truncated=False,
        pid=1,
        user="u",
        database="d",
        client="[local]",
        probe="p",
        binary="/b",
    )


@pytest.mark.parametrize("text", ["x" * 5000, '"\n' * 2000, "日本" * 2000, "\x01" * 2000])
def test_fit_event_stays_valid_json_under_the_limit(text):
    import json

    for limit in (300, 480, 1000, 4000):
        encoded = fit_event(event(text), limit)
        assert len(encoded) <= limit
        decoded = json.loads(encoded)
        assert text.startswith(decoded["query"])
        assert decoded["query_truncated"] is True


def test_syslog_header_is_rfc5424():
    sink = SyslogSink(SyslogOptions(address="udp://127.0.0.1:9", hostname="db1"))
    message = sink.format(event("select 1"), now=datetime(2026, 11, 25, 1, 2, 3, 4, tzinfo=UTC))
    header, _, body = message.partition(b" - ")
    # local0 (16) * 8 + notice (5) = 133
    assert header.decode().startswith("<133>1 2026-11-25T01:02:03.000004Z db1 pgslowlog ")
    assert header.decode().endswith(" slowquery")
    assert body.startswith(b'{"ts":"2026-11-25T00:00:00Z"')

"""Client-chosen text that could break a log line or steer a terminal reaches every sink escaped."""

from __future__ import annotations

import subprocess

import pytest
from receivers import WebhookReceiver, start_rsyslog

from pgslowlog.testing.cluster import Cluster

QUERY_MAX_BYTES = 256
# Bytes no UTF-8 database accepts (so a SQL_ASCII one), a terminal escape sequence,
# a bell, a C1 control (CSI), DEL, a bidirectional override, quotes, backslash,
# tab and newlines; longer than query_max_bytes.
HOSTILE = (
    b"select pg_sleep(0.25) /* hostile \xff\xfe \x1b[2J\x1b]0;owned\x07 \xc2\x9b31m \x7f"
    b" \xe2\x80\xae \"double\" 'single' \\ \t tab\n-- next line\n" + b"x" * 400 + b" */"
)
RAW_CONTROLS = [b"\x1b", b"\x07", b"\xc2\x9b", b"\x7f", b"\t"]
# Only the hostile statement has this; "create database hostile" can be slow too.
MARKER = "/* hostile"


def sql_ascii_database(cluster: Cluster) -> str:
    """A database that stores whatever bytes a client sends: invalid UTF-8 included."""
    exists = cluster.psql("select 1 from pg_database where datname = 'hostile'", check=True)
    if not exists.stdout.strip():
        cluster.psql(
            "create database hostile encoding 'SQL_ASCII' lc_collate 'C' lc_ctype 'C' "
            "template template0",
            check=True,
        )
    return cluster.dsn("hostile")


@pytest.mark.ebpf
def test_hostile_query_text_is_escaped_in_every_sink(pg18, start_daemon, tmp_path):
    (tmp_path / "rsyslog").mkdir()
    rsyslog = start_rsyslog(tmp_path / "rsyslog")
    webhook = WebhookReceiver()
    # Created before the daemon starts, so a slow CREATE DATABASE is not an event here.
    database = sql_ascii_database(pg18)
    try:
        daemon = start_daemon(
            pg18,
            query_max_bytes=QUERY_MAX_BYTES,
            sinks={
                "syslog": {"address": f"udp://127.0.0.1:{rsyslog.udp_port}"},
                "webhook": {"url": webhook.url, "max_delay_ms": 0},
                "console": {},
            },
        )
        script = tmp_path / "hostile.sql"
        script.write_bytes(HOSTILE + b";\n")
        subprocess.run(
            [str(pg18.bindir / "psql"), "-X", "-q", "-d", database, "-f", script],
            check=True,
            capture_output=True,
            env={"PGCLIENTENCODING": "SQL_ASCII", "PATH": "/usr/bin:/bin"},
        )
        (event,) = daemon.wait_for_events(MARKER, 1)
        # Stopped, every sink has drained: each receiver gets what its sink delivered, and
        # that is all it ever will.
        assert daemon.stop() == 0
        sinks = daemon.process.wait_for_log("stopped")["sinks"]
        pid, delivered = daemon.process.process.pid, sinks["syslog"]["delivered"]
        messages = rsyslog.wait_for_sender(pid, delivered)
        assert len(messages) == delivered, messages
        (syslogged,) = [m for m in messages if MARKER in m["event"]["query"]]
        assert len(webhook.events) == sinks["webhook"]["delivered"]
        (posted,) = [e for e in webhook.events if MARKER in e["query"]]
        # The console sink writes to the daemon's stdout, read up to the `stopped` line.
        console = [e["line"] for e in daemon.process.logs if MARKER in e.get("line", "")]
    finally:
        rsyslog.stop()
        webhook.stop()

    # Invalid bytes become U+FFFD; everything else is kept, cut at query_max_bytes.
    expected = HOSTILE[:QUERY_MAX_BYTES].decode(errors="replace")
    assert event["query"] == expected
    assert event["query_truncated"] is True
    assert syslogged["event"] == event
    assert posted == event

    # The file holds one line per event, with no raw control byte in it.
    raw_line = daemon.log.read_bytes()
    assert raw_line.count(b"\n") == 1
    for control in RAW_CONTROLS:
        assert control not in raw_line, control
    assert b"\\u001b[2J" in raw_line and b"\\u009b" in raw_line

    # The console line shows each control as an escape, on one line.
    (line,) = console
    for control in RAW_CONTROLS:
        assert control.decode(errors="replace") not in line
    assert "\\x1b[2J" in line and "\\x9b31m" in line and "\\u202e" in line
    assert "\n" not in line.rstrip("\n")

"""Sinks against real receivers, fed by real PostgreSQL through real probes."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

import psycopg
import pytest
from events import slow
from receivers import WebhookReceiver, start_rsyslog
from waiting import wait_for_count, wait_until

from pgslowlog.plugins.syslog_sink import SyslogOptions, SyslogSink, fit_event
from pgslowlog.testing.cluster import free_port

# Newlines, both quote kinds, a backslash and non-ASCII text must survive every hop.
AWKWARD = "select pg_sleep(0.25) /* {marker} \"double\" 'single' \\ é ü 日本 */\n-- second line"


@pytest.fixture(scope="module")
def rsyslog(tmp_path_factory):
    receiver = start_rsyslog(tmp_path_factory.mktemp("rsyslog"))
    yield receiver
    receiver.stop()


def delivered_to_rsyslog(daemon, rsyslog) -> list[dict]:
    """Stops the daemon (its sinks drain), then every message its syslog sink delivered,
    once rsyslogd has written them all: exactly as many as the `stopped` line counts."""
    assert daemon.stop() == 0
    delivered = daemon.process.wait_for_log("stopped")["sinks"]["syslog"]["delivered"]
    messages = rsyslog.wait_for_sender(daemon.process.process.pid, delivered)
    assert len(messages) == delivered, messages
    return messages


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
    daemon.wait_for_events(marker, 1)
    messages = delivered_to_rsyslog(daemon, rsyslog)
    (expected,) = daemon.events(marker)
    (message,) = [m for m in messages if marker in m["event"]["query"]]
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
                # The event's fields besides the text (resources, fingerprint...) take
                # about 1 KB: the text of 3 KB must be cut to fit, and keep its start.
                "max_message_bytes": 1500,
            }
        },
    )
    query = "select pg_sleep(0.25) /* syslog-long " + '"é"\n' * 500 + "*/"
    pg18.psql(query, check=True)
    daemon.wait_for_events("syslog-long", 1)
    messages = delivered_to_rsyslog(daemon, rsyslog)
    (full,) = daemon.events("syslog-long")
    (message,) = [m for m in messages if "syslog-long" in m["event"]["query"]]
    assert full["query"] == query
    assert message["event"]["query_truncated"] is True
    assert query.startswith(message["event"]["query"])
    assert len(message["event"]["query"]) > 100


def test_fit_event_leaves_out_a_plan_too_long_for_the_limit():
    # [explain]: a plan can be longer than any text; the event still arrives, whole JSON
    plan = [{"Plan": {"Node Type": "Append", "Plans": [{"Node Type": "Seq Scan"}] * 400}}]
    event = slow(query="select * from parts", plan=plan)
    assert len(event.to_json()) > 8000
    decoded = json.loads(fit_event(event, 8000))
    assert (decoded["plan"], decoded["plan_error"]) == (
        None,
        "plan left out: over max_message_bytes",
    )
    assert (decoded["query"], decoded["query_truncated"]) == ("select * from parts", False)
    small = slow(plan=[{"Plan": {"Node Type": "Result"}}], query="x" * 9000)
    kept = json.loads(fit_event(small, 8000))  # a plan that fits stays; the text is cut
    assert kept["plan"] == [{"Plan": {"Node Type": "Result"}}] and kept["query_truncated"]


@pytest.mark.parametrize("text", ["x" * 5000, '"\n' * 2000, "日本" * 2000, "\x01" * 2000])
def test_fit_event_stays_valid_json_under_the_limit(text):
    # The event with an empty text is the least any limit must leave room for.
    bare = len(slow(query="", query_truncated=True).to_json())
    for limit in (bare, bare + 1, bare + 70, 1000, 4000):
        encoded = fit_event(slow(query=text), limit)
        assert len(encoded) <= limit
        decoded = json.loads(encoded)
        assert text.startswith(decoded["query"])
        assert decoded["query_truncated"] is True


def test_syslog_header_is_rfc5424():
    sink = SyslogSink(SyslogOptions(address="udp://127.0.0.1:9", hostname="db1"))
    event = slow(query="select 1")
    message = sink.format(event, now=datetime(2026, 11, 25, 1, 2, 3, 4, tzinfo=timezone.utc))
    header, _, body = message.partition(b" - ")
    # local0 (16) * 8 + notice (5) = 133
    assert header.decode().startswith("<133>1 2026-11-25T01:02:03.000004Z db1 pgslowlog ")
    assert header.decode().endswith(" slowquery")
    assert body == event.to_json()  # the whole event, as it fits


@pytest.fixture
def webhook():
    receiver = WebhookReceiver()
    yield receiver
    receiver.stop()


def statements(marker: str, count: int, seconds: float = 0.002) -> str:
    return "; ".join(f"select pg_sleep({seconds}) /* {marker} {n} */" for n in range(count))


def delivered_to_webhook(daemon, webhook: WebhookReceiver) -> list[dict]:
    """Stops the daemon (its sinks drain), then every event its webhook sink delivered,
    once the receiver holds them all: exactly as many as the `stopped` line counts."""
    assert daemon.stop() == 0
    delivered = daemon.process.wait_for_log("stopped")["sinks"]["webhook"]["delivered"]
    received = wait_for_count(lambda: list(webhook.events), delivered, "webhook events")
    assert len(received) == delivered, received
    return received


@pytest.mark.ebpf
def test_webhook_batches_and_secret_header(pg18, start_daemon, webhook, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("Bearer from-a-file\n")
    daemon = start_daemon(
        pg18,
        threshold_ms=1,
        env={"WEBHOOK_TOKEN": "Bearer s3cret-from-env"},
        sinks={
            "webhook": {
                "url": webhook.url,
                "max_batch": 10,
                "max_delay_ms": 300,
                "headers": {"X-Source": "pgslowlog-test"},
                "headers_from_env": {"Authorization": "WEBHOOK_TOKEN"},
                "headers_from_file": {"X-Other-Token": str(token_file)},
            }
        },
    )
    with psycopg.connect(pg18.dsn(), autocommit=True) as connection:
        for n in range(25):
            connection.execute(f"select pg_sleep(0.002) /* hook-batch {n} */")
    daemon.wait_for_events("hook-batch", 25)
    webhook.wait_for("hook-batch", 25)
    received = delivered_to_webhook(daemon, webhook)
    assert sorted(event["query"] for event in received if "hook-batch" in event["query"]) == sorted(
        event["query"] for event in daemon.events("hook-batch")
    )
    assert max(webhook.batches) <= 10 and len(webhook.batches) >= 3
    headers = webhook.requests[0][2]
    assert headers["Authorization"] == "Bearer s3cret-from-env"
    assert headers["X-Other-Token"] == "Bearer from-a-file"
    assert headers["X-Source"] == "pgslowlog-test"
    assert headers["Content-Type"] == "application/json"
    everything_logged = json.dumps(daemon.process.logs) + daemon.process.stderr
    assert "s3cret" not in everything_logged and "from-a-file" not in everything_logged


@pytest.mark.ebpf
def test_webhook_retries_through_500_429_and_a_hang(pg18, start_daemon, webhook):
    webhook.faults = ["500", "429", "hang"]
    daemon = start_daemon(
        pg18,
        sinks={
            "webhook": {
                "url": webhook.url,
                "max_delay_ms": 0,
                "timeout_s": 1.0,
                "backoff_initial_s": 0.2,
            }
        },
    )
    pg18.psql("select pg_sleep(0.25) /* hook-fault */", check=True)
    webhook.wait_for("hook-fault", 1)
    # Stopped, so no retry is left to come: what arrived is all that ever will, once.
    received = delivered_to_webhook(daemon, webhook)
    assert [event["query"] for event in received] == ["select pg_sleep(0.25) /* hook-fault */"]
    answers = [answer for _, answer, _ in webhook.requests]
    assert answers == ["500", "429", "hang", "200"]
    after_429 = webhook.requests[2][0] - webhook.requests[1][0]
    assert after_429 >= 1.0  # Retry-After: 1 was honoured
    stats = daemon.process.wait_for_log("stopped")["sinks"]["webhook"]
    assert stats["delivered"] == 1 and stats["retried"] == 3 and stats["failed"] == 0
    retries = [entry for entry in daemon.process.logs if entry["event"] == "webhook_retry"]
    assert [entry["reason"] for entry in retries] == ["HTTP 500", "HTTP 429", "ReadTimeout"]


@pytest.mark.ebpf
def test_webhook_down_for_good_loses_nothing_elsewhere(pg18, start_daemon):
    dead_url = f"http://127.0.0.1:{free_port()}/nobody"
    daemon = start_daemon(
        pg18,
        threshold_ms=1,
        sinks={
            "webhook": {
                "url": dead_url,
                "queue_size": 5,
                "shutdown_timeout_s": 1,
                "max_attempts": 3,
                "backoff_initial_s": 0.1,
                "max_delay_ms": 0,
            }
        },
    )
    with psycopg.connect(pg18.dsn(), autocommit=True) as connection:
        for n in range(40):
            connection.execute(f"select pg_sleep(0.002) /* hook-dead {n} */")
    assert len(daemon.wait_for_events("hook-dead", 40)) == 40
    assert daemon.stop() == 0
    stopped = daemon.process.wait_for_log("stopped")["sinks"]
    total = sum(stopped["file"].values()) - stopped["file"]["delivered"]
    assert stopped["file"]["delivered"] >= 40 and total == 0
    webhook_stats = stopped["webhook"]
    assert webhook_stats["delivered"] == 0
    # every event the webhook got is accounted for: failed after retries, or dropped
    assert webhook_stats["failed"] + webhook_stats["dropped"] == stopped["file"]["delivered"]
    assert webhook_stats["dropped"] > 0


def health_line_where(daemon, condition, what: str, timeout: float = 10) -> dict:
    """The first health line for which `condition` holds; AssertionError naming `what`
    and the last health line if none does in time."""

    def health_lines() -> list[dict]:
        return [entry for entry in list(daemon.process.logs) if entry.get("event") == "health"]

    try:
        return wait_until(
            lambda: next((line for line in health_lines() if condition(line)), None), timeout, what
        )
    except AssertionError as error:
        raise AssertionError(f"{error}; the last health line: {health_lines()[-1:]}") from None


@pytest.mark.ebpf
def test_sigterm_is_bounded_when_a_sink_hangs_and_others_lose_nothing(pg18, start_daemon):
    hanging = WebhookReceiver(hang_s=60)
    hanging.faults = ["hang"] * 100
    try:
        daemon = start_daemon(
            pg18,
            threshold_ms=1,
            stats_interval_s=1,
            sinks={
                "webhook": {
                    "url": hanging.url,
                    "timeout_s": 30,
                    "max_batch": 5,
                    "max_delay_ms": 0,
                    "shutdown_timeout_s": 1,
                }
            },
        )
        with psycopg.connect(pg18.dsn(), autocommit=True) as connection:
            for n in range(20):
                connection.execute(f"select pg_sleep(0.002) /* hung sink {n} */")
        assert len(daemon.wait_for_events("hung sink", 20)) == 20
        # The file holds all 20, so a health line soon says the file sink delivered them,
        # while the hung sink has delivered nothing.
        health = health_line_where(
            daemon,
            lambda h: h["sinks"]["file"]["delivered"] >= 20,
            "a health line with 20 events delivered to the file",
        )
        assert set(health["sinks"]) == {"file", "webhook"}
        assert health["sinks"]["file"]["dropped"] == health["sinks"]["file"]["failed"] == 0
        assert health["sinks"]["webhook"]["delivered"] == 0
        started = time.monotonic()
        assert daemon.stop() == 0
        assert time.monotonic() - started < 8  # 1 s budget + 1 s grace, not the 30 s timeout
    finally:
        hanging.stop()
    stopped_line = daemon.process.wait_for_log("stopped")
    # The per-target half of the health line: probes on, every statement counted.
    assert set(health["targets"]) == set(stopped_line["targets"]) == {"target0"}
    assert health["targets"]["target0"]["probes_attached"] >= 1
    assert health["targets"]["target0"]["attachments"] >= 1
    target = stopped_line["targets"]["target0"]  # the totals, counted after detaching
    assert target["slow_events"] >= 20 and target["statements"] >= target["slow_events"]
    assert target["lost"] == target["untracked"] == 0
    stopped = stopped_line["sinks"]
    assert (
        stopped["file"]["delivered"]
        == stopped["webhook"]["dropped"]
        + stopped["webhook"]["failed"]
        + stopped["webhook"]["delivered"]
    )
    assert stopped["webhook"]["delivered"] == 0
    assert any(e["event"] == "sink_stuck_at_shutdown" for e in daemon.process.logs)


@pytest.mark.ebpf
def test_tls_verification_off_is_warned_about(pg18, start_daemon):
    daemon = start_daemon(
        pg18, sinks={"webhook": {"url": "https://127.0.0.1:9/x", "verify_tls": False}}
    )
    warning = daemon.process.wait_for_log("webhook_tls_verification_off", timeout=5)
    assert warning["level"] == "warning"
    assert daemon.stop() == 0


def test_the_console_says_why_in_one_line_and_nothing_when_it_cannot():
    from pgslowlog.plugins.console_sink import format_line

    holder = {
        "pid": 4243,
        "level": 1,
        "blocks": 4242,
        "state": "idle in transaction",
        "query": "UPDATE accounts SET balance = balance - 100 WHERE id = 7 AND branch = 3",
        "xact_age_s": 41.2,
        "lock": {"type": "transactionid", "mode": "ExclusiveLock", "granted": True},
        "waiting": False,
    }
    event = slow(
        duration_ms=42_000.0,
        waits={"Lock:transactionid": 92, "CPU": 8},
        blocked_by=[holder, {**holder, "pid": 4244, "state": "active"}],
        resources={"cpu_ms": 3.4, "shared_blks_hit": 1200, "shared_blks_read": 0},
        resources_exact=False,
    )
    first, why = format_line(event).split("\n")
    assert "pid 4242" in first and "select pg_sleep(0.3)" in first
    assert why.strip() == (
        "why: waited 92% Lock:transactionid, blocked by pid 4243 (idle in transaction 41 s:"
        " UPDATE accounts SET balance = balance - …) and 1 more; CPU 3 ms, 1,200 blocks hit"
    )
    # A prepared transaction has no backend, and a trapped statement tells nothing.
    gone = {"state": None, "query": None, "xact_age_s": None}  # as describe() says it
    prepared = slow(blocked_by=[{**holder, "pid": 0, **gone}])
    assert format_line(prepared).split("\n")[1].strip() == (
        "why: blocked by a prepared transaction"
    )
    assert "\n" not in format_line(slow())

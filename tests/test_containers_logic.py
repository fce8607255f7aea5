"""Pure logic of containers: names from cgroup paths, the config's refusals, and the
builds pgslowlog refuses (musl, another architecture), on copies of a real binary."""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from waiting import wait_until

from pgslowlog.config import parse_config
from pgslowlog.containers import (
    INITIAL_PID_NAMESPACE_INODE,
    PidNamespace,
    container_from_cgroups,
    container_hostname,
    inner_pid,
    namespace_pids,
    own_pid_namespace,
    pid_namespace,
)
from pgslowlog.elf import inspect_binary
from pgslowlog.errors import UserError
from pgslowlog.machine import check_pid_namespace

ID = "4f1c2d3e" * 8
UID = "8a2b0c1d-3e4f-4a5b-9c6d-7e8f9a0b1c2d"
NAMESPACE = PidNamespace(4, 4026532840)


@pytest.mark.parametrize(
    ("paths", "name", "pod"),
    [
        # Docker with systemd's cgroup driver (v2), and with cgroupfs (v1 lines)
        ([f"/system.slice/docker-{ID}.scope"], f"docker://{ID}", None),
        ([f"/docker/{ID}", f"/docker/{ID}", "/"], f"docker://{ID}", None),
        # Podman, rootful (v2) and with a nested container cgroup, and cgroupfs
        ([f"/machine.slice/libpod-{ID}.scope"], f"podman://{ID}", None),
        ([f"/machine.slice/libpod-{ID}.scope/container"], f"podman://{ID}", None),
        ([f"/libpod_parent/libpod-{ID}"], f"podman://{ID}", None),
        # Kubernetes: containerd and CRI-O with systemd's driver, and cgroupfs's layout
        (
            [
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"
                f"{UID.replace('-', '_')}.slice/cri-containerd-{ID}.scope"
            ],
            f"containerd://{ID}",
            UID,
        ),
        (
            [f"/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/crio-{ID}.scope"],
            f"cri-o://{ID}",
            UID,
        ),
        ([f"/kubepods/burstable/pod{UID}/{ID}"], f"cri://{ID}", UID),
        # kind (Kubernetes in Docker), cgroup v1: the innermost is the pod's container
        (
            [f"/docker/{'a' * 64}/kubepods/besteffort/pod{UID}/{ID}"],
            f"cri://{ID}",
            UID,
        ),
        # systemd-nspawn's machine, its "-" escaped as systemd writes unit names
        ([r"/machine.slice/machine-pg\x2dnspawn.scope/payload"], "machine://pg-nspawn", None),
        # no runtime says: the pid namespace names it
        (["/user.slice/user-0.slice/session-3.scope"], "pidns://4026532840", None),
        ([], "pidns://4026532840", None),
    ],
)
def test_container_names_come_from_the_runtimes_cgroup_paths(paths, name, pod):
    container = container_from_cgroups(paths, NAMESPACE)
    assert (container.name, container.pod_uid) == (name, pod)


def test_a_process_of_ours_is_in_our_namespace_with_one_pid():
    assert pid_namespace(os.getpid()) == own_pid_namespace()
    assert namespace_pids(os.getpid()) == [os.getpid()]
    assert inner_pid(os.getpid()) == os.getpid()
    assert pid_namespace(2**22 + 1) is None and inner_pid(2**22 + 1) is None  # no such pid


BASE = {"sinks": {"file": {"path": "/tmp/x"}}}


def test_containers_with_pid_is_refused_in_one_line():
    with pytest.raises(UserError) as raised:
        parse_config({**BASE, "target": [{"containers": True, "pid": 4242}]})
    message = str(raised.value)
    assert "target[0] has containers = true and pid = 4242" in message
    assert "remove pid" in message and "\n" not in message


def test_containers_takes_no_binary_or_an_absolute_one_inside():
    parse_config({**BASE, "target": [{"containers": True}]})
    inner = "/usr/lib/postgresql/17/bin/postgres"
    config = parse_config({**BASE, "target": [{"containers": True, "binary": inner}]})
    assert config.target[0].binary == inner
    with pytest.raises(UserError, match="is not an absolute path"):
        parse_config({**BASE, "target": [{"containers": True, "binary": "bin/postgres"}]})


def _patched_copy(tmp_path: Path, patch: Callable[[bytearray], None]) -> Path:
    """A copy of a real PostgreSQL binary with one thing changed in its ELF headers."""
    original = Path("/usr/lib/postgresql/15/bin/postgres")
    if not original.exists():
        original = next(
            Path("/var/cache/pgslowlog/trees").glob("*/usr/lib/postgresql/*/bin/postgres")
        )
    copy = tmp_path / "postgres"
    shutil.copyfile(original, copy)
    data = bytearray(copy.read_bytes())
    patch(data)
    copy.write_bytes(bytes(data))
    return copy


@pytest.mark.system  # Debian's PostgreSQL 15 (or a tree's), as .ci/bootstrap installs it
def test_a_musl_build_is_refused_until_its_layouts_are_known(tmp_path):
    def musl_interpreter(data: bytearray) -> None:
        old = b"/lib64/ld-linux-x86-64.so.2\0"
        at = data.index(old)
        new = b"/lib/ld-musl-x86_64.so.1\0"
        data[at : at + len(old)] = new.ljust(len(old), b"\0")

    with pytest.raises(UserError) as raised:
        inspect_binary(str(_patched_copy(tmp_path, musl_interpreter)), frozenset())
    assert "built against musl (an Alpine image)" in str(raised.value)
    assert "Debian-based build" in str(raised.value)


@pytest.mark.system
def test_a_build_for_another_architecture_is_refused(tmp_path):
    def aarch64(data: bytearray) -> None:
        struct.pack_into("<H", data, 18, 183)  # e_machine: EM_AARCH64

    with pytest.raises(UserError) as raised:
        inspect_binary(str(_patched_copy(tmp_path, aarch64)), frozenset())
    assert "is built for AARCH64, not for this x86_64 host" in str(raised.value)


@pytest.mark.ebpf  # root: a process chrooted into a tree of the test's making
def test_a_containers_hostname_is_read_inside_its_own_root(tmp_path):
    """A tenant's /etc/hostname may be a symlink to a host file, or a FIFO: it is read
    as the container itself would resolve it, and only if it is a regular file."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (tmp_path / "secret").write_text("host secret\n")
    child = os.fork()
    if child == 0:  # the "container": its root is `root`
        try:
            os.chroot(root)
            os.chdir("/")
            time.sleep(60)
        finally:
            os._exit(0)
    try:
        wait_until(lambda: os.readlink(f"/proc/{child}/root") == str(root), 5, "the chroot")
        hostname = root / "etc" / "hostname"
        hostname.write_text("db-1\n")
        assert container_hostname(child) == "db-1"
        hostname.unlink()
        hostname.symlink_to(tmp_path / "secret")  # absolute: the host's path
        assert container_hostname(child) is None
        hostname.unlink()
        hostname.symlink_to("../../../secret")  # ".." stops at the container's root
        assert container_hostname(child) is None
        hostname.unlink()
        os.mkfifo(hostname)  # would block a plain open
        assert container_hostname(child) is None
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_the_host_pid_namespace_is_checked_by_its_inode():
    host = check_pid_namespace(INITIAL_PID_NAMESPACE_INODE)
    assert host.ok and not host.warning
    own = check_pid_namespace(4026532840)  # a sidecar's: traces its namespace's servers
    assert own.ok and own.warning and "hostPID: true" in str(own)


@pytest.mark.ebpf  # root: unshare
def test_containers_need_the_host_pid_namespace(tmp_path):
    """As a container without --pid=host would run it: it cannot see other containers."""
    config = tmp_path / "pgslowlog.toml"
    config.write_text('[[target]]\ncontainers = true\n[sinks.file]\npath = "/tmp/x.jsonl"\n')
    config.chmod(0o600)
    command = [sys.executable, "-m", "pgslowlog", "check", "-c", str(config)]
    result = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", *command],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "warning: runs in a pid namespace of its own" in result.stdout
    (error,) = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert "target[0] has containers = true but the daemon runs in a pid namespace" in error

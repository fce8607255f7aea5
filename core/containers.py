"""Where a process runs: its pid namespace, its pid there, and the container around it.

PostgreSQL in a container reports the pids of its own pid namespace (pg_stat_activity,
its log, PGPROC and PgBackendStatus), while /proc, process_vm_readv and the kernel's
tgid speak in the host's. /proc/PID/status lists a process's pid in every namespace
from the reader's down to its own (NSpid): the last one is PostgreSQL's.

Which container a process is in is the runtime's business, written into the cgroup
path it makes for it (cgroup v1 and v2 alike): Docker's `docker-<id>.scope` or
`/docker/<id>`, Podman's `libpod-<id>`, containerd's and CRI-O's under kubepods with
the pod's uid, systemd-nspawn's `machine-<name>.scope`. Where none says, the pid
namespace's inode names it. All of it is read from /proc: never setns, which the unit
forbids.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import stat
from dataclasses import dataclass

HOSTNAME_MAX_BYTES = 256


@dataclass(frozen=True)
class PidNamespace:
    """A pid namespace, as bpf_get_ns_current_pid_tgid() names one: nsfs device and inode."""

    device: int
    inode: int


def pid_namespace(pid: int | str) -> PidNamespace | None:
    """The pid namespace of `pid` ("self": the daemon's); None if it is gone or unreadable."""
    try:
        status = os.stat(f"/proc/{pid}/ns/pid")
    except OSError:
        return None
    return PidNamespace(status.st_dev, status.st_ino)


@functools.lru_cache(maxsize=1)
def own_pid_namespace() -> PidNamespace:
    namespace = pid_namespace("self")
    assert namespace is not None  # /proc/self always answers
    return namespace


# The inode of the initial pid namespace (include/linux/proc_ns.h, PROC_PID_INIT_INO).
INITIAL_PID_NAMESPACE_INODE = 0xEFFFFFFC


def in_initial_pid_namespace() -> bool:
    """Whether the daemon's pids are the kernel's (a host, hostPID: true, --pid=host),
    not those of a namespace of its own (a sidecar, a container sharing its server's)."""
    return own_pid_namespace().inode == INITIAL_PID_NAMESPACE_INODE


def namespace_pids(pid: int) -> list[int] | None:
    """The NSpid line: the pid as seen from here first, PostgreSQL's own last."""
    try:
        with open(f"/proc/{pid}/status", "rb") as file:
            for line in file:
                if line.startswith(b"NSpid:"):
                    return [int(word) for word in line.split()[1:]]
    except (OSError, ValueError):
        return None
    return None


def inner_pid(pid: int) -> int | None:
    """`pid` (a pid here) as its own pid namespace knows it; None if it is gone."""
    pids = namespace_pids(pid)
    return pids[-1] if pids else None


@dataclass(frozen=True)
class Container:
    """A container as its runtime names it: `runtime://id` (or machine://name for
    systemd-nspawn, pidns://inode where no runtime's cgroup says), and the pod's uid
    under Kubernetes."""

    name: str
    pod_uid: str | None = None


_HEX_ID = r"(?P<id>[0-9a-f]{64})"
# (pattern on one cgroup path, runtime); the first that matches any line wins.
_RUNTIMES = (
    (re.compile(rf"(?:^|/)cri-containerd-{_HEX_ID}\.scope(?:/|$)"), "containerd"),
    (re.compile(rf"(?:^|/)crio-{_HEX_ID}\.scope(?:/|$)"), "cri-o"),
    (re.compile(rf"(?:^|/)docker-{_HEX_ID}\.scope(?:/|$)"), "docker"),
    (re.compile(rf"(?:^|/)libpod-{_HEX_ID}\.scope(?:/|$)"), "podman"),
    (re.compile(rf"(?:^|/)libpod-{_HEX_ID}(?:/|$)"), "podman"),
    (re.compile(rf"(?:^|/)docker/{_HEX_ID}(?:/|$)"), "docker"),
    # kubepods with the cgroupfs driver, /kubepods/<qos>/pod<uid>/<id>: which runtime
    # made it, the path does not say.
    (re.compile(rf"(?:^|/)kubepods/(?:[a-z]+/)?pod[0-9a-f-]{{36}}/{_HEX_ID}(?:/|$)"), "cri"),
)
_UUID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
_POD_UID = re.compile(rf"pod(?P<uid>{_UUID})")
_MACHINE = re.compile(r"(?:^|/)machine-(?P<name>[^/]+)\.scope(?:/|$)")


def container_of(pid: int, namespace: PidNamespace | None = None) -> Container:
    """The container `pid` runs in, from its cgroup paths (v1 and v2 lines alike)."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8", errors="replace") as file:
            paths = [line.rstrip("\n").split(":", 2)[-1] for line in file]
    except OSError:
        paths = []
    return container_from_cgroups(paths, namespace or pid_namespace(pid))


def container_from_cgroups(paths: list[str], namespace: PidNamespace | None) -> Container:
    """The innermost runtime's name that a cgroup path carries: in a node of kind or
    docker-in-docker, /docker/<node>/kubepods/.../<id> is the pod's container."""
    found: tuple[int, str, str] | None = None  # (where in the path, runtime, id)
    for path in paths:
        for pattern, runtime in _RUNTIMES:
            for match in pattern.finditer(path):
                if found is None or match.start("id") > found[0]:
                    found = (match.start("id"), runtime, match["id"])
    if found is not None:
        pod = next((m for p in paths if "kubepods" in p and (m := _POD_UID.search(p))), None)
        return Container(f"{found[1]}://{found[2]}", pod["uid"].replace("_", "-") if pod else None)
    for path in paths:
        if machine := _MACHINE.search(path):
            return Container(f"machine://{_systemd_unescape(machine['name'])}")
    inode = namespace.inode if namespace is not None else "unknown"
    return Container(f"pidns://{inode}")


def _systemd_unescape(name: str) -> str:
    """systemd writes "-" in a unit name as \\x2d (machine-pg\\x2dtest.scope)."""
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m[1], 16)), name)


def container_hostname(pid: int) -> str | None:
    """The container's /etc/hostname, as runtimes write it, read through its root
    (/proc/PID/root: no setns). None where there is none or it cannot be read."""
    fd = open_in_root(pid, "etc/hostname")
    if fd is None:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None  # a FIFO or a device the tenant put there
        raw = os.read(fd, HOSTNAME_MAX_BYTES)
    except OSError:
        return None
    finally:
        os.close(fd)
    name = raw.split(b"\n", 1)[0].strip().decode(errors="replace")
    return name or None


# openat2(2), Linux 5.6: the same number on x86_64 and aarch64.
_SYS_OPENAT2 = 437
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def open_in_root(pid: int, path: str) -> int | None:
    """A read-only fd of `path` as the process itself would resolve it: its root is the
    root, so an absolute symlink or ".." in a container's files never reaches the
    host's (a plain open through /proc/PID/root would follow them here). Non-blocking:
    a FIFO cannot stall the daemon. None if it cannot be opened."""
    try:
        root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        how = _OpenHow(
            os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
            0,
            _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS,
        )
        fd = _libc().syscall(
            _SYS_OPENAT2, root, path.encode(), ctypes.byref(how), ctypes.sizeof(how)
        )
    finally:
        os.close(root)
    return int(fd) if fd >= 0 else None


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


@dataclass(frozen=True)
class ContainerServer:
    """A postmaster found in a container: what its instance is made from."""

    host_pid: int  # the postmaster, as pid here
    namespace: PidNamespace
    container: Container
    hostname: str | None
    exe: str  # its binary's path inside the container

    @property
    def name(self) -> str:
        return self.container.name

"""Containerised PostgreSQL servers, made the way container runtimes make them.

The daemon must find and trace servers that run in containers, seen from the host: a
postmaster that is PID 1 of its own pid namespace, whose binary lies on an overlay, in a
cgroup whose path names the runtime and the container. So each server here gets what a
runtime gives it, for real: an overlay root over a Debian tree (the tree is the lower
layer and is never written), new pid/mount/net/ipc/uts namespaces, a pivot_root into the
overlay, its own /etc/hostname and UTS hostname, and a cgroup named as Docker, Podman,
Kubernetes (containerd, systemd driver) or systemd-nspawn would name it, joined before
postgres execs so every backend inherits it.

The host reaches each server through the unix socket in the container's /tmp (unix
sockets cross network namespaces), with the host's own psql.

Everything made is recorded in the container's directory under /var/tmp (named
pgslowlog-container-*, with the owner: the test session's mark, PGSLOWLOG_TEST_SESSION,
or this process), so leftover_containers() can name what a crashed run left behind
without touching other sessions' containers. Needs root.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import ClassVar

from leaks import mark_alive, marked_pids, run_mark, running

from pgslowlog.testing.cluster import INITDB_OPTIONS

CGROUPS = Path("/sys/fs/cgroup")
PORT = 5432
DATA_INSIDE = "/var/lib/postgresql/data"
SOCKET_DIR_INSIDE = "/tmp"
HOST_PSQL = "/usr/bin/psql"
HOST_PG_ISREADY = "/usr/bin/pg_isready"
PREFIX = "pgslowlog-container-"
# Every container process carries these in its environment: leftover_containers() finds
# a postmaster by them even after its records are gone.
ID_VARIABLE = "PGSLOWLOG_CONTAINER"
OWNER_VARIABLE = "PGSLOWLOG_CONTAINER_OWNER"
SESSION_VARIABLE = "PGSLOWLOG_TEST_SESSION"  # tests/leaks.py's mark, passed through
NSPAWN_RUN = Path("/run/systemd/nspawn")
# Not the memory hierarchy: this machine's own processes live in a memory cgroup of the
# machinery that runs it, and a container moved out of it would escape that limit.
SKIPPED_V1_CONTROLLERS = frozenset({"memory"})
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
KILL_TIMEOUT_S = 10.0
ENVIRONMENT_INSIDE = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/var/lib/postgresql",
}

# Run by the host's sh as PID 1 of the new namespaces, before any of the tree's code: the
# mounts a runtime makes (proc of the new pid namespace, sysfs, a /dev of its own), the
# UTS hostname, loopback up, then pivot_root into the overlay and detach the host's tree
# (so no host mount, another container's overlay included, stays reachable), then exec
# the command as the tree's postgres: exec keeps the pid, so postgres is PID 1.
# After pivot_root only the tree's own binaries run (umount, rmdir, chroot).
INIT_SCRIPT = r"""
set -eu
root=$1 name=$2 uid=$3 gid=$4
shift 4
mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$root/sys"
mount -t tmpfs -o nosuid,mode=755,size=65536k tmpfs "$root/dev"
mknod -m 666 "$root/dev/null" c 1 3
mknod -m 666 "$root/dev/zero" c 1 5
mknod -m 666 "$root/dev/full" c 1 7
mknod -m 666 "$root/dev/random" c 1 8
mknod -m 666 "$root/dev/urandom" c 1 9
mknod -m 666 "$root/dev/tty" c 5 0
mkdir -m 1777 "$root/dev/shm"
mount -t tmpfs -o nosuid,nodev,noexec,mode=1777,size=65536k shm "$root/dev/shm"
mkdir -m 755 "$root/dev/pts"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
ln -s /proc/self/fd "$root/dev/fd"
ln -s /proc/self/fd/0 "$root/dev/stdin"
ln -s /proc/self/fd/1 "$root/dev/stdout"
ln -s /proc/self/fd/2 "$root/dev/stderr"
hostname "$name"
ip link set lo up
mkdir "$root/dev/.oldroot"
cd "$root"
pivot_root . dev/.oldroot
cd /
umount -l /dev/.oldroot
rmdir /dev/.oldroot
exec chroot --userspec="$uid:$gid" / "$@"
"""

# Run by the host's sh on the host: join the cgroups (given before "--"), then exec the
# runtime. Everything it starts, postgres and every backend, inherits them.
JOIN_SCRIPT = r"""
while [ "$1" != -- ]; do
    echo $$ > "$1" || exit 125
    shift
done
shift
exec "$@"
"""


def joined(cgroups: list[Path], command: list[str]) -> list[str]:
    """`command`, run by the host's sh once it has joined `cgroups` (JOIN_SCRIPT)."""
    procs = [str(cgroup / "cgroup.procs") for cgroup in cgroups]
    return ["/bin/sh", "-c", JOIN_SCRIPT, "join-cgroups", *procs, "--", *command]


def _owner() -> str:
    """Whose containers these are: the test session's, else this process's; a mark
    that says whether its owner still runs (leaks.mark_alive)."""
    return os.environ.get(SESSION_VARIABLE) or run_mark(os.getpid())


def _temp_parent() -> Path:
    """Where containers' directories go: /var/tmp (on disk, as a runtime's), else /tmp."""
    for candidate in (Path("/var/tmp"), Path("/tmp")):
        if candidate.is_dir() and os.access(candidate, os.W_OK):
            return candidate
    raise RuntimeError("neither /var/tmp nor /tmp is writable")


def _unescape_mount(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, file system type, super options) of this mount namespace."""
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        mounts.append((_unescape_mount(fields[4]), tail[0], tail[2] if len(tail) > 2 else ""))
    return mounts


def _is_mounted(path: Path) -> bool:
    return any(point == str(path) for point, _, _ in _mounts())


def _unified_root() -> Path:
    """The cgroup v2 hierarchy: /sys/fs/cgroup/unified on a hybrid host, else /sys/fs/cgroup."""
    for point, fstype, _ in _mounts():
        if fstype == "cgroup2" and point in (str(CGROUPS / "unified"), str(CGROUPS)):
            return Path(point)
    raise RuntimeError("no cgroup2 hierarchy mounted under /sys/fs/cgroup")


def _v1_hierarchies(only_systemd: bool = False) -> list[Path]:
    """The cgroup v1 hierarchies a cgroupfs-driven runtime makes its cgroups in."""
    found = []
    for point, fstype, options in _mounts():
        if fstype != "cgroup" or not point.startswith(f"{CGROUPS}/"):
            continue
        names = set(options.split(","))
        if only_systemd and "name=systemd" not in names:
            continue
        if not names & SKIPPED_V1_CONTROLLERS:
            found.append(Path(point))
    return sorted(found)


def nspawn_hierarchies() -> list[Path]:
    """Where systemd-nspawn --keep-unit puts its supervisor/ and payload/: the v2
    hierarchy, and on a hybrid host systemd's named v1 one, which nspawn mirrors its
    cgroups into (left at the root, it makes payload/ there)."""
    return [_unified_root(), *_v1_hierarchies(only_systemd=True)]


def _nspid(pid: int) -> list[int]:
    """The pid in each pid namespace, the host's first (empty if the process is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return []
    match = re.search(r"^NSpid:\s+(.*)$", status, re.M)
    return [int(part) for part in match.group(1).split()] if match else []


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _command_line(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip() or f"[{_comm(pid)}]"


def _cgroup_tree(directory: Path) -> list[Path]:
    """A cgroup directory and every one below it, deepest first (the order rmdir needs)."""
    if not directory.is_dir():
        return []
    below = [Path(path) for path, _, _ in os.walk(directory, topdown=False)]
    return below  # os.walk bottom-up ends with `directory` itself


def cgroup_pids(directory: Path) -> set[int]:
    pids: set[int] = set()
    for cgroup in _cgroup_tree(directory):
        with contextlib.suppress(OSError):  # removed in between
            pids.update(int(p) for p in (cgroup / "cgroup.procs").read_text().split())
    return pids


def remove_cgroup(directory: Path, timeout: float = 5.0) -> str | None:
    """Remove a cgroup directory and those below it; None, or why it could not be done.
    A cgroup whose last process has just exited stays busy until it has been reaped."""
    deadline = time.monotonic() + timeout
    for cgroup in _cgroup_tree(directory):
        while True:
            try:
                cgroup.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as error:
                if error.errno != errno.EBUSY or time.monotonic() >= deadline:
                    return f"cannot remove cgroup {cgroup}: {error.strerror}"
                time.sleep(0.05)
    return None


def _read_passwd_entry(tree: Path, user: str) -> tuple[int, int]:
    for line in (tree / "etc" / "passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user and len(fields) > 3:
            return int(fields[2]), int(fields[3])
    raise RuntimeError(f"{tree} has no {user} user: is PostgreSQL installed in it?")


def _unit_escape(name: str) -> str:
    """systemd's unit name escaping (systemd-escape): '-' separates slices, so a machine
    named pg-nspawn-test is the unit machine-pg\\x2dnspawn\\x2dtest.scope."""
    return "".join(
        c
        if c.isascii() and (c.isalnum() or c in ":_.")
        else "".join(f"\\x{b:02x}" for b in c.encode())
        for c in name
    )


# Parent cgroups (system.slice, kubepods.slice, docker, ...) made by a container of this
# process, shared by the containers under them: the last one to stop removes them.
_made_parents: set[Path] = set()


class Container:
    """One containerised PostgreSQL: overlay root over a Debian tree, postgres as PID 1 of
    new pid/mount/net/ipc/uts namespaces, in a cgroup named like a runtime's, with its own
    /etc/hostname."""

    runtimes: ClassVar[tuple[str, ...]] = ("docker", "podman", "kubernetes")

    def __init__(
        self,
        tree: Path,
        major: int,
        *,
        runtime: str = "docker",
        hostname: str | None = None,
        cgroup_version: int = 2,
        container_id: str | None = None,
    ) -> None:
        if runtime not in self.runtimes:
            raise ValueError(f"runtime {runtime!r}: one of {', '.join(self.runtimes)}")
        if cgroup_version not in (1, 2):
            raise ValueError(f"cgroup_version {cgroup_version}: 1 or 2")
        if container_id is not None and not re.fullmatch(r"[0-9a-f]{64}", container_id):
            raise ValueError(f"container_id {container_id!r}: 64 lowercase hex digits")
        self.tree = Path(tree)
        self.major = major
        self.runtime = runtime
        self.cgroup_version = cgroup_version
        self.id = container_id or secrets.token_hex(32)
        # Kubernetes names the pod's slice by its uid, dashes turned into underscores.
        self.pod_uid: str | None = str(uuid.uuid4()) if runtime == "kubernetes" else None
        self.hostname = hostname or self.id[:12]  # as Docker does
        self.binary_inside = f"/usr/lib/postgresql/{major}/bin/postgres"
        if not (self.tree / self.binary_inside.lstrip("/")).is_file():
            raise RuntimeError(f"no PostgreSQL {major} in {self.tree}: {self.binary_inside}")
        self.uid, self.gid = _read_passwd_entry(self.tree, "postgres")
        # Named by the id (no random suffix): a second container with the same id fails
        # at start, as a runtime refuses it. 16 hex keep the socket path short (108 bytes).
        self.base = _temp_parent() / f"{PREFIX}{self.id[:16]}"
        self.root = self.base / "root"
        self.host_pid = 0
        self.cgroup_dirs: list[Path] = []
        self._base_made = False
        self._leaf_paths: list[Path] = []
        self._process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.runtime} {self.hostname} pid {self.host_pid}>"

    # -- what differs between runtimes -------------------------------------------------

    def cgroup_path(self) -> str:
        """The cgroup's path below the hierarchy's root, as the runtime names it."""
        if self.runtime == "docker":
            # cgroup v2: the systemd driver's scope; v1: the cgroupfs driver's /docker/<id>.
            if self.cgroup_version == 2:
                return f"system.slice/docker-{self.id}.scope"
            return f"docker/{self.id}"
        if self.runtime == "podman":
            return f"machine.slice/libpod-{self.id}.scope"
        assert self.pod_uid is not None
        pod = self.pod_uid.replace("-", "_")
        return (
            "kubepods.slice/kubepods-besteffort.slice/"
            f"kubepods-besteffort-pod{pod}.slice/cri-containerd-{self.id}.scope"
        )

    def hierarchies(self) -> list[Path]:
        if self.cgroup_version == 2:
            return [_unified_root()]
        hierarchies = _v1_hierarchies()
        if not hierarchies:
            raise RuntimeError("cgroup_version=1 asked, but no cgroup v1 hierarchy is mounted")
        return hierarchies

    def _leaves(self) -> list[Path]:
        """Its cgroup in each hierarchy (looked up once: the mounts do not change)."""
        if not self._leaf_paths:
            self._leaf_paths = [hierarchy / self.cgroup_path() for hierarchy in self.hierarchies()]
        return self._leaf_paths

    def _runtime_command(self, argv: list[str]) -> list[str]:
        """The command that runs argv as PID 1 of the container's new namespaces."""
        namespaces = ["--pid", "--fork", "--mount", "--net", "--ipc", "--uts"]
        if self.cgroup_version == 2:
            # Docker, Podman and containerd give a container its own cgroup namespace on
            # cgroup v2 (inside, /proc/self/cgroup says 0::/); on v1 they share the host's.
            namespaces.append("--cgroup")
        return [
            "unshare",
            *namespaces,
            "--propagation",
            "private",
            "/bin/sh",
            "-c",
            INIT_SCRIPT,
            "container-init",
            str(self.root),
            self.hostname,
            str(self.uid),
            str(self.gid),
            *argv,
        ]

    def _environment(self) -> dict[str, str]:
        """The environment the runtime starts with; postgres inherits it."""
        environment = {
            **ENVIRONMENT_INSIDE,
            "HOSTNAME": self.hostname,
            ID_VARIABLE: self.id,
            OWNER_VARIABLE: _owner(),
        }
        if SESSION_VARIABLE in os.environ:
            environment[SESSION_VARIABLE] = os.environ[SESSION_VARIABLE]
        return environment

    def _runtime_environment(self) -> dict[str, str]:
        """The environment of the runtime's own process."""
        return self._environment()

    # -- life cycle ------------------------------------------------------------------

    @property
    def data_on_host(self) -> Path:
        return self.root / DATA_INSIDE.lstrip("/")

    @property
    def console_log(self) -> Path:
        """postgres's stdout and stderr (what `docker logs` shows)."""
        return self.base / "console.log"

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> Container:
        if self.running():
            return self
        try:
            self._start()
        except BaseException as error:
            self._stop_after_failure(error)
            raise
        return self

    def restart(self) -> None:
        """Like `docker restart`: a fast shutdown, then postgres again in new namespaces;
        the same id, cgroup, hostname, data and overlay. host_pid changes."""
        try:
            self._stop_server()
            self._start()
        except BaseException as error:
            self._stop_after_failure(error)
            raise

    def _start(self) -> None:
        self._set_up()
        if not (self.data_on_host / "PG_VERSION").exists():
            self._initdb()
        self._launch()

    def stop(self) -> None:
        """Stop postgres, then remove every mount, cgroup and directory made. Safe to call
        twice and after a failed start; raises naming whatever could not be removed."""
        if not self._base_made:
            return  # it never claimed its id (the first step), or all is gone already
        problems: list[str] = []
        try:
            self._stop_server()
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            problems.append(f"stopping postgres: {error}")
        problems += self._unmount()
        problems += self._remove_cgroups()
        problems += self._remove_base()
        if problems:
            raise RuntimeError(f"{self!r} not entirely removed: " + "; ".join(problems))

    def __enter__(self) -> Container:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _stop_after_failure(self, error: BaseException) -> None:
        """A failed start or restart leaves nothing behind; the start's error is the one
        raised, with the clean-up's own failure named in it."""
        try:
            self.stop()
        except Exception as cleanup_error:  # the start's error is the one to see
            raise RuntimeError(f"{error!r}; then the clean-up failed: {cleanup_error}") from error

    # -- set-up ----------------------------------------------------------------------

    def _set_up(self) -> None:
        """Idempotent: the directory, the overlay, /etc/hostname, the cgroups, the data
        directory; each made only when it is not there."""
        if not self._base_made:
            try:
                self.base.mkdir(mode=0o755)
            except FileExistsError:
                raise RuntimeError(f"{self.base} exists: a container with this id?") from None
            self._base_made = True
            # The record first: whatever follows is found by leftover_containers().
            (self.base / "owner").write_text(_owner() + "\n")
            # Its own cgroups, which a reclaim removes whole: the rest are shared parents.
            (self.base / "leaves").write_text("".join(f"{leaf}\n" for leaf in self._leaves()))
        for name in ("upper", "work", "root"):
            (self.base / name).mkdir(exist_ok=True)
        if not _is_mounted(self.root):
            options = (
                f"lowerdir={self.tree},upperdir={self.base / 'upper'},workdir={self.base / 'work'}"
            )
            _run("mount", "-t", "overlay", "overlay", "-o", options, str(self.root))
        # The container's own /etc/hostname, in the upper layer (Docker bind-mounts one).
        (self.root / "etc" / "hostname").write_text(self.hostname + "\n")
        for leaf in self._leaves():
            self._make_cgroup(leaf)
        if not self.data_on_host.exists():
            self.data_on_host.mkdir(mode=0o700, parents=True)
            os.chown(self.data_on_host, self.uid, self.gid)
            self.data_on_host.chmod(0o700)  # whatever the umask

    def _make_cgroup(self, leaf: Path) -> None:
        hierarchy = next(h for h in self.hierarchies() if h in leaf.parents)
        parts = leaf.relative_to(hierarchy).parts
        chain = [hierarchy.joinpath(*parts[:depth]) for depth in range(1, len(parts) + 1)]
        for _ in range(5):  # a parent removed in between by a container that stopped
            try:
                for directory in chain:
                    self._make_cgroup_dir(directory, leaf)
                return
            except FileNotFoundError:
                continue
        raise RuntimeError(f"cannot make cgroup {leaf}")

    def _make_cgroup_dir(self, directory: Path, leaf: Path) -> None:
        taken = RuntimeError(f"cgroup {leaf} exists: another container with this id or name?")
        if directory.is_dir():
            if directory == leaf and leaf not in self.cgroup_dirs:
                raise taken  # as a runtime refuses a second container of one name
            return
        with (self.base / "cgroups").open("a") as record:  # before mkdir: never unrecorded
            record.write(f"{directory}\n")
        try:
            directory.mkdir()
        except FileExistsError:
            if directory == leaf:
                raise taken from None
            return  # a parent another container has just made
        if directory != leaf:
            _made_parents.add(directory)
        if directory not in self.cgroup_dirs:
            self.cgroup_dirs.append(directory)
        if (directory / "cpuset.cpus").exists():
            # A new v1 cpuset has no CPUs and no memory nodes: no task can join it until
            # they are copied from the parent (what runtimes do).
            for name in ("cpuset.cpus", "cpuset.mems"):
                if not (directory / name).read_text().strip():
                    (directory / name).write_text((directory.parent / name).read_text())

    def _initdb(self) -> None:
        """initdb on first start, in the container as the entrypoint of postgres's image
        does it: as the tree's postgres, in the container's namespaces and cgroup."""
        argv = [f"/usr/lib/postgresql/{self.major}/bin/initdb", "-D", DATA_INSIDE]
        process = self._spawn([*argv, *INITDB_OPTIONS])
        try:
            status = process.wait(timeout=START_TIMEOUT_S)
        except BaseException:
            self._kill(process)
            raise
        if status != 0:
            raise RuntimeError(f"initdb in {self!r} failed ({status}):\n{self._console_tail()}")

    def _spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        """`argv` run by the runtime in the container's cgroups, its output to the console
        log; in a session of its own: a Ctrl-C reaches the caller, whose clean-up stops
        the server, rather than racing it."""
        with self.console_log.open("ab") as console:
            return subprocess.Popen(
                self._joined(self._runtime_command(argv)),
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                env=self._runtime_environment(),
                cwd="/",
                start_new_session=True,
            )

    def _joined(self, command: list[str]) -> list[str]:
        return joined(self._leaves(), command)

    def _launch(self) -> None:
        argv = [
            self.binary_inside,
            "-D",
            DATA_INSIDE,
            "-c",
            f"port={PORT}",
            # Its own network namespace: its own loopback, no clash with the host's ports.
            "-c",
            "listen_addresses=localhost",
            # Debian's build defaults to /var/run/postgresql.
            "-c",
            f"unix_socket_directories={SOCKET_DIR_INSIDE}",
        ]
        self._process = self._spawn(argv)
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            process = self._process
            if process is None or process.poll() is not None:
                status = None if process is None else process.returncode
                raise RuntimeError(
                    f"postgres in {self!r} exited ({status}) while starting:\n"
                    + self._console_tail()
                )
            ready = subprocess.run(
                [HOST_PG_ISREADY, "-q", "-h", str(self.socket_dir), "-p", str(PORT), "-t", "2"],
                check=False,
                stdin=subprocess.DEVNULL,
            )
            if ready.returncode == 0 and (pid := self._find_postmaster()):
                self.host_pid = pid
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"postgres in {self!r} not ready in {START_TIMEOUT_S} s:\n"
                    + self._console_tail()
                )
            time.sleep(0.1)

    def _console_tail(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no console log)"

    def _pids(self) -> set[int]:
        """Every process in the container's cgroups (all hierarchies hold the same)."""
        pids: set[int] = set()
        for directory in self._leaves_present():
            pids |= cgroup_pids(directory)
        return pids

    def _leaves_present(self) -> list[Path]:
        """Its cgroups that are there: only those it made itself (never another
        container's of the same name, which a failed start must leave alone)."""
        return [leaf for leaf in self._leaf_paths if leaf in self.cgroup_dirs and leaf.is_dir()]

    def _find_postmaster(self) -> int | None:
        """The postmaster's host pid: the process of the cgroup that is postgres and has,
        in its own pid namespace, the pid postmaster.pid names (1)."""
        try:
            inside = int((self.data_on_host / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        for pid in sorted(self._pids()):
            nspid = _nspid(pid)
            if len(nspid) > 1 and nspid[-1] == inside and _comm(pid) == "postgres":
                return pid
        return None

    @property
    def socket_dir(self) -> Path:
        return self.root / SOCKET_DIR_INSIDE.lstrip("/")

    # -- use -------------------------------------------------------------------------

    def psql(self, *sql: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        """The host's psql through the container's unix socket; each statement its own -c."""
        command = [
            HOST_PSQL,
            "-X",
            "-qAt",
            "-d",
            f"host={self.socket_dir} port={PORT} user=postgres dbname=postgres",
        ]
        for statement in sql:
            command += ["-c", statement]
        return subprocess.run(
            command, capture_output=True, text=True, check=check, stdin=subprocess.DEVNULL
        )

    def backend_pid_inside(self) -> int:
        """pg_backend_pid() of a new connection: the backend's pid in the container."""
        return int(self.psql("SELECT pg_backend_pid()", check=True).stdout.strip())

    # -- tear-down -------------------------------------------------------------------

    def _stop_server(self) -> None:
        """Fast shutdown (SIGINT to the postmaster); after a timeout, SIGKILL to every
        process of the cgroup. Also sweeps the cgroup when no server was started."""
        process = self._process
        if process is not None and process.poll() is None:
            pid = self.host_pid or self._find_postmaster()
            if pid:
                # PID 1 of a pid namespace takes a signal from the host only if it handles
                # it: the postmaster does SIGINT (fast shutdown).
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=STOP_TIMEOUT_S)
        self._kill(process)
        self._process = None
        self.host_pid = 0

    def _kill(self, process: subprocess.Popen[bytes] | None) -> None:
        """SIGKILL, in an order that leaves no zombie: first the container's PID 1, so the
        kernel kills the rest of its pid namespace and the runtime (unshare, nspawn) reaps
        it and exits by itself (nspawn removing its lock file); then whatever is left in
        the cgroup, the runtime included. Nothing to do when all has exited."""
        for pid in self._pids():
            if _nspid(pid)[1:] and _nspid(pid)[-1] == 1:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=KILL_TIMEOUT_S)
        self._kill_cgroups()
        if process is not None:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=KILL_TIMEOUT_S)

    def _kill_cgroups(self) -> None:
        """SIGKILL every process left in the container's cgroups, until none is left."""
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while pids := {pid for pid in self._pids() if running(pid)}:
            for leaf in self._leaves_present():
                kill = leaf / "cgroup.kill"  # cgroup v2: the whole subtree, atomically
                if kill.exists():
                    with contextlib.suppress(OSError):
                        kill.write_text("1")
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() >= deadline:
                raise RuntimeError(f"processes of {self!r} still there after SIGKILL: {pids}")
            time.sleep(0.05)

    def _unmount(self) -> list[str]:
        if not _is_mounted(self.root):
            return []
        for _ in range(20):  # a process that has just exited may still hold it
            if subprocess.run(["umount", str(self.root)], capture_output=True).returncode == 0:
                return []
            time.sleep(0.1)
        # Something on the host still holds it (a shell's cwd): detach it all the same.
        result = subprocess.run(["umount", "--lazy", str(self.root)], capture_output=True)
        if result.returncode != 0 or _is_mounted(self.root):
            return [f"cannot unmount {self.root}: {result.stderr.decode(errors='replace')}"]
        return []

    def _remove_cgroups(self) -> list[str]:
        problems = []
        for leaf in self._leaves_present():
            if (problem := remove_cgroup(leaf)) is not None:
                problems.append(problem)
                continue
            # Then the parents this process made, once no other container is under them.
            for parent in leaf.parents:
                if parent not in _made_parents:
                    break
                try:
                    parent.rmdir()
                except FileNotFoundError:
                    pass
                except OSError:
                    break  # still in use by another container: its stop removes it
                _made_parents.discard(parent)
        # Whatever else it recorded (a parent made by it whose other user has gone).
        for directory in reversed(self.cgroup_dirs):
            if directory.is_dir() and not any(p.is_dir() for p in directory.iterdir()):
                with contextlib.suppress(OSError):
                    directory.rmdir()
                    _made_parents.discard(directory)
        return problems

    def _remove_base(self) -> list[str]:
        if not self.base.exists() or not self._base_made:
            return []
        if _is_mounted(self.root):
            return [f"{self.base} kept: its overlay is still mounted"]
        leaves = self._leaves_present()
        if leaves:
            return [f"{self.base} kept: cgroups {leaves} are still there"]
        _rmtree(self.base)
        if self.base.exists():
            return [f"cannot remove {self.base}"]
        self._base_made = False
        return []


class NspawnContainer(Container):
    """The same server started by systemd-nspawn with a machine name (nspawn runs postgres
    directly, no boot): cgroup machine.slice/machine-<name>.scope.

    postgres is nspawn's payload and PID 1 of the container (no --as-pid2: nspawn runs a
    command as PID 1 when asked neither -b nor --as-pid2). The scope's name is systemd's
    escaped unit name, as machined makes it: '-' in the machine name becomes \\x2d.
    nspawn itself splits the scope into supervisor/ (nspawn) and payload/ (postgres).
    """

    runtimes: ClassVar[tuple[str, ...]] = ("systemd-nspawn",)

    def __init__(
        self, tree: Path, major: int, *, machine: str, hostname: str | None = None
    ) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", machine):
            raise ValueError(f"machine name {machine!r}: not one systemd-nspawn takes")
        self.machine = machine
        self._nspawn_files: list[Path] = []
        # nspawn's default UTS hostname is the machine name.
        super().__init__(tree, major, runtime="systemd-nspawn", hostname=hostname or machine)

    def cgroup_path(self) -> str:
        return f"machine.slice/machine-{_unit_escape(self.machine)}.scope"

    def hierarchies(self) -> list[Path]:
        return nspawn_hierarchies()

    def _runtime_command(self, argv: list[str]) -> list[str]:
        # nspawn locks the directory with a file named by its device and inode; a killed
        # nspawn leaves it behind, and its propagation directory (see _stop_server).
        root = os.stat(self.root)
        self._nspawn_files = [
            NSPAWN_RUN / "locks" / f"inode-{root.st_dev}:{root.st_ino}",
            NSPAWN_RUN / "propagate" / self.machine,
        ]
        # Recorded too: reclaim_dead_sessions() removes them after a killed run.
        (self.base / "nspawn-files").write_text("".join(f"{p}\n" for p in self._nspawn_files))
        setenv = [f"--setenv={key}={value}" for key, value in self._environment().items()]
        return [
            "systemd-nspawn",
            # PID 1 here is not systemd: no machined to register with, no unit to make.
            "--register=no",
            "--keep-unit",
            "--quiet",
            "--directory",
            str(self.root),
            f"--machine={self.machine}",
            f"--hostname={self.hostname}",
            "--private-network",
            "--user=postgres",
            "--chdir=/",
            # The host's journal, resolv.conf and timezone stay out of it.
            "--link-journal=no",
            "--resolv-conf=off",
            "--timezone=off",
            "--console=pipe",
            *setenv,
            "--",
            *argv,
        ]

    def _runtime_environment(self) -> dict[str, str]:
        # nspawn mounts a tmpfs on /tmp, unless told not to: the socket must be in the
        # overlay's /tmp, where the host finds it. (A --bind of <root>/tmp would not do:
        # nspawn resolves it after its tmpfs is there, and binds the tmpfs onto itself.)
        return {**self._environment(), "SYSTEMD_NSPAWN_TMPFS_TMP": "0"}

    def _launch(self) -> None:
        super()._launch()
        for leaf in self._leaves_present():
            for directory in reversed(_cgroup_tree(leaf)[:-1]):
                if directory not in self.cgroup_dirs:
                    self.cgroup_dirs.append(directory)

    def _stop_server(self) -> None:
        super()._stop_server()
        # Every process of the cgroup, nspawn included, is gone: what a killed nspawn
        # left of its own is stale.
        for path in self._nspawn_files:
            with contextlib.suppress(OSError):
                if path.is_dir():
                    path.rmdir()
                else:
                    path.unlink()

    def _remove_cgroups(self) -> list[str]:
        # nspawn made supervisor/ and payload/ below the scope: name them as made too.
        for leaf in self._leaves_present():
            for directory in reversed(_cgroup_tree(leaf)[:-1]):
                if directory not in self.cgroup_dirs:
                    self.cgroup_dirs.append(directory)
        return super()._remove_cgroups()


def _run(*command: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr}")


def _rmtree(path: Path) -> None:
    """rm -rf that never crosses into a mount (a still-mounted overlay's lower layer is
    the shared tree: never delete through it)."""
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


def leftover_containers() -> list[str]:
    """What this module made for this session (or process) and is still there: container
    directories, overlay mounts, cgroup directories, processes. Empty when all is gone."""
    owner = _owner()
    left: list[str] = []
    mounted = {point for point, fstype, _ in _mounts() if fstype == "overlay"}
    recorded: set[Path] = set()
    for parent in (Path("/var/tmp"), Path("/tmp")):
        for base in sorted(parent.glob(f"{PREFIX}*")):
            try:
                base_owner = (base / "owner").read_text().strip()
            except OSError:
                base_owner = owner  # made, not yet recorded: count it as ours
            if base_owner != owner:
                continue  # another session's
            left.append(f"container directory {base}")
            if str(base / "root") in mounted:
                left.append(f"overlay mounted at {base / 'root'}")
            with contextlib.suppress(OSError):
                recorded |= {Path(line) for line in (base / "cgroups").read_text().split()}
    for point in sorted(mounted):
        if PREFIX in point and not Path(point).parent.exists():
            left.append(f"overlay mounted at {point}")
    for directory in sorted(recorded | _made_parents):
        # A shared parent with another session's container under it is not a leftover.
        if directory.is_dir() and (
            directory not in _made_parents or not any(p.is_dir() for p in directory.iterdir())
        ):
            pids = sorted(cgroup_pids(directory))
            left.append(f"cgroup {directory}" + (f" with processes {pids}" if pids else ""))
    for pid in marked_pids(f"{OWNER_VARIABLE}={owner}".encode()):
        command = " ".join(_command_line(pid).split())  # the init script: one line
        left.append(f"process {pid} ({command[:160]})")
    return left


def _trusted(path: Path) -> bool:
    """Records that root acts on must be root's: /var/tmp is anyone's to write in."""
    try:
        found = path.lstat()
    except OSError:
        return False
    return found.st_uid == 0 and not path.is_symlink()


def _harness_cgroup(path: Path, hierarchies: list[Path]) -> bool:
    """A path below a mounted cgroup hierarchy (never one itself, never elsewhere)."""
    resolved = path.resolve()
    return resolved == path and any(h in resolved.parents for h in hierarchies)


NSPAWN_FILE = re.compile(
    rf"{re.escape(str(NSPAWN_RUN))}/(locks/inode-\d+:\d+|propagate/[A-Za-z0-9][A-Za-z0-9_.-]*)"
)


def reclaim_dead_sessions() -> list[str]:
    """Remove what runs that were killed (SIGKILL, a machine restarted) left: their
    processes, overlays, cgroups, nspawn's lock and propagation files and directories,
    as a runtime cleans up dead containers when it starts again. A container named as a
    dead one (pg-nspawn) could not start otherwise. Only root's records of containers
    whose owner no longer runs; returns one line for each, saying what was removed or
    could not be."""
    reclaimed = []
    parents: set[Path] = set()  # made by one dead container, shared by others
    for parent in (Path("/var/tmp"), Path("/tmp")):
        for base in sorted(parent.glob(f"{PREFIX}*")):
            records = [base / name for name in ("owner", "cgroups", "leaves", "nspawn-files")]
            if not _trusted(base) or not all(_trusted(r) or not r.exists() for r in records):
                continue
            try:
                owner = (base / "owner").read_text().strip()
            except FileNotFoundError:
                owner = ""
            except OSError:
                continue
            if not owner:
                # Killed between its mkdir and its record (nothing else made yet), or
                # being made right now (for microseconds, not a minute).
                if time.time() - base.lstat().st_mtime > 60:
                    _rmtree(base)
                    reclaimed.append(f"{base}, with no owner recorded: removed")
                continue
            if mark_alive(owner):
                continue
            problems = _reclaim(base, owner, parents)
            reclaimed.append(
                f"{base} of session {owner}, which no longer runs: "
                + ("; ".join(problems) if problems else "removed")
            )
    for directory in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):  # not empty: a live container is under it
            directory.rmdir()
    return reclaimed


def _recorded(base: Path, name: str) -> list[Path]:
    try:
        return [Path(line) for line in (base / name).read_text().split()]
    except OSError:
        return []


def _reclaim(base: Path, owner: str, parents: set[Path]) -> list[str]:
    hierarchies = [Path(point) for point, fstype, _ in _mounts() if fstype.startswith("cgroup")]
    made = set(_recorded(base, "cgroups"))  # not a leaf it found taken and never made
    leaves = [p for p in _recorded(base, "leaves") if p in made and _harness_cgroup(p, hierarchies)]
    # Its processes: they carry its mark (the runtime, postgres; a backend's title
    # overwrites its environment, but it exits when its postmaster dies).
    # Not whatever is in a cgroup of its name: a live container of that name may be.
    mark = f"{OWNER_VARIABLE}={owner}".encode()
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while True:
        pids = marked_pids(mark)
        if not pids or time.monotonic() >= deadline:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    problems = [f"processes {pids} would not die"] if pids else []
    root = base / "root"
    if _is_mounted(root):
        if subprocess.run(["umount", "--lazy", str(root)], capture_output=True).returncode:
            problems.append(f"cannot unmount {root}")
    # Its own cgroups with what is below them (nspawn's supervisor/ and payload/); the
    # parents it made go last, each only if empty: another container may be under it.
    for leaf in leaves:
        if remaining := cgroup_pids(leaf):  # not its own: a live container of its name
            problems.append(f"cgroup {leaf} kept: processes {sorted(remaining)} in it")
        elif (problem := remove_cgroup(leaf, timeout=KILL_TIMEOUT_S)) is not None:
            problems.append(problem)
    parents.update(p for p in made if p not in leaves and _harness_cgroup(p, hierarchies))
    # nspawn's files, unless a live container of that machine name uses them now.
    live = any(leaf.is_dir() for leaf in leaves)
    for path in _recorded(base, "nspawn-files"):
        if NSPAWN_FILE.fullmatch(str(path)) and not live:
            with contextlib.suppress(OSError):
                path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
    if not problems:
        _rmtree(base)
        if base.exists():
            problems.append(f"cannot remove {base}")
    return problems


# -- self-check: python tests/containers.py (as root) -----------------------------------


def _dev_ino(path: str | Path) -> str:
    try:
        found = os.stat(path)
    except OSError as error:
        return f"absent ({error.strerror})"
    return f"({found.st_dev}, {found.st_ino})"


def _describe(container: Container) -> None:
    pid = container.host_pid
    answer = container.psql("SELECT pg_backend_pid(), current_setting('port')", check=True)
    status = Path(f"/proc/{pid}/status").read_text()
    nspid = next(line for line in status.splitlines() if line.startswith("NSpid:"))
    binary = container.binary_inside
    link = os.readlink(f"/proc/{pid}/exe")
    exe, tree_file = _dev_ino(f"/proc/{pid}/exe"), _dev_ino(container.tree / binary.lstrip("/"))
    print(f"== {container!r} id {container.id[:16]}... pod_uid {container.pod_uid}")
    print(f"   psql: {answer.stdout.strip()}   (pg_backend_pid() inside | port)")
    print(f"   host_pid {pid}; {nspid.replace(chr(9), ' ')}")
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        print(f"   /proc/{pid}/cgroup: {line}")
    print(f"   {container.root}/etc/hostname: {(container.root / 'etc/hostname').read_text()!r}")
    print(f"   readlink /proc/{pid}/exe: {link}")
    print(f"   (dev, ino): exe {exe}; tree's file {tree_file}; equal: {exe == tree_file}")
    print(f"     <root>{binary} {_dev_ino(container.root / binary.lstrip('/'))}")
    print(f"     /proc/{pid}/root{binary} {_dev_ino(f'/proc/{pid}/root{binary}')}")
    print(f"     the host's own {link} {_dev_ino(link)}")
    print(f"   processes in its cgroup: {len(container._pids())}; cgroup dirs made:")
    for directory in container.cgroup_dirs:
        print(f"     {directory}")


def _self_check() -> int:
    trees = Path(os.environ.get("PGSLOWLOG_TREES", "/var/cache/pgslowlog/trees"))
    containers: list[Container] = [
        Container(trees / "trixie", 17, runtime="docker"),
        Container(trees / "trixie", 17, runtime="docker", cgroup_version=1),
        Container(trees / "bookworm", 15, runtime="podman"),
        Container(trees / "bullseye", 13, runtime="kubernetes"),
        NspawnContainer(trees / "trixie", 17, machine="pg-nspawn-test"),
    ]
    problems: list[str] = []
    try:
        for container in containers:
            started = time.monotonic()
            container.start()
            print(f"started {container!r} in {time.monotonic() - started:.1f} s")
        for container in containers:
            _describe(container)
        for container in (containers[0], containers[-1]):
            before = container.host_pid
            container.restart()
            answer = container.psql("SELECT pg_backend_pid()", check=True).stdout.strip()
            print(
                f"restarted {container.hostname}: host_pid {before} -> {container.host_pid}, "
                f"{_nspid(container.host_pid)} NSpid; a new backend's pid inside: {answer}"
            )
    finally:
        for container in containers:
            try:
                container.stop()
                container.stop()  # twice: safe
            except Exception as error:
                problems.append(str(error))
    left = leftover_containers()
    print(f"stop problems: {problems}")
    print(f"leftover_containers(): {left}")
    return 1 if problems or left else 0


if __name__ == "__main__":
    sys.exit(_self_check())

"""A throwaway PostgreSQL cluster from any bin directory: for the demo and the tests.

PostgreSQL refuses to run as root, so as root the server runs as an unprivileged
OS user. Data, socket and log live in one temporary directory, removed on stop.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

from pgslowlog.errors import UserError

# A throwaway cluster's: trust (the tests' clients), UTF-8, no fsync of a directory
# removed at the end.
INITDB_OPTIONS = ("-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """`count` ports free now, none twice (free_port alone may hand out one twice)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def ensure_os_user(preferred: str = "postgres", fallback: str = "pgslowlog-demo") -> str:
    for name in (preferred, fallback):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", fallback],
        check=True,
    )
    return fallback


def make_traversable(path: Path) -> None:
    """The server user must reach the binaries: add o+x to parents that lack it (no read)."""
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            os.chmod(directory, mode | stat.S_IXOTH)


class Cluster:
    def __init__(
        self,
        bindir: Path,
        os_user: str | None = None,
        port: int | None = None,
        max_connections: int = 120,
        workdir: Path | None = None,
    ) -> None:
        self.bindir = Path(bindir)
        self.postgres = self.bindir / "postgres"
        if not self.postgres.exists():
            raise UserError(f"no postgres binary in {self.bindir}", "install PostgreSQL there")
        self.os_user = os_user or (ensure_os_user() if os.geteuid() == 0 else None)
        self.port = port or free_port()
        self.base = Path(tempfile.mkdtemp(prefix="pgslowlog-cluster-", dir=workdir))
        self.client_bindir = self.bindir  # where psql comes from
        self.data = self.base / "data"
        self.logfile = self.base / "server.log"
        self.max_connections = max_connections

    def _run(self, *command: str) -> None:
        prefix = ["runuser", "-u", self.os_user, "--"] if self.os_user else []
        result = subprocess.run(
            [*prefix, *command], capture_output=True, text=True, cwd=self.base, check=False
        )
        if result.returncode != 0:
            log = self.logfile.read_text() if self.logfile.exists() else ""
            raise RuntimeError(
                f"{' '.join(command)} failed ({result.returncode}): {result.stderr}{log[-2000:]}"
            )

    def start(self) -> Cluster:
        if self.os_user:
            make_traversable(self.bindir)
            shutil.chown(self.base, self.os_user)
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), *INITDB_OPTIONS)
        self._pg_ctl("start")
        return self

    def _pg_ctl(self, action: str) -> None:
        options = (
            f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 "
            f"-c max_connections={self.max_connections} -c fsync=off"
        )
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.logfile),
            "-o",
            options,
            "-w",
            action,
        )

    def restart(self) -> None:
        """pg_ctl restart: a clean shutdown, then a new postmaster and new backends."""
        self._pg_ctl("restart")

    def crash_and_start(self) -> None:
        """SIGKILL the postmaster, as the OOM killer would, then start it again."""
        pid = self.postmaster_pid
        os.kill(pid, signal.SIGKILL)
        while Path(f"/proc/{pid}").exists():
            time.sleep(0.05)
        # Orphaned backends keep the old shared memory until they notice the postmaster
        # is gone, and a new postmaster refuses to start while they do: try again.
        for attempt in range(40):
            try:
                self._pg_ctl("start")
                return
            except RuntimeError:
                if attempt == 39:
                    raise
                time.sleep(0.5)

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.base, ignore_errors=True)

    @property
    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def dsn(self, dbname: str = "postgres", user: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user={user} dbname={dbname}"

    def psql(
        self, *sql: str, check: bool = False, dsn: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run statements with psql (simple protocol), each its own -c."""
        command = [str(self.client_bindir / "psql"), "-X", "-qAt", "-d", dsn or self.dsn()]
        for statement in sql:
            command += ["-c", statement]
        return subprocess.run(command, capture_output=True, text=True, check=check)

    def psql_replication(self, sql: str) -> subprocess.CompletedProcess[str]:
        """Run SQL on a logical-replication walsender connection: a non-client backend."""
        return self.psql(sql, dsn=self.dsn() + " replication=database")


class ChrootCluster(Cluster):
    """A Debian tree's own PostgreSQL, started in a chroot of that tree.

    That is how a release's packaged server runs on a host of another release: with
    the tree's libraries. The server gets a mount namespace of its own (so the /dev and
    /proc it needs are mounted for it alone, never on the shared tree) and the tree as
    its root. Seen from the host, `postgres` is the binary's path in the tree, which is
    what a `binary =` target names; its data lives in the tree's /tmp.
    """

    def __init__(self, tree: Path, major: int, port: int | None = None) -> None:
        self.tree = Path(tree)
        # The tree's postgres user (its package made it), read before anything is made.
        entries = (self.tree / "etc" / "passwd").read_text().splitlines()
        entry = next((line.split(":") for line in entries if line.startswith("postgres:")), None)
        if entry is None:
            raise RuntimeError(f"{self.tree} has no postgres user: is PostgreSQL installed?")
        self.uid, self.gid = int(entry[2]), int(entry[3])
        super().__init__(
            self.tree / "usr" / "lib" / "postgresql" / str(major) / "bin",
            port=port,
            workdir=self.tree / "tmp",
        )
        self.os_user = None  # not the host's user: the tree's own postgres runs it (_run)
        # psql over TCP from the host's own client: any major talks to any server.
        self.client_bindir = Path(shutil.which("psql") or "/usr/bin/psql").parent

    def _run(self, *command: str) -> None:
        inside = [part.replace(f"{self.tree}/", "/") for part in command]
        tree = str(self.tree)
        script = (
            f'mount --rbind /dev "{tree}/dev" && mount -t proc proc "{tree}/proc" && '
            f'exec chroot --userspec={self.uid}:{self.gid} "{tree}" "$@"'
        )
        result = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *inside],
            capture_output=True,
            text=True,
            cwd="/",
            env={
                "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG": "C.UTF-8",
                # The test session's mark (tests/leaks.py): a server left running is found.
                **{k: v for k, v in os.environ.items() if k == "PGSLOWLOG_TEST_SESSION"},
            },
            check=False,
        )
        if result.returncode != 0:
            log = self.logfile.read_text() if self.logfile.exists() else ""
            raise RuntimeError(
                f"{' '.join(command)} failed ({result.returncode}): {result.stderr}{log[-2000:]}"
            )

    def start(self) -> ChrootCluster:
        os.chown(self.base, self.uid, self.gid)
        try:
            super().start()
        except BaseException:
            # pg_ctl -w may give up on a server that then runs on: stop it, then clean.
            with contextlib.suppress(RuntimeError):
                self.stop()
            shutil.rmtree(self.base, ignore_errors=True)
            raise
        return self

"""The daemon on each Debian release's own python3 and bcc, against that release's PostgreSQL.

bcc is installed only for the system interpreter (python3-bpfcc), so pgslowlog must
run on whatever python3 and bcc a release ships: Debian 11 has Python 3.9 with bcc
0.18 (no task-local storage in bcc: the BPF program falls back to hash maps),
Debian 13 has Python 3.13 with bcc 0.31. Debian 12 (3.11, bcc 0.26) is this host
and the rest of the suite. Each release runs in a chroot on a throwaway overlay of
its cached tree (.ci/build-debian-tree): that tree's python3 makes a venv with
--system-site-packages, the wheel built here is installed in it, that tree's
PostgreSQL runs as user postgres, and the daemon, started once per probe
definition the binary supports, must log a slow statement and a cancelled one with
the right outcome, user and database, then stop on SIGTERM with no traceback.
Nothing is written to the cached trees: the overlay's upper layer is removed after.
The dependencies come from PyPI (pip runs in the chroot, with the host's CAs), so
the network is needed, as for .ci/bootstrap. About 90 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fleet import DEBIAN_MAJORS, FITTING, TREES
from waiting import wait_for_count, wait_until

from pgslowlog.testing.cluster import free_port

pytestmark = pytest.mark.ebpf

REPO = Path(__file__).resolve().parents[1]
# The release, its PostgreSQL major, and the definitions its stripped Debian binary
# supports (`pgslowlog probes --binary` must agree: test_probes_agree). PostgreSQL 13
# exports no MyBEEntry, so neither sampled nor backend_status; no Debian binary keeps
# the static exec_* functions, so neither simple_query nor extended.
RELEASES: dict[str, tuple[int, tuple[str, ...]]] = {
    release: (DEBIAN_MAJORS[release], tuple(sorted(FITTING[DEBIAN_MAJORS[release]])))
    for release in ("bullseye", "trixie")
}
CASES = [
    (release, definition)
    for release, (_, definitions) in RELEASES.items()
    for definition in (*definitions, "auto")
]
IN_CHROOT = "/tmp/pgslowlog-distro"  # everything this module puts in the tree
VENV_BIN = f"{IN_CHROOT}/venv/bin"
THRESHOLD_MS = 200
# pg_sleep(1) stopped by statement_timeout: 350 ms leaves sampled (threshold + 2
# sampling intervals = 220 ms) a wide margin.
STATEMENT_TIMEOUT_MS = 350
# The probes see every process of the binary's file (an overlay resolves to the
# cached tree's inode), another test's server too: ours are told by this name.
APPLICATION_NAME = "pgslowlog-distro-test"


def _run(command: list[str], timeout: float = 120, **kwargs: Any) -> str:
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
        )
    return result.stdout


def _chroot_env(**extra: str) -> dict[str, str]:
    """A clean environment for the chroot, but with this test run's mark (leaks.py),
    so the leak check still knows a server that daemonized."""
    env = {"PATH": f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}
    env.update({key: value for key, value in os.environ.items() if key == "PGSLOWLOG_TEST_SESSION"})
    env.update(extra)
    return env


@dataclass
class Distro:
    release: str
    major: int
    root: Path  # the overlay's merged view: the chroot
    port: int = 0

    @property
    def bindir(self) -> str:
        return f"/usr/lib/postgresql/{self.major}/bin"

    def host_path(self, inside: str) -> Path:
        return self.root / inside.lstrip("/")

    def run(self, *command: str, timeout: float = 120, **env: str) -> str:
        return _run(["chroot", str(self.root), *command], timeout=timeout, env=_chroot_env(**env))

    def as_postgres(self, *command: str, timeout: float = 120) -> str:
        return self.run("runuser", "-u", "postgres", "--", *command, timeout=timeout)

    def psql(self, *commands: str, user: str = "postgres", database: str = "postgres") -> None:
        args = [f"{self.bindir}/psql", "-X", "-q", "-h", f"{IN_CHROOT}/pg", "-p", str(self.port)]
        args += ["-U", user, "-d", database]
        for command in commands:
            args += ["-c", command]
        # No ON_ERROR_STOP: the cancelled statement's error is expected.
        subprocess.run(
            ["chroot", str(self.root), "runuser", "-u", "postgres", "--", *args],
            capture_output=True,
            timeout=60,
            check=False,
            env=_chroot_env(PGAPPNAME=APPLICATION_NAME),
        )


def _mount(*args: str) -> None:
    _run(["mount", *args])


def _mounts_under(root: Path) -> list[str]:
    """Mount points at or below `root`, deepest first (as /proc/self/mounts spells them)."""
    prefix = str(root)
    points = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        point = line.split()[1].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def _processes_in(root: Path) -> list[int]:
    """Processes whose root directory is the chroot: only what this module started."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(entry / "root") == str(root):
                    found.append(int(entry.name))
    return found


def _tear_down(work: Path, root: Path) -> None:
    # A server or daemon still running there would keep the mounts busy.
    for pid in _processes_in(root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(AssertionError):  # one still there keeps its mount: see below
        wait_until(lambda: not _processes_in(root), 10, f"no process left in {root}")
    for point in _mounts_under(root):
        if subprocess.run(["umount", point], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    if not _mounts_under(root):  # never remove through a mount into the host or the tree
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This checkout as a wheel, built once for every release."""
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(REPO)])
    (built,) = out.glob("pgslowlog-*.whl")
    return built


@contextlib.contextmanager
def _distro(release: str, wheel: Path) -> Iterator[Distro]:
    """The release's tree on an overlay, mounted as a chroot for bcc, with pgslowlog in
    a venv of its python3 and its PostgreSQL running. All undone on every path."""
    major, _ = RELEASES[release]
    tree = TREES / release
    assert (tree / ".complete").exists(), (
        f"{tree} is not built: bash .ci/build-debian-tree {release}"
    )
    # Not under pytest's basetemp: a chroot's files (owned by postgres) and mounts
    # have no place in a directory pytest may clean up on its own.
    work = Path(f"/tmp/pgslowlog-distro-{release}-{os.getpid()}")
    root = work / "root"
    distro = Distro(release, major, root)
    server_started = False
    try:
        for part in ("upper", "work", "root"):
            (work / part).mkdir(parents=True)
        _mount(
            "-t",
            "overlay",
            "overlay",
            "-o",
            f"lowerdir={tree},upperdir={work / 'upper'},workdir={work / 'work'}",
            str(root),
        )
        # Private: nothing mounted below propagates to the host's /proc, /sys or /dev.
        _mount("--make-private", str(root))
        for system in ("proc", "sys", "dev"):
            _mount("--bind", f"/{system}", str(root / system))
            _mount("--make-private", str(root / system))
        _mount("-t", "tmpfs", "-o", "mode=1777", "tmpfs", str(root / "dev/shm"))  # PostgreSQL's DSM
        # bcc compiles against /lib/modules/$(uname -r)/build: the tree's own headers
        # (the running kernel's are not packaged here; the probes read no kernel struct).
        headers = sorted((root / "usr/src").glob("linux-headers-*-amd64"))[-1].name
        modules = root / "lib/modules" / os.uname().release
        modules.mkdir(parents=True, exist_ok=True)
        (modules / "build").symlink_to(f"/usr/src/{headers}")
        (modules / "source").symlink_to(f"/usr/src/{headers.removesuffix('-amd64')}-common")
        # pip in the chroot fetches the dependencies: the host's resolver and CAs.
        shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
        inside = distro.host_path(IN_CHROOT)
        inside.mkdir()
        shutil.copy(
            os.environ.get("PIP_CERT", "/etc/ssl/certs/ca-certificates.crt"), inside / "ca.crt"
        )
        shutil.copy(wheel, inside / wheel.name)
        distro.run("/usr/bin/python3", "-m", "venv", "--system-site-packages", f"{IN_CHROOT}/venv")
        distro.run(
            f"{VENV_BIN}/pip",
            "install",
            "-q",
            f"{IN_CHROOT}/{wheel.name}",
            timeout=300,
            PIP_CERT=f"{IN_CHROOT}/ca.crt",
            PIP_DISABLE_PIP_VERSION_CHECK="1",
        )
        # The release's PostgreSQL, on a socket in the chroot only.
        pg = distro.host_path(f"{IN_CHROOT}/pg")
        pg.mkdir()
        distro.run("chown", "postgres:postgres", f"{IN_CHROOT}/pg")
        distro.as_postgres(
            f"{distro.bindir}/initdb", "-D", f"{IN_CHROOT}/pg/data", "-A", "trust", "-U", "postgres"
        )
        distro.port = free_port()
        server_started = True  # from here a stop is tried, whatever pg_ctl says
        distro.as_postgres(
            f"{distro.bindir}/pg_ctl",
            "-D",
            f"{IN_CHROOT}/pg/data",
            "-l",
            f"{IN_CHROOT}/pg/server.log",
            "-o",
            f"-p {distro.port} -k {IN_CHROOT}/pg -c listen_addresses=''",
            "-w",
            "start",
        )
        distro.psql("create role app login", "create database shop owner app")
        yield distro
    finally:
        if server_started:
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                distro.as_postgres(
                    f"{distro.bindir}/pg_ctl",
                    "-D",
                    f"{IN_CHROOT}/pg/data",
                    "-m",
                    "fast",
                    "-w",
                    "stop",
                )
        _tear_down(work, root)


class Distros:
    """Each release set up once for the whole module, on first use, torn down at its end.

    (A module-scoped fixture parametrized again by the tests would be set up anew
    for each test.) A release whose setup failed is not tried again.
    """

    def __init__(self, wheel: Path, stack: contextlib.ExitStack) -> None:
        self._wheel = wheel
        self._stack = stack
        self._ready: dict[str, Distro] = {}
        self._failed: dict[str, str] = {}

    def get(self, release: str) -> Distro:
        if release in self._failed:
            pytest.fail(f"setting up {release} failed earlier: {self._failed[release]}")
        if release not in self._ready:
            try:
                self._ready[release] = self._stack.enter_context(_distro(release, self._wheel))
            except Exception as error:
                self._failed[release] = str(error)
                raise
        return self._ready[release]


@pytest.fixture(scope="module")
def distros(wheel: Path) -> Iterator[Distros]:
    with contextlib.ExitStack() as stack:
        yield Distros(wheel, stack)


def _daemon_config(distro: Distro, definition: str) -> tuple[str, str]:
    """A config for one definition, and the sink's file, both as seen in the chroot."""
    run = f"{IN_CHROOT}/run-{definition}"
    shutil.rmtree(distro.host_path(run), ignore_errors=True)
    distro.host_path(run).mkdir()
    config = f"{run}/pgslowlog.toml"
    slow = f"{run}/slow.jsonl"
    distro.host_path(config).write_text(
        f"[daemon]\nthreshold_ms = {THRESHOLD_MS}\n\n"
        f'[[target]]\nname = "main"\nbinary = "{distro.bindir}/postgres"\n'
        f'probes = ["{definition}"]\n\n'
        f'[sinks.file]\npath = "{slow}"\n'
    )
    return config, slow


@contextlib.contextmanager
def running_daemon(distro: Distro, config: str, logs: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The daemon on the release's python3, in the chroot; killed if still running at the end."""
    with (logs / "stdout").open("wb") as out, (logs / "stderr").open("wb") as err:
        # chroot execs: this pid is the daemon itself, and SIGTERM reaches it.
        process = subprocess.Popen(
            ["chroot", str(distro.root), f"{VENV_BIN}/pgslowlog", "run", "-c", config],
            stdout=out,
            stderr=err,
            env=_chroot_env(),
        )
    try:
        wait_until(
            lambda: process.poll() is not None or b'"ready"' in (logs / "stdout").read_bytes(),
            60,
            "the daemon ready",
        )
        assert process.poll() is None, f"the daemon exited: {(logs / 'stderr').read_text()}"
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _events(distro: Distro, slow: str) -> list[dict[str, Any]]:
    """The sink's events so far."""
    path = distro.host_path(slow)
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines]


def _ours(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [event for event in events if event["application_name"] == APPLICATION_NAME]


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_probes_agree(distros: Distros, release: str) -> None:
    """`pgslowlog probes` on the release's binary offers exactly the definitions tested."""
    distro = distros.get(release)
    listing = distro.run("pgslowlog", "probes", "--binary", f"{distro.bindir}/postgres")
    offered = set(re.findall(r"^  (\w+)\s+can attach$", listing, re.MULTILINE))
    assert offered == set(RELEASES[distro.release][1]), listing


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_check_passes(distros: Distros, release: str) -> None:
    distro = distros.get(release)
    version = distro.run("python3", "-c", "import sys, bcc; print(sys.version_info[:2])")
    assert version.strip() == {"bullseye": "(3, 9)", "trixie": "(3, 13)"}[distro.release]
    config = f"{IN_CHROOT}/check.toml"
    distro.host_path(config).write_text(
        f'[[target]]\nbinary = "{distro.bindir}/postgres"\nprobes = ["activity"]\n\n'
        f'[sinks.file]\npath = "{IN_CHROOT}/check.jsonl"\n'
    )
    report = distro.run("pgslowlog", "check", "-c", config)
    assert "all checks passed" in report, report


@pytest.mark.parametrize(("release", "definition"), CASES, ids=[f"{r}-{d}" for r, d in CASES])
def test_slow_statement_logged(
    distros: Distros, release: str, definition: str, tmp_path: Path
) -> None:
    distro = distros.get(release)
    config, slow = _daemon_config(distro, definition)
    with running_daemon(distro, config, tmp_path) as daemon:
        distro.psql("select pg_sleep(0.3)", "select 1", user="app", database="shop")
        distro.psql(
            f"set statement_timeout = {STATEMENT_TIMEOUT_MS}",
            "select pg_sleep(1)",
            user="app",
            database="shop",
        )
        wait_for_count(lambda: _ours(_events(distro, slow)), 2, f"events of {APPLICATION_NAME}")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
    events = _events(distro, slow)  # drained by the stop: all there will ever be
    stderr = (tmp_path / "stderr").read_text()
    stdout = (tmp_path / "stdout").read_text()
    assert "Traceback" not in stderr + stdout, stderr
    assert '"stopped"' in stdout
    ours = _ours(events)
    assert len(ours) == 2, ours  # each once
    by_query = {event["query"]: event for event in ours}
    assert set(by_query) == {"select pg_sleep(0.3)", "select pg_sleep(1)"}, events
    slow_one, cancelled = by_query["select pg_sleep(0.3)"], by_query["select pg_sleep(1)"]
    for event in (slow_one, cancelled):
        assert (event["user"], event["database"]) == ("app", "shop"), event
        assert event["binary"] == f"{distro.bindir}/postgres"
    assert slow_one["outcome"] == "ok"
    assert 290 <= slow_one["duration_ms"] < 1000, slow_one
    assert cancelled["outcome"] == "cancelled"
    assert STATEMENT_TIMEOUT_MS - 10 <= cancelled["duration_ms"] < 1000, cancelled
    if definition != "auto":
        assert slow_one["probe"] == definition

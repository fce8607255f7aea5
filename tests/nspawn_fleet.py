"""A fleet of booted Debian hosts for the Ansible role (test_rollout, test_rollout_offline).

Debian 11, 12 and 13 trees (built once each by .ci/build-debian-tree) boot side by
side under systemd-nspawn, each on a fresh overlay of its own (the cached tree is
never written), each with its own packaged PostgreSQL (13, 15, 17). The inventory is
the example one, ansible/inventory.example.yml, with its hosts db1, db2 and db3; the
test adds only how to reach each (SSH) and a metrics port each. ansible-playbook runs
the example playbook over SSH, as on a fleet.

Two networks:
- shared: the hosts share this machine's network (so their ports differ) and reach
  Debian's mirror and the package index as this machine does;
- cut off: each host has a network namespace of its own, joined to this machine by a
  veth pair and nothing else: no route, no name server, no index, no mirror.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from containers import cgroup_pids, joined, nspawn_hierarchies, remove_cgroup
from fleet import DEBIAN_MAJORS, TREES
from leaks import running
from waiting import wait_until

from pgslowlog.testing.cluster import free_ports

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent
ANSIBLE = ROOT / "ansible"
# The example inventory's hosts, in the order of DEBIAN_MAJORS' releases.
NAMES = {"bullseye": "db1", "bookworm": "db2", "trixie": "db3"}
BOOT_TIMEOUT_S = 180
METRICS_PORT = 9863  # the example inventory's, on a host with a network of its own


@dataclass
class Host:
    name: str
    release: str
    major: int
    tree: Path
    address: str  # where this machine reaches its SSH server and metrics
    ssh_port: int
    pg_port: int
    metrics_port: int
    netns: str | None = None  # its own network namespace, when cut off
    cgroups: list[Path] = field(default_factory=list)  # its own, removed at power-off
    leader: int | None = None  # the container's PID 1, seen from here
    machine: subprocess.Popen[bytes] | None = None

    @property
    def binary(self) -> str:
        return f"/usr/lib/postgresql/{self.major}/bin/postgres"

    def run(
        self, *command: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container (all of its namespaces)."""
        return subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", *command],
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def psql(self, sql: str) -> None:
        self.run("runuser", "-u", "postgres", "--", "psql", "-p", str(self.pg_port), "-qAtc", sql)

    def events(self, log: str = "/var/log/pgslowlog/slow.jsonl") -> list[dict[str, Any]]:
        path = self.tree / log.lstrip("/")
        if not path.exists():
            return []
        text = path.read_text()
        return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]

    def journal(self) -> str:
        shown = self.run("journalctl", "-u", "pgslowlog", "--no-pager", "-n", "60", check=False)
        return f"--- {self.name}\n{shown.stdout}"

    def show(self, prop: str) -> str:
        shown = self.run("systemctl", "show", "-p", prop, "--value", "pgslowlog")
        return shown.stdout.strip()

    def active(self) -> str:
        return self.run("systemctl", "is-active", "pgslowlog", check=False).stdout.strip()

    def config(self) -> bytes:
        return (self.tree / "etc" / "pgslowlog" / "pgslowlog.toml").read_bytes()

    def exists(self, path: str) -> bool:
        return os.path.lexists(self.tree / path.lstrip("/"))


@dataclass
class Fleet:
    hosts: list[Host]
    workdir: Path
    key: Path
    wheel: Path | None = None
    runs: list[str] = field(default_factory=list)

    def inventory(self) -> Path:
        """How to reach each host of the example inventory: nothing else."""
        common = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
        hosts = {
            host.name: {
                "ansible_host": host.address,
                "ansible_port": host.ssh_port,
                "ansible_user": "root",
                "ansible_ssh_private_key_file": str(self.key),
                "ansible_ssh_common_args": common,
                "ansible_python_interpreter": "/usr/bin/python3",
                "pgslowlog_metrics_listen": f"{host.address}:{host.metrics_port}",
            }
            for host in self.hosts
        }
        path = self.workdir / "reach.json"
        path.write_text(json.dumps({"postgresql": {"hosts": hosts}}))
        return path

    def playbook(self, *options: str, **variables: object) -> subprocess.CompletedProcess[str]:
        """The example playbook on the example inventory, once, for every host."""
        started = time.monotonic()
        (self.workdir / "vars.json").write_text(json.dumps(variables))
        result = subprocess.run(
            [
                str(BIN / "ansible-playbook"),
                "-i",
                str(ANSIBLE / "inventory.example.yml"),
                "-i",
                str(self.inventory()),
                "-e",
                f"@{self.workdir / 'vars.json'}",
                *options,
                str(ANSIBLE / "playbook.yml"),
            ],
            capture_output=True,
            text=True,
            timeout=1200,
            cwd=ANSIBLE,  # its ansible.cfg: the role path, SSH pipelining
            env={
                **os.environ,
                "ANSIBLE_FORCE_COLOR": "0",
                "ANSIBLE_NOCOLOR": "1",
                "ANSIBLE_LOCAL_TEMP": str(self.workdir / "ansible-tmp"),
            },
        )
        self.runs.append(result.stdout)
        took = time.monotonic() - started
        print(f"playbook run {len(self.runs)} ({' '.join(options)}): {took:.0f} s")
        return result

    def journals(self) -> str:
        return "\n".join(host.journal() for host in self.hosts)


def recap(stdout: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP's counters per host."""
    counters = {}
    for line in stdout.split("PLAY RECAP")[-1].splitlines():
        if ":" in line and "=" in line:
            name, _, rest = line.partition(":")
            counters[name.strip()] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", rest)}
    return counters


def changed(stdout: str) -> dict[str, int]:
    return {name: counters["changed"] for name, counters in recap(stdout).items()}


def task_output(stdout: str, task: str) -> str:
    """What ansible-playbook printed under the first task whose name starts so."""
    after = stdout.split(f"TASK [pgslowlog : {task}", 1)[1]
    return after.split("\nTASK [", 1)[0]


def build_wheel(destination: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            str(BIN / "pip"),
            "wheel",
            "--quiet",
            "--no-deps",
            "--wheel-dir",
            str(destination),
            str(ROOT),
        ]
    )


@contextmanager
def booted_fleet(
    workdir: Path, *, cut_off: bool, fail_at_setup: str | None = None
) -> Iterator[Fleet]:
    """Three booted hosts; powered off and removed on every path, a failed set-up too."""
    missing = [r for r in DEBIAN_MAJORS if not (TREES / r / ".complete").exists()]
    if missing:
        raise RuntimeError(
            f"no complete Debian tree under {TREES} for {', '.join(missing)}: run "
            + "; ".join(f"bash .ci/build-debian-tree {r}" for r in missing)
        )
    ports = free_ports(3 * len(DEBIAN_MAJORS))  # shared: the hosts share this loopback
    hosts = []
    for i, (release, major) in enumerate(DEBIAN_MAJORS.items()):
        # Cut off: a network each, so the usual ports, on an address of its own.
        reach = (
            (f"198.18.{i}.2", 22, 5432, METRICS_PORT)
            if cut_off
            else ("127.0.0.1", *ports[3 * i : 3 * i + 3])
        )
        netns = f"pgsl{os.getpid()}{i}" if cut_off else None
        host = Host(NAMES[release], release, major, workdir / release, *reach, netns=netns)
        # A cgroup of its own in each hierarchy nspawn uses (not this machine's root,
        # where nspawn's supervisor/ and payload/ would stay): named as the netns, so
        # the leak check finds both.
        host.cgroups = [h / f"pgsl{os.getpid()}{i}" for h in nspawn_hierarchies()]
        hosts.append(host)
    fleet = Fleet(hosts=hosts, workdir=workdir, key=workdir / "id_ed25519")
    started = time.monotonic()
    try:
        for host in hosts:
            _fresh_root(host, workdir)
            if host.netns is not None:
                _own_network(host, hosts.index(host))
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(fleet.key)], check=True
        )
        public_key = (workdir / "id_ed25519.pub").read_text()
        for host in hosts:
            _prepare(host, public_key)
        for host in hosts:  # booted side by side: the slowest boot is the wait
            console = (workdir / f"console-{host.release}.log").open("w")
            network = [f"--network-namespace-path=/run/netns/{host.netns}"] if host.netns else []
            for cgroup in host.cgroups:
                cgroup.mkdir()
            host.machine = subprocess.Popen(
                joined(
                    host.cgroups,
                    [
                        "systemd-nspawn",
                        "--register=no",
                        "--keep-unit",
                        "-q",
                        "-D",
                        str(host.tree),
                        *network,
                        "-b",
                        "--capability=all",
                        "--system-call-filter=bpf perf_event_open",
                    ],
                ),
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
            )
            console.close()  # nspawn has its own copy
        for host in hosts:
            host.leader = _container_init(host.machine)
        for host in hosts:
            _wait_until_booted(host, workdir)
        print(f"booted: {time.monotonic() - started:.0f} s")
        if fail_at_setup:
            # To check that a failed set-up leaves nothing running (the leak check).
            raise RuntimeError(f"set-up failed on purpose ({fail_at_setup} is set)")
        yield fleet
    finally:
        _power_off([host for host in hosts if host.machine is not None])
        for host in hosts:
            if host.tree.is_mount():
                subprocess.run(["umount", str(host.tree)], check=False)
            if host.tree.is_mount():  # something still holds it: detach it all the same
                subprocess.run(["umount", "--lazy", str(host.tree)], check=False)
            if host.netns is not None:  # takes its end of the veth pair, and so the pair
                subprocess.run(["ip", "netns", "del", host.netns], check=False)
            for cgroup in host.cgroups:
                _kill_and_remove(cgroup)  # what it cannot remove, the leak check names
        shutil.rmtree(workdir, ignore_errors=True)


# A host's network namespace and cgroups: pgsl<pid of the test session><host index>.
FLEET_NAME = re.compile(r"pgsl(\d+)\d")


def _fleet_parts() -> Iterator[tuple[str, Path, int]]:
    """(what, path, the session's pid) of every host's network namespace and cgroup."""
    netns = Path("/run/netns")
    found = [("network namespace", p) for p in netns.glob("pgsl*")] if netns.is_dir() else []
    try:
        hierarchies = nspawn_hierarchies()
    except RuntimeError:
        hierarchies = []  # no cgroup2 here: no fleet was ever booted on this machine
    found += [("cgroup", p) for h in hierarchies for p in h.glob("pgsl*")]
    for what, path in sorted(found):
        if match := FLEET_NAME.fullmatch(path.name):
            yield what, path, int(match.group(1))


def fleet_leftovers(pid: int) -> list[str]:
    """The network namespaces and cgroups of the fleets of session `pid` still there."""
    return [f"{what} {path}" for what, path, owner in _fleet_parts() if owner == pid]


def reclaim_dead_fleets() -> list[str]:
    """What fleets of killed runs left (a network namespace with its veth pair, whose
    198.18.I.1 would clash with the next cut-off fleet's; cgroups): removed, as a
    runtime cleans up when it starts again. Only those of a session that no longer
    runs; one line for each."""
    reclaimed = []
    for what, path, owner in _fleet_parts():
        # Its names carry only the pid (a veth's name has 15 characters at most): alive
        # if that pid runs, unless it is this session's, which has made none yet.
        if owner != os.getpid() and running(owner):
            continue
        if what == "cgroup":
            said = _kill_and_remove(path)
        else:
            result = subprocess.run(["ip", "netns", "del", path.name], capture_output=True)
            said = result.stderr.decode(errors="replace").strip() or None
        reclaimed.append(f"{what} {path} of pid {owner}: {said or 'removed'}")
    return reclaimed


def _kill_and_remove(cgroup: Path, timeout: float = 10) -> str | None:
    """SIGKILL what is left in a host's cgroup (a container that would not power off,
    or one of a killed run), then remove it; None, or why it could not be done."""
    deadline = time.monotonic() + timeout
    while (pids := cgroup_pids(cgroup)) and time.monotonic() < deadline:
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    return remove_cgroup(cgroup, timeout=timeout)


def _fresh_root(host: Host, workdir: Path) -> None:
    """The cached tree as the container's root, fresh: an overlay whose upper layer, in
    workdir, takes every write, so the cache is never modified and nothing is copied
    (a copy of the three trees took a minute)."""
    upper, work = workdir / f"{host.release}.upper", workdir / f"{host.release}.work"
    for directory in (upper, work, host.tree):
        directory.mkdir()
    options = f"lowerdir={TREES / host.release},upperdir={upper},workdir={work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(host.tree)], check=True)


def _own_network(host: Host, index: int) -> None:
    """A network namespace whose only link is a veth pair to this machine: 198.18.I.1
    here, 198.18.I.2 (host0) there, and no route anywhere else."""
    assert host.netns is not None
    outside = f"{host.netns}o"
    subprocess.run(["ip", "netns", "add", host.netns], check=True)
    for command in (
        [
            "ip",
            "link",
            "add",
            outside,
            "type",
            "veth",
            "peer",
            "name",
            "host0",
            "netns",
            host.netns,
        ],
        ["ip", "addr", "add", f"198.18.{index}.1/24", "dev", outside],
        ["ip", "link", "set", outside, "up"],
        ["ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "host0"],
        ["ip", "-n", host.netns, "link", "set", "host0", "up"],
        ["ip", "-n", host.netns, "link", "set", "lo", "up"],
    ):
        subprocess.run(command, check=True)


def _prepare(host: Host, public_key: str) -> None:
    tree = host.tree
    conf = tree / "etc" / "postgresql" / str(host.major) / "main" / "postgresql.conf"
    conf.write_text(conf.read_text() + f"\nport = {host.pg_port}\n")
    sshd = tree / "etc" / "ssh" / "sshd_config.d" / "pgslowlog-test.conf"
    sshd.write_text(
        f"Port {host.ssh_port}\nListenAddress {host.address}\nPermitRootLogin prohibit-password\n"
    )
    ssh_dir = tree / "root" / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(public_key)
    (tree / "etc" / "hostname").write_text(f"{host.name}\n")
    if host.netns is None:
        # Reach the package index as this machine does: same CA bundle, same pip settings.
        shutil.copy(
            "/etc/ssl/certs/ca-certificates.crt", tree / "etc/ssl/certs/ca-certificates.crt"
        )
        (tree / "etc" / "pip.conf").write_text(
            "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n"
        )


def _container_init(machine: subprocess.Popen[bytes] | None, timeout: float = 60) -> int:
    """The container's PID 1: the child of systemd-nspawn running systemd."""
    assert machine is not None

    def systemd_child() -> int | None:
        if machine.poll() is not None:
            raise RuntimeError(f"systemd-nspawn exited with {machine.returncode}")
        children = Path(f"/proc/{machine.pid}/task/{machine.pid}/children")
        for pid in children.read_text().split() if children.exists() else []:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                return int(pid)
        return None

    return wait_until(systemd_child, timeout, "the container's systemd started", interval=0.2)


def _wait_until_booted(host: Host, workdir: Path) -> None:
    """Until systemctl names a finished boot. Right after systemd becomes PID 1 its bus
    is not up and systemctl prints nothing, so ask again until it answers."""
    machine = host.machine
    assert machine is not None
    states = [""]

    def finished_boot() -> bool:
        if machine.poll() is not None:
            raise RuntimeError(f"{host.name} stopped while booting ({machine.returncode})")
        try:
            answer = host.run("systemctl", "is-system-running", "--wait", check=False, timeout=30)
            states.append(answer.stdout.strip())
        except subprocess.TimeoutExpired:
            states.append("(no answer in 30 s)")
        return states[-1] in ("running", "degraded")

    try:
        wait_until(finished_boot, BOOT_TIMEOUT_S, f"{host.name} booted", interval=1)
    except AssertionError:
        console = (workdir / f"console-{host.release}.log").read_text()[-2000:]
        raise RuntimeError(
            f"{host.name} did not finish booting: {states[-1]!r}\n{console}"
        ) from None


def _power_off(hosts: list[Host]) -> None:
    """Power every container off at once; kill one that does not go within a minute."""
    for host in hosts:
        if host.leader is not None and host.machine is not None and host.machine.poll() is None:
            try:
                subprocess.run(
                    [
                        "nsenter",
                        "-t",
                        str(host.leader),
                        "-a",
                        "systemctl",
                        "poweroff",
                        "--no-block",
                    ],
                    capture_output=True,
                    timeout=30,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                pass  # its bus may not be up: nspawn's own signals follow
    for host in hosts:
        machine = host.machine
        assert machine is not None
        try:
            machine.wait(60)
        except subprocess.TimeoutExpired:
            machine.terminate()  # nspawn asks the container's systemd to halt
            try:
                machine.wait(20)
            except subprocess.TimeoutExpired:
                machine.kill()
                machine.wait()
        # Killing nspawn alone would leave the container's processes running: its PID 1,
        # killed, takes every process of its namespace with it.
        if host.leader is not None and Path(f"/proc/{host.leader}").exists():
            try:
                os.kill(host.leader, signal.SIGKILL)
            except ProcessLookupError:
                pass


def kernel_headers_repository(host: Host, kernel: str) -> str:
    """Debian has no headers package for this machine's kernel: give the host an apt
    repository (file:, signed by nobody, trusted by its sources entry) that has one,
    as a distribution kernel's host has, so the role's default path (apt install
    linux-headers-$(uname -r)) runs for real. The package holds what Debian's does for
    bcc: /lib/modules/KERNEL/build and source, here linked to the tree's newest headers.
    Returns the package's name."""
    tree = host.tree
    headers = sorted((tree / "usr" / "src").glob("linux-headers-*-amd64"))[-1].name
    name = f"linux-headers-{kernel}"
    build = host.tree.parent / f"{host.release}-headers-package"
    modules = build / "lib" / "modules" / kernel
    modules.mkdir(parents=True)
    (modules / "build").symlink_to(f"/usr/src/{headers}")
    (modules / "source").symlink_to(f"/usr/src/{headers.removesuffix('-amd64')}-common")
    (build / "DEBIAN").mkdir()
    (build / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: 1.0\nArchitecture: amd64\n"
        "Maintainer: pgslowlog tests <tests@pgslowlog.invalid>\n"
        "Depends: linux-headers-amd64\n"
        f"Description: headers for {kernel}, for bcc (the tree's own, linked)\n"
    )
    repository = tree / "srv" / "kernel-headers"
    repository.mkdir(parents=True)
    deb = repository / f"{name}_1.0_amd64.deb"
    subprocess.run(
        ["dpkg-deb", "--build", "--root-owner-group", str(build), str(deb)],
        check=True,
        capture_output=True,
    )
    data = deb.read_bytes()
    control = (build / "DEBIAN" / "control").read_text()
    packages = (
        f"{control}Filename: ./{deb.name}\nSize: {len(data)}\n"
        f"SHA256: {hashlib.sha256(data).hexdigest()}\n\n"
    )
    (repository / "Packages").write_text(packages)
    listing = packages.encode()
    (repository / "Release").write_text(
        "Origin: pgslowlog-tests\nLabel: pgslowlog-tests\nArchitectures: amd64\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S UTC', time.gmtime())}\n"
        f"SHA256:\n {hashlib.sha256(listing).hexdigest()} {len(listing)} Packages\n"
    )
    sources = tree / "etc" / "apt" / "sources.list.d" / "kernel-headers.list"
    sources.write_text("deb [trusted=yes] file:/srv/kernel-headers ./\n")
    return name

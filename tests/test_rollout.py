"""The example playbook, run for real against a booted systemd host.

A Debian 12 tree (built once by .ci/build-debian-tree, copied fresh for each run)
boots under systemd-nspawn with its own PostgreSQL 15; ansible-playbook reaches it
over SSH on loopback and installs pgslowlog with the role, as on a fleet.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pgslowlog.testing.cluster import free_port

pytestmark = pytest.mark.ebpf

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent
TREE = Path(os.environ.get("PGSLOWLOG_DEBIAN_TREE", "/var/cache/pgslowlog/nspawn/tree"))


@dataclass
class Host:
    tree: Path
    leader: int  # the container's PID 1, seen from here
    ssh_port: int
    pg_port: int
    key: Path
    workdir: Path
    wheel: Path | None = None

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

    def playbook(self, **variables: object) -> subprocess.CompletedProcess[str]:
        inventory = self.workdir / "inventory.json"
        inventory.write_text(
            json.dumps(
                {
                    "postgresql": {
                        "hosts": {
                            "db-test": {
                                "ansible_host": "127.0.0.1",
                                "ansible_port": self.ssh_port,
                                "ansible_user": "root",
                                "ansible_ssh_private_key_file": str(self.key),
                                "ansible_ssh_common_args": "-o StrictHostKeyChecking=no "
                                "-o UserKnownHostsFile=/dev/null",
                                "ansible_python_interpreter": "/usr/bin/python3",
                            }
                        }
                    }
                }
            )
        )
        extra = self.workdir / "vars.json"
        extra.write_text(json.dumps(variables))
        return subprocess.run(
            [
                str(BIN / "ansible-playbook"),
                "-i",
                str(inventory),
                "-e",
                f"@{extra}",
                str(ROOT / "ansible" / "playbook.yml"),
            ],
            capture_output=True,
            text=True,
            timeout=1200,
            cwd=ROOT / "ansible",
            env={**os.environ, "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_NOCOLOR": "1"},
        )

    def psql(self, sql: str) -> None:
        self.run("runuser", "-u", "postgres", "--", "psql", "-p", str(self.pg_port), "-qAtc", sql)

    def events(self) -> list[dict[str, object]]:
        log = self.tree / "var" / "log" / "pgslowlog" / "slow.jsonl"
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]

    def journal(self) -> str:
        shown = self.run("journalctl", "-u", "pgslowlog", "--no-pager", "-n", "60", check=False)
        return shown.stdout

    def main_pid(self) -> str:
        shown = self.run("systemctl", "show", "-p", "MainPID", "--value", "pgslowlog")
        return shown.stdout.strip()


def _prepare(tree: Path, ssh_port: int, pg_port: int, public_key: str) -> None:
    conf = next((tree / "etc" / "postgresql").glob("*/main/postgresql.conf"))
    conf.write_text(conf.read_text() + f"\nport = {pg_port}\n")
    sshd = tree / "etc" / "ssh" / "sshd_config.d" / "pgslowlog-test.conf"
    sshd.write_text(
        f"Port {ssh_port}\nListenAddress 127.0.0.1\nPermitRootLogin prohibit-password\n"
    )
    ssh_dir = tree / "root" / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(public_key)
    (tree / "etc" / "hostname").write_text("db-test\n")
    # Reach the package index as this machine does: same CA bundle, same pip settings.
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", tree / "etc/ssl/certs/ca-certificates.crt")
    (tree / "etc" / "pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")


BOOT_TIMEOUT_S = 180
FAIL_AT_SETUP = "PGSLOWLOG_TEST_ROLLOUT_FAIL_AT_SETUP"


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> Iterator[Host]:
    """A booted container; powered off and removed on every path, a failed set-up too."""
    if not (TREE / "usr" / "lib" / "postgresql").exists():
        raise RuntimeError(f"no Debian tree at {TREE}: run bash .ci/build-debian-tree")
    workdir = tmp_path_factory.mktemp("rollout")
    machine: subprocess.Popen[bytes] | None = None
    leader: int | None = None
    try:
        tree = workdir / "tree"
        subprocess.run(["cp", "-a", str(TREE), str(tree)], check=True)
        key = workdir / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        # Both ports free now: the container shares the host's loopback.
        ssh_port, pg_port = free_port(), free_port()
        _prepare(tree, ssh_port, pg_port, (workdir / "id_ed25519.pub").read_text())
        console = (workdir / "console.log").open("w")
        machine = subprocess.Popen(
            [
                "systemd-nspawn",
                "--register=no",
                "--keep-unit",
                "-q",
                "-D",
                str(tree),
                "-b",
                "--capability=all",
                "--system-call-filter=bpf perf_event_open",
            ],
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
        )
        console.close()  # nspawn has its own copy
        leader = _container_init(machine)
        host = Host(
            tree=tree, leader=leader, ssh_port=ssh_port, pg_port=pg_port, key=key, workdir=workdir
        )
        _wait_until_booted(host, machine)
        if os.environ.get(FAIL_AT_SETUP):
            # To check that a failed set-up leaves nothing running (the leak check).
            raise RuntimeError(f"set-up failed on purpose ({FAIL_AT_SETUP} is set)")
        subprocess.run(
            [
                "pip",
                "wheel",
                "--quiet",
                "--no-deps",
                "--wheel-dir",
                str(workdir / "dist"),
                str(ROOT),
            ],
            check=True,
            executable=str(BIN / "pip"),
        )
        host.wheel = next((workdir / "dist").glob("pgslowlog-*.whl"))
        yield host
    finally:
        if machine is not None:
            _power_off(machine, leader)
        shutil.rmtree(workdir, ignore_errors=True)


def _container_init(machine: subprocess.Popen[bytes], timeout: float = 60) -> int:
    """The container's PID 1: the child of systemd-nspawn running systemd."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if machine.poll() is not None:
            raise RuntimeError(f"systemd-nspawn exited with {machine.returncode}")
        children = Path(f"/proc/{machine.pid}/task/{machine.pid}/children")
        for pid in children.read_text().split() if children.exists() else []:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                return int(pid)
        time.sleep(0.2)
    raise RuntimeError("the container's systemd did not start")


def _wait_until_booted(host: Host, machine: subprocess.Popen[bytes]) -> None:
    """Until systemctl names a finished boot. Right after systemd becomes PID 1 its bus
    is not up and systemctl prints nothing, so ask again until it answers."""
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    state = ""
    while time.monotonic() < deadline:
        if machine.poll() is not None:
            raise RuntimeError(f"the container stopped while booting ({machine.returncode})")
        try:
            answer = host.run("systemctl", "is-system-running", "--wait", check=False, timeout=30)
            state = answer.stdout.strip()
        except subprocess.TimeoutExpired:
            state = "(no answer in 30 s)"
        if state in ("running", "degraded"):
            return
        time.sleep(1)
    console = (host.workdir / "console.log").read_text()[-2000:]
    raise RuntimeError(f"the container did not finish booting: {state!r}\n{console}")


def _power_off(machine: subprocess.Popen[bytes], leader: int | None) -> None:
    """Power the container off; kill it when it does not go within a minute."""
    if leader is not None and machine.poll() is None:
        try:
            subprocess.run(
                ["nsenter", "-t", str(leader), "-a", "systemctl", "poweroff"],
                capture_output=True,
                timeout=30,
                check=False,
            )
        except subprocess.TimeoutExpired:
            pass  # its bus may not be up: nspawn's own signals follow
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
    if leader is not None and Path(f"/proc/{leader}").exists():
        try:
            os.kill(leader, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_for(predicate, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"not true within {timeout} s: {predicate.__doc__ or predicate}")
        time.sleep(0.2)


def test_a_set_up_that_fails_after_boot_leaves_nothing_running(tmp_path):
    """The fixture's own failure path, run for real in a pytest of its own: the container
    had booted when the set-up failed, and it is powered off all the same."""
    inner = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            f"--basetemp={tmp_path / 'inner'}",
            f"{__file__}::test_playbook_rolls_out_a_working_service",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env={**os.environ, FAIL_AT_SETUP: "1"},
    )
    output = inner.stdout + inner.stderr
    assert inner.returncode == 1, output[-3000:]
    assert "set-up failed on purpose" in output and "1 error" in output, output[-3000:]
    # Its own leak check found nothing left (and ours, after this test, checks again).
    assert "left over" not in output, output[-3000:]


def test_playbook_rolls_out_a_working_service(host: Host):
    variables = {
        "pgslowlog_wheel": str(host.wheel),
        "pgslowlog_kernel_headers": "linked",  # the container's kernel has no package
        "pgslowlog_threshold_ms": 200,
    }
    first = host.playbook(**variables)
    assert first.returncode == 0, first.stdout[-3000:] + host.journal()
    assert host.run("systemctl", "is-active", "pgslowlog").stdout.strip() == "active"

    host.psql("select pg_sleep(0.3) /* rolled out */")
    _wait_for(lambda: any("rolled out" in e["query"] for e in host.events()))

    second = host.playbook(**variables)
    assert second.returncode == 0, second.stdout[-3000:]
    assert "changed=0" in second.stdout.split("PLAY RECAP")[-1], second.stdout[-3000:]

    pid_before = host.main_pid()
    third = host.playbook(**{**variables, "pgslowlog_threshold_ms": 1000})
    assert third.returncode == 0, third.stdout[-3000:]
    assert "RUNNING HANDLER [pgslowlog : Reload pgslowlog]" in third.stdout
    assert "Restart pgslowlog" not in third.stdout
    assert host.main_pid() == pid_before  # reloaded, not restarted
    host.psql("select pg_sleep(0.3) /* under the new threshold */")
    host.psql("select pg_sleep(1.1) /* over the new threshold */")
    _wait_for(lambda: any("over the new" in e["query"] for e in host.events()))
    assert not any("under the new" in e["query"] for e in host.events())

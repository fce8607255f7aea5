"""The air-gapped install and the uninstall, on three booted hosts that reach no index.

Each host (tests/nspawn_fleet.py, cut off) has a network namespace of its own whose
only link is a veth pair to this machine: no route, no name server, so no package
index and no Debian mirror. The wheelhouse is built here, on the control node, by the
documented command (ansible/build-wheelhouse), and the role copies it and installs
from it with no index at all. Then pgslowlog_state: absent takes it all away again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleet import DEBIAN_PYTHONS
from nspawn_fleet import ANSIBLE, Fleet, booted_fleet, changed, task_output
from waiting import wait_until

pytestmark = pytest.mark.ebpf

# Everything these hosts install is on them already (their trees have bcc, python3-venv
# and Debian's newest kernel headers), as on an air-gapped host made from an image: the
# role asks no mirror. "linked": this machine's kernel has no headers package. And the
# role's own names and places, chosen here rather than its defaults.
OFFLINE = {
    "pgslowlog_kernel_headers": "linked",
    "pgslowlog_user": "slowlog",
    "pgslowlog_group": "dba-tools",
    "pgslowlog_install_dir": "/opt/tools/slowlog",
    "pgslowlog_config_dir": "/etc/slowlog",
}


@pytest.fixture(scope="module")
def air_gapped(tmp_path_factory) -> Iterator[tuple[Fleet, Path]]:
    workdir = tmp_path_factory.mktemp("offline")
    wheelhouse = workdir / "wheelhouse"
    build = subprocess.Popen(
        [str(ANSIBLE / "build-wheelhouse"), str(wheelhouse)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},  # the pip that does the work
    )
    try:
        with booted_fleet(workdir, cut_off=True) as fleet:
            output, _ = build.communicate(timeout=900)
            assert build.returncode == 0, output
            print(output.splitlines()[-1])
            yield fleet, wheelhouse
    finally:
        if build.poll() is None:
            build.kill()
            build.wait()


def test_the_hosts_reach_no_index_and_no_mirror(air_gapped):
    fleet, _ = air_gapped
    probe = (
        "import socket, sys\n"
        # pypi.org's and deb.debian.org's addresses: there is no route to any
        "for address in (('151.101.0.223', 443), ('199.232.10.132', 80)):\n"
        "    try:\n"
        "        socket.create_connection(address, timeout=3).close()\n"
        "        sys.exit(f'reached {address}')\n"
        "    except OSError as error:\n"
        "        print(error)\n"
        "try:\n"
        "    socket.getaddrinfo('pypi.org', 443)\n"
        "    sys.exit('resolved pypi.org')\n"
        "except OSError as error:\n"
        "    print(error)\n"
    )
    for host in fleet.hosts:
        reached = host.run("/usr/bin/python3", "-c", probe, check=False)
        assert reached.returncode == 0, (host.name, reached.stdout, reached.stderr)
        assert "Network is unreachable" in reached.stdout, reached.stdout


def test_air_gapped_install_from_a_wheelhouse(air_gapped):
    fleet, wheelhouse = air_gapped
    variables = {**OFFLINE, "pgslowlog_wheelhouse": str(wheelhouse)}
    # What would change, with the wheelhouse: said, nothing done.
    dry = fleet.playbook("--check", "--diff", **variables)
    assert dry.returncode == 0, dry.stdout[-5000:]
    assert "would be installed (installed now: none)" in dry.stdout, dry.stdout[-3000:]
    for host in fleet.hosts:
        assert not host.exists("/opt/tools/slowlog") and not host.exists("/etc/slowlog")
    # The install phase alone first: the venv, and nothing of the other phases.
    installed = fleet.playbook("--tags", "pgslowlog_install", **variables)
    assert installed.returncode == 0, installed.stdout[-5000:]
    # Nothing for apt (it could reach no mirror): every host skipped it.
    apt = task_output(installed.stdout, "Install what is missing")
    assert all(f"skipping: [{host.name}]" in apt for host in fleet.hosts), apt
    for host in fleet.hosts:
        shown = host.run("/opt/tools/slowlog/bin/pip", "list", "--format=freeze").stdout
        assert "pgslowlog==" in shown and "msgspec==" in shown, shown
        assert not host.exists("/etc/slowlog") and not host.exists(
            "/etc/systemd/system/pgslowlog.service"
        )

    first = fleet.playbook(**variables)
    assert first.returncode == 0, first.stdout[-5000:] + fleet.journals()
    for host in fleet.hosts:
        assert host.active() == "active", host.journal()
        assert host.show("User") == "slowlog" and host.show("Group") == "dba-tools"
        config = host.run("systemctl", "show", "-p", "ExecStart", "--value", "pgslowlog").stdout
        assert "/opt/tools/slowlog/bin/pgslowlog run -c /etc/slowlog/pgslowlog.toml" in config
        host.psql(f"select pg_sleep(0.4) /* offline on {host.release} */")
    for host in fleet.hosts:
        event = wait_until(
            lambda h=host: next((e for e in h.events() if "offline on" in e["query"]), None),
            15,
            f"the statement on {host.name} logged",
        )
        assert event["host"] == host.name, event
        with urllib.request.urlopen(f"http://{host.address}:{host.metrics_port}/metrics") as r:
            metrics = r.read().decode()
        assert f'python="{DEBIAN_PYTHONS[host.release]}.' in metrics, metrics[:2000]

    second = fleet.playbook(**variables)
    assert second.returncode == 0, second.stdout[-3000:]
    assert changed(second.stdout) == {host.name: 0 for host in fleet.hosts}, second.stdout[-3000:]


def test_uninstall_removes_the_service_and_keeps_the_logs(air_gapped):
    fleet, wheelhouse = air_gapped
    variables = {**OFFLINE, "pgslowlog_wheelhouse": str(wheelhouse), "pgslowlog_state": "absent"}
    for host in fleet.hosts:
        assert host.events(), f"{host.name} has no log to keep"
    dry = fleet.playbook("--check", **variables)
    assert dry.returncode == 0, dry.stdout[-4000:]
    assert sorted(changed(dry.stdout)) == sorted(host.name for host in fleet.hosts)
    assert all(count > 0 for count in changed(dry.stdout).values()), dry.stdout[-3000:]
    for host in fleet.hosts:  # said, not done
        assert host.active() == "active" and host.exists("/opt/tools/slowlog"), host.name
    removed = fleet.playbook(**variables)
    assert removed.returncode == 0, removed.stdout[-4000:]
    for host in fleet.hosts:
        assert host.run("systemctl", "cat", "pgslowlog", check=False).returncode != 0
        assert host.active() in ("inactive", "unknown"), host.active()
        for path in (
            "/opt/tools/slowlog",
            "/etc/slowlog",
            "/etc/systemd/system/pgslowlog.service",
            "/etc/systemd/system/pgslowlog.service.d",
        ):
            assert not host.exists(path), (host.name, path)
        assert host.events(), f"{host.name}'s log was removed"
        assert host.run("getent", "passwd", "slowlog", check=False).returncode == 0
    again = fleet.playbook(**variables)
    assert again.returncode == 0, again.stdout[-3000:]
    assert changed(again.stdout) == {host.name: 0 for host in fleet.hosts}, again.stdout[-3000:]

    # Asked to, the data and the user go too; a run after that changes nothing.
    # As an operator gives it, on the command line: the string "true".
    purged = fleet.playbook("-e", "pgslowlog_remove_data=true", **variables)
    assert purged.returncode == 0, purged.stdout[-3000:]
    for host in fleet.hosts:
        assert not host.exists("/var/log/pgslowlog"), host.name
        assert host.run("getent", "passwd", "slowlog", check=False).returncode == 2
        assert host.run("getent", "group", "dba-tools", check=False).returncode == 2
    last = fleet.playbook("-e", "pgslowlog_remove_data=true", **variables)
    assert changed(last.stdout) == {host.name: 0 for host in fleet.hosts}, last.stdout[-3000:]

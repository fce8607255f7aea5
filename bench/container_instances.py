"""What each traced container costs the daemon: its CPU with N idle containerised servers.

Starts N containers of the trixie tree's PostgreSQL 17 with the tests' harness
(tests/containers.py: overlay root, unshare, postgres as PID 1, a Docker-like cgroup),
runs `pgslowlog run` with one `containers = true` target (auto: `sampled` at 200 ms),
waits until every server is found, then prints the daemon's CPU over `--seconds` as a
share of one core, for each N in `--counts`. No assertion: figures.

    .venv/bin/python bench/container_instances.py [--counts 1 4 8] [--seconds 20]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from containers import Container  # the tests' harness

from pgslowlog.testing.daemon_process import RunningDaemon

TREE = Path("/var/cache/pgslowlog/trees/trixie")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks


def measure(count: int, seconds: float) -> float:
    containers: list[Container] = []
    with tempfile.TemporaryDirectory() as directory:
        config = Path(directory) / "pgslowlog.toml"
        config.write_text(
            '[[target]]\ncontainers = true\n[sinks.file]\npath = "'
            + str(Path(directory) / "slow.jsonl")
            + '"\n'
        )
        config.chmod(0o600)
        try:
            for _ in range(count):
                containers.append(Container(TREE, 17).start())
            daemon = RunningDaemon(config)
            try:
                daemon.wait_for_log("ready")
                daemon.wait_for_log("container_server_found", count)
                time.sleep(2)  # the compiles are over
                pid = daemon.process.pid
                before, started = cpu_s(pid), time.monotonic()
                time.sleep(seconds)
                return (cpu_s(pid) - before) / (time.monotonic() - started)
            finally:
                daemon.stop()
        finally:
            for container in containers:
                container.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="*", default=[1, 4, 8])
    parser.add_argument("--seconds", type=float, default=20)
    arguments = parser.parse_args()
    for count in arguments.counts:
        share = measure(count, arguments.seconds)
        print(
            f"{count} idle containers: daemon CPU {share * 100:.2f}% of a core "
            f"({share * 100 / count:.2f}% per container)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

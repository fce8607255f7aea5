"""Another architecture is refused in one line, by check and run alike.

`setarch linux32` makes the kernel report i686 to the child, as a 32-bit host would:
no mock, the real uname the daemon reads.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pgslowlog.machine import check_architecture

CONFIG = """
[[target]]
binary = "/usr/lib/postgresql/15/bin/postgres"

[sinks.file]
path = "{directory}/slow.jsonl"
"""
REFUSAL = "architecture i686 is not supported yet"


@pytest.mark.parametrize("command", ["check", "run"])
def test_another_architecture_is_refused_in_one_line(tmp_path: Path, command: str):
    config = tmp_path / "pgslowlog.toml"
    config.write_text(CONFIG.format(directory=tmp_path))
    result = subprocess.run(
        ["setarch", "linux32", sys.executable, "-m", "pgslowlog", command, "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    output = result.stdout if command == "check" else result.stderr
    refusals = [line for line in output.splitlines() if REFUSAL in line]
    assert len(refusals) == 1, output
    assert refusals[0].endswith("run it on x86_64 hosts")
    assert "Traceback" not in result.stdout + result.stderr
    if command == "run":
        assert result.stderr.count("\n") == 1 and not (tmp_path / "slow.jsonl").exists()


def test_x86_64_is_the_supported_architecture():
    assert check_architecture("x86_64").ok
    assert not check_architecture("aarch64").ok

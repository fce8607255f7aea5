"""Turn a [[target]] table into the binary a probe attaches to.

A uprobe is placed on an inode, so it fires in every process that maps the binary:
backends already running and those forked later, with no per-pid set-up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pgslowlog.config import TargetConfig
from pgslowlog.elf import BinaryFile, PostgresBinary, open_binary
from pgslowlog.errors import UserError


@dataclass(frozen=True)
class Target:
    index: int
    binary: PostgresBinary  # what was read from `file`
    file: BinaryFile  # the open file that was read: probes attach through it
    name: str  # what events carry as `target`

    @property
    def label(self) -> str:
        return f"target[{self.index}]"


def resolve_binary_path(config: TargetConfig, index: int) -> str:
    if config.binary is not None:
        return config.binary
    assert config.pid is not None  # the config check guarantees one of the two
    return binary_of_pid(config.pid, index)


def binary_of_pid(pid: int, index: int) -> str:
    """The server binary of a running process, seen from this mount namespace.

    /proc/PID/exe names the path inside the process's own mount namespace; for a
    server in a container, /proc/PID/root/<that path> reaches the same file from here.
    """
    label = f"target[{index}]"
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except FileNotFoundError:
        raise UserError(
            f"{label}: no process with pid {pid}",
            "start PostgreSQL or set the postmaster's pid (head -1 $PGDATA/postmaster.pid)",
        ) from None
    except PermissionError:
        raise UserError(f"{label}: cannot read /proc/{pid}/exe", "run as root") from None
    if exe.endswith(" (deleted)"):
        raise UserError(
            f"{label}: the binary of pid {pid} was replaced on disk ({exe})",
            "restart that PostgreSQL after the upgrade, or set binary = to the new one",
        )
    root = f"/proc/{pid}/root"
    if _same_file(root, "/"):
        return exe  # same mount namespace root: the path means the same here
    return f"{root}{exe}"


def _same_file(a: str, b: str) -> bool:
    try:
        first, second = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


def resolve_target(config: TargetConfig, index: int, wanted_symbols: frozenset[str]) -> Target:
    """The target's binary, opened and read; the caller closes `target.file`."""
    path = resolve_binary_path(config, index)
    binary_file, binary = open_binary(path, wanted_symbols, label=f"target[{index}] binary")
    return Target(index=index, binary=binary, file=binary_file, name=target_name(config, index))


def target_name(config: TargetConfig, index: int) -> str:
    """What events and logs call a [[target]]: its `name`, else target0, target1, ..."""
    return config.name or f"target{index}"

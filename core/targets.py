"""Turn a [[target]] table into the binary a probe attaches to.

A uprobe is placed on an inode, so it fires in every process that maps the binary:
backends already running and those forked later, with no per-pid set-up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from pgslowlog.config import TargetConfig
from pgslowlog.containers import ContainerServer, PidNamespace, own_pid_namespace, pid_namespace
from pgslowlog.elf import BinaryFile, PostgresBinary, file_identity, identity_of, open_binary
from pgslowlog.errors import UserError


@dataclass(frozen=True)
class Target:
    index: int
    binary: PostgresBinary  # what was read from `file`
    file: BinaryFile  # the open file that was read: probes attach through it
    name: str  # what events carry as `target`
    # Whose processes it traces: the servers of one pid namespace (the daemon's own for
    # a `binary =` target, the server's for `pid =` or a container's instance).
    scope: PidNamespace = field(default_factory=own_pid_namespace)
    server: ContainerServer | None = None  # the container's server, for an instance

    @property
    def label(self) -> str:
        if self.server is not None:
            return f"target[{self.index}] in {self.server.name}"
        return f"target[{self.index}]"

    @property
    def key(self) -> tuple[int, str | None]:
        """One per traced instance: a containers = true target has one per container."""
        return self.index, self.container

    @property
    def container(self) -> str | None:
        return self.server.name if self.server is not None else None


def instance_name(target: str, container: str | None) -> str:
    """What logs and the health line call a target, or one container's instance of a
    containers = true target: name[container]."""
    return f"{target}[{container}]" if container else target


def resolve_binary_path(config: TargetConfig, index: int) -> str:
    if config.binary is not None:
        return config.binary
    assert config.pid is not None  # the config check guarantees one of the two
    return binary_of_pid(config.pid, index)


def binary_of_pid(pid: int, index: int) -> str:
    """The server binary of a running process, as a path that works from here.

    The kernel writes /proc/PID/exe relative to the reader's root where it can: a
    server in a chroot reads as the host's full path already. A server in its own
    mount namespace (a pivot_root container) reads as its inner path, reachable from
    here as /proc/PID/root/<path>. The right one is whichever names the very file the
    process runs (same device and inode as /proc/PID/exe).
    """
    label = f"target[{index}]"
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
        running = identity_of(os.stat(f"/proc/{pid}/exe"))
    except FileNotFoundError:
        raise UserError(
            f"{label}: no process with pid {pid}",
            "start PostgreSQL or set the postmaster's pid (head -1 $PGDATA/postmaster.pid)",
        ) from None
    except PermissionError:
        raise UserError(
            f"{label}: cannot read /proc/{pid}/exe",
            "run as root or with CAP_SYS_PTRACE",
        ) from None
    if exe.endswith(" (deleted)"):
        raise UserError(
            f"{label}: the binary of pid {pid} was replaced on disk ({exe})",
            "restart that PostgreSQL after the upgrade, or set binary = to the new one",
        )
    for candidate in (exe, f"/proc/{pid}/root{exe}"):
        if file_identity(candidate) == running:
            return candidate
    raise UserError(
        f"{label}: the binary of pid {pid} ({exe}) cannot be reached from here",
        "set binary = to its path as seen from this host",
    )


def resolve_target(
    config: TargetConfig,
    index: int,
    wanted_symbols: frozenset[str],
    server: ContainerServer | None = None,
) -> Target:
    """The target's binary, opened and read (for a containers = true target, that of
    one container's `server`); the caller closes `target.file`."""
    if server is not None:
        # The very file the postmaster runs: a path through its root could be a symlink
        # its tenant swapped in since.
        path = f"/proc/{server.host_pid}/exe"
        scope = server.namespace
        label = f"target[{index}] binary in {server.name}"
    else:
        path = resolve_binary_path(config, index)
        scope = own_pid_namespace()
        if config.pid is not None:
            scope = pid_namespace(config.pid) or scope  # gone meanwhile: its binary was read
        label = f"target[{index}] binary"
    binary_file, binary = open_binary(path, wanted_symbols, label=label)
    if server is not None:  # what events and logs call it: the path inside the container
        binary = replace(binary, path=server.exe)
    return Target(
        index=index,
        binary=binary,
        file=binary_file,
        name=target_name(config, index),
        scope=scope,
        server=server,
    )


def target_name(config: TargetConfig, index: int) -> str:
    """What events and logs call a [[target]]: its `name`, else target0, target1, ..."""
    return config.name or f"target{index}"

"""Where a backend's server listens: its postmaster's postmaster.pid, read through /proc.

A backend's parent is its postmaster, whose working directory is the data directory.
postmaster.pid holds, one a line: the pid, the data directory, the start time, the
port, the first socket directory and the first listen address. A server in a mount
namespace of its own (a chroot's), or a socket in a /tmp that systemd's PrivateTmp
hides from the daemon, is reached through /proc/PID/root. A server in a container
(another pid namespace) is not reached: its plan_error says so.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

from pgslowlog.containers import own_pid_namespace, pid_namespace
from pgslowlog.elf import file_identity
from pgslowlog.sampled.discovery import postmasters
from pgslowlog.sampled.procfs import process_stat


class Server(NamedTuple):
    postmaster: int
    host: str  # a socket directory (peer authentication) or an address
    port: int


def parent_pid(pid: int) -> Optional[int]:
    process = process_stat(pid)
    return process.parent if process is not None else None


def parse_postmaster_pid(text: str, postmaster: int) -> Server:
    """The server a postmaster.pid describes; ValueError when it cannot be reached."""
    lines = text.split("\n")
    if len(lines) < 6 or not lines[0].strip().isdigit() or int(lines[0]) != postmaster:
        raise ValueError("postmaster.pid is not this postmaster's (it is starting or stopping)")
    port = int(lines[3])
    socket_directory, address = lines[4].strip(), lines[5].strip()
    if socket_directory:
        return Server(postmaster, socket_directory, port)
    if address in ("*", "0.0.0.0"):  # a listen address, not a bind
        return Server(postmaster, "127.0.0.1", port)
    if address == "::":
        return Server(postmaster, "::1", port)
    if address:
        return Server(postmaster, address, port)
    raise ValueError("the server has neither a socket directory nor a listen address")


def server_of(backend_pid: int) -> Server:
    """The server a backend belongs to; ValueError saying why not (it exited, say)."""
    postmaster = parent_pid(backend_pid)
    if postmaster is None or postmaster <= 1:
        raise ValueError(f"backend {backend_pid} exited before its server could be found")
    return server_of_postmaster(postmaster)


def server_of_postmaster(postmaster: int) -> Server:
    if pid_namespace(postmaster) not in (None, own_pid_namespace()):
        # A container's server: its postmaster.pid holds its own pid, its loopback is not
        # ours, and its socket and files are its tenant's to swap. Not reached yet.
        raise ValueError("plans of a server in a container are not taken (yet)")
    try:
        with open(f"/proc/{postmaster}/cwd/postmaster.pid") as file:
            text = file.read(4096)
    except OSError as error:
        raise ValueError(
            f"cannot read the postmaster.pid of pid {postmaster}: {error.strerror}"
        ) from None
    server = parse_postmaster_pid(text, postmaster)
    if server.host.startswith("/"):
        # Through the postmaster's own root where ours differs (a container), or where
        # its socket is not visible from here: the unit's PrivateTmp hides /tmp.
        socket = f"{server.host}/.s.PGSQL.{server.port}"
        if not _same_root(postmaster) or not os.path.exists(socket):
            server = server._replace(host=f"/proc/{postmaster}/root{server.host}")
    return server


def only_server_of(binary: str) -> Server:
    """The one server that runs `binary` (for a backend gone before it could be asked:
    a short connection); ValueError when there are none or several."""
    identity = file_identity(binary)
    running = postmasters(identity) if identity is not None else []
    if len(running) != 1:
        raise ValueError(f"{len(running)} servers run {binary}")
    return server_of_postmaster(running[0])


def _same_root(pid: int) -> bool:
    try:
        theirs, ours = os.stat(f"/proc/{pid}/root"), os.stat("/")
    except OSError:
        return True
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)

"""What /proc says of PostgreSQL's processes: their parents and children."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def _stat(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None


def _after_comm(stat: str) -> list[str]:
    return stat[stat.rindex(")") + 2 :].split()


def stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (which may hold spaces): state, ppid, ..."""
    stat = _stat(pid)
    return _after_comm(stat) if stat is not None else None


_START_TIME = 19  # starttime (field 22) in stat_fields: tells a reused pid's new process


@dataclass(frozen=True)
class ProcessStat:
    comm: str  # the command name: the executable's file name, never the process title
    state: str
    parent: int
    start: str


def process_stat(pid: int) -> ProcessStat | None:
    stat = _stat(pid)
    if stat is None:
        return None
    fields = _after_comm(stat)
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    return ProcessStat(comm, fields[0], int(fields[1]), fields[_START_TIME])


def parent_of(pid: int) -> int:
    fields = stat_fields(pid)
    return int(fields[1]) if fields else 0


def children_of(pid: int) -> set[int]:
    """The kernel's list of a process's children (documented as possibly incomplete:
    `is_child` settles a doubt)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return set()
    return {int(child) for child in text.split()}


# postgres's main() runs as something other than a postmaster when its first argument is
# one of these (src/backend/main/main.c): initdb's bootstrap and single-user runs,
# `postgres --check`, a config listing. EXEC_BACKEND builds (never on Linux) add --fork*.
_NOT_A_POSTMASTER = ("--boot", "--single", "--check", "--describe-config", "--fork")


def serves(pid: int) -> bool:
    """Whether a process running postgres, whose parent does not, is a postmaster: it was
    not started in one of main()'s other modes, and it has a child. A child alone does
    not tell: initdb's `postgres --single` forks `locale -a` while it runs. A postmaster
    forks its checkpointer within milliseconds of starting."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False  # gone
    first = argv[1].decode(errors="replace") if len(argv) > 1 else ""
    return not first.startswith(_NOT_A_POSTMASTER) and bool(children_of(pid))


def is_child(pid: int, parent: int) -> bool:
    """Whether `pid` is a running child of `parent`. An exited child the parent has not
    reaped yet (a zombie) is not: its slot in PostgreSQL's arrays is free to reuse."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z" and int(fields[1]) == parent

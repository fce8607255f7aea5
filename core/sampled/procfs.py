"""What /proc says of PostgreSQL's processes: their parents and children."""

from __future__ import annotations

from pathlib import Path


def stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (which may hold spaces): state, ppid, ..."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


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


def is_child(pid: int, parent: int) -> bool:
    """Whether `pid` is a running child of `parent`. An exited child the parent has not
    reaped yet (a zombie) is not: its slot in PostgreSQL's arrays is free to reuse."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z" and int(fields[1]) == parent

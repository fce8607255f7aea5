"""What a statement source hands the pipeline: statements, and notices about backends.

Every kind of source (a BPF program, the sampler, a third party's) yields these, and
the collector turns them into events (enrichment.py). Times are Unix time in
nanoseconds (CLOCK_REALTIME): a source converts its own clock once, where it reads
it, and nothing downstream converts again.

Fields added later are trailing and have defaults, so a source written against an
earlier version keeps working: construct records by keyword.
"""

from __future__ import annotations

import enum
from typing import Any, Optional, Union

import msgspec


class BoundParameter(msgspec.Struct, frozen=True, gc=False):
    """One parameter value of an extended-protocol statement, as the client sent it."""

    value: Optional[bytes]  # None: SQL NULL
    binary: bool  # sent in binary format (shown as hex)
    cut: bool  # the copy ended inside this value


# msgspec structs, not dataclasses: at threshold 0 one is made per statement, and a
# frozen dataclass costs several times as much to create.
class RawStatement(msgspec.Struct, frozen=True, gc=False):
    """One statement at or over the threshold, as its source saw it."""

    start_unix_ns: int  # when it began: Unix time, ns
    duration_ns: int
    pid: int  # the backend that ran it
    query: str
    query_truncated: bool = False
    backend_exited: bool = False  # the backend ended before the statement did
    outcome: str = "unknown"  # "ok", "error", "cancelled", or "unknown"
    protocol: Optional[str] = None  # "simple" or "extended" where the source can tell
    application_name: str = ""
    # Known to a source that samples PostgreSQL's bookkeeping:
    duration_exact: bool = True  # False: the end is an upper bound
    query_id: Optional[int] = None  # pg_stat_statements.queryid
    waits: Optional[dict[str, int]] = None  # looks per wait event, "CPU" for none
    # Known to a source that sees the Bind message (extended protocol):
    statement_name: Optional[str] = None  # the prepared statement; "" for the unnamed one
    params: Optional[list[BoundParameter]] = None  # None: values were not captured
    # Why it was slow, where the source can tell (None: it cannot):
    blocked_by: Optional[list[dict[str, Any]]] = None  # see event.SlowQuery
    lock_wait_start_unix_ns: Optional[int] = None
    resources: Optional[dict[str, Optional[float]]] = None
    resources_exact: Optional[bool] = None
    # The pid PostgreSQL reports for the backend (its own pid namespace: a container's),
    # where the source knows it; None: the enricher finds it (or `pid` is that pid).
    own_pid: Optional[int] = None


class NoticeKind(enum.IntEnum):
    # The values are the kernel's record kinds (bpf/slow_query.h, enum record_kind).
    BACKEND_STARTED = 1  # a backend's first statement: read its process title now
    BACKEND_EXITED = 2  # that backend is gone: forget what was kept about it


class BackendNotice(msgspec.Struct, frozen=True, gc=False):
    """A backend came or went: the enricher reads (or forgets) who it runs for."""

    kind: NoticeKind
    pid: int


# What a source's reader decodes a record to.
# Union, not `|`: an alias is evaluated at import, and 3.9 has no `type | type`.
Record = Union[RawStatement, BackendNotice]

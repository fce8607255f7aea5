"""SlowQuery: the event every sink receives, and its JSON form (one object per line)."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Optional

import msgspec


def new_event_id() -> str:
    """A UUIDv7 (RFC 9562): the Unix time in milliseconds, then 74 random bits. Ids sort
    by when the daemon made the event (to the millisecond), and a batch a sink sends
    twice (a retry after a timeout that had landed) carries the same ids: a store keeps
    one row per id. Made for every event, so cheap: 1 µs, not uuid.UUID's 4."""
    random_bits = _random_bits(74)
    value = (
        time.time_ns() // 1_000_000 << 80
        | 0x7 << 76  # version 7
        | (random_bits >> 62) << 64
        | 0b10 << 62  # the RFC's variant
        | random_bits & (1 << 62) - 1
    )
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


# Not for secrets: ids need only be unique, and 74 bits a millisecond make a clash of
# two events unlikely across a fleet for ages. Seeded from os.urandom at import.
_random_bits = random.Random().getrandbits


# gc=False: an event refers only to strings, numbers, a datetime and a list of
# strings, never back to itself, so it cannot be part of a cycle; at threshold 0
# tens of thousands a second would otherwise keep the cycle collector busy. (A plan,
# lists and dicts that events of one fingerprint may share, never refers to one.)
class SlowQuery(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    id: str = msgspec.field(default_factory=new_event_id)  # made once, kept by every sink
    ts: datetime  # statement start, UTC
    duration_ms: float
    query: str
    query_truncated: bool
    # The backend as PostgreSQL reports it (pg_stat_activity.pid, its own log): in a
    # container, the pid in the container's namespace. None in the rare case of a
    # containerised backend gone before it could be read (host_pid still says).
    pid: Optional[int]
    user: Optional[str]  # from the backend's process title; None if it had exited
    database: Optional[str]
    client: Optional[str]  # "10.1.2.3(50312)" or "[local]"
    application_name: Optional[str] = None
    outcome: str = "ok"  # "ok", "error", "cancelled", or "unknown" where it cannot be told
    protocol: Optional[str] = None  # "simple" or "extended"
    statement_name: Optional[str] = None  # prepared statement, where the probe sees Bind
    params: Optional[list[Optional[str]]] = None  # bound values, with capture_params
    probe: str
    binary: str
    target: str = ""  # the [[target]]'s name
    host: Optional[str] = None  # [daemon] host: the machine's name unless set
    backend_exited: bool = False  # the backend ended before the statement did
    # False when the end is an upper bound (a sampled statement followed at once by
    # the next one, as in a pipeline); every trapped duration is exact.
    duration_exact: bool = True
    query_id: Optional[int] = None  # pg_stat_statements.queryid, where the definition reads it
    # What a sampled statement was doing at each look, as pg_stat_activity names it
    # ("Lock:transactionid", "Timeout:PgSleep", ...) or "CPU" -> number of looks. None
    # for trapped statements.
    waits: Optional[dict[str, int]] = None
    # Who blocked it, when it waited on a heavyweight lock: the direct blockers first,
    # then theirs, to the chain's roots (docs/how-it-works.md has the fields). [] when it
    # was seen and never waited on a lock; None when the definition cannot tell.
    blocked_by: Optional[list[dict[str, Any]]] = None
    lock_wait_start: Optional[datetime] = None  # when its last lock wait began (14+)
    # What it read and wrote: buffer, WAL, CPU and I/O figures; None where unknown.
    resources: Optional[dict[str, Optional[float]]] = None
    # False: the figures run from the first look that saw the statement to the look
    # that saw its end, not from its start to its end (docs/why.md). None with
    # `resources`.
    resources_exact: Optional[bool] = None
    # pglast's fingerprint of the text: equal for texts that differ only in constants
    # (query_id is null unless compute_query_id is on). None if the text does not parse.
    fingerprint: Optional[str] = None
    # With [explain]: EXPLAIN (FORMAT JSON)'s result as PostgreSQL returns it (a list of
    # one object with "Plan"), or why there is none (docs/explain.md).
    plan: Optional[list[dict[str, Any]]] = None
    plan_error: Optional[str] = None
    # Where it ran: the backend's pid on the host (the same as pid outside containers),
    # and for a server in a container (a containers = true target) the container as
    # its runtime names it ("docker://<id>", "containerd://<id>", "machine://<name>",
    # or "pidns://<inode>"), the pod's uid under Kubernetes, and the container's
    # /etc/hostname.
    host_pid: Optional[int] = None
    container: Optional[str] = None
    pod_uid: Optional[str] = None
    container_hostname: Optional[str] = None

    def to_json(self) -> bytes:
        return terminal_safe(_encoder.encode(self))


def json_lines(events: Sequence[SlowQuery]) -> bytes:
    """Each event's to_json() followed by a newline, encoded in one call (file sink)."""
    return terminal_safe(_encoder.encode_lines(events))


def terminal_safe(encoded: bytes) -> bytes:
    # JSON escapes only C0 controls; DEL and C1 controls (UTF-8 \xc2\x80-\x9f) can
    # still steer a terminal that shows the line (`tail -f`). Both are rare: look first.
    if b"\x7f" in encoded or b"\xc2" in encoded:
        encoded = _TERMINAL_CONTROLS.sub(_json_escape, encoded)
    return encoded


_encoder = msgspec.json.Encoder()
_TERMINAL_CONTROLS = re.compile(b"\x7f|\xc2[\x80-\x9f]")


def _json_escape(match: re.Match[bytes]) -> bytes:
    return b"\\u%04x" % ord(match.group().decode())

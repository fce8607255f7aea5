"""RawStatement -> SlowQuery: who ran it, from the process title, and its bound values.

A client backend's title reads
    postgres: [cluster_name: ]user database client activity
(walsenders put "walsender" first; other processes have no client field). A short
connection is often gone by the time its slow statement is decoded, so the title is
read when the kernel announces a pid's first statement (BACKEND_STARTED) and kept
until it announces the exit. A backend whose title could never be read is still
reported, with user, database and client None.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

from pgslowlog.compat import SLOTS
from pgslowlog.containers import ContainerServer, inner_pid
from pgslowlog.event import SlowQuery
from pgslowlog.explain import OWN_PIDS as EXPLAIN_PIDS
from pgslowlog.explain.statements import fingerprint
from pgslowlog.records import BackendNotice, BoundParameter, NoticeKind, RawStatement
from pgslowlog.redaction import redact_literals, redact_parameters

_CLIENT = re.compile(r"^(\[local\]|\S+\(\d+\))$")


@dataclass(frozen=True, **SLOTS)
class BackendIdentity:
    """Who a backend runs for, as its process title says."""

    kind: str  # "client", "walsender" or "background"
    user: str | None = None
    database: str | None = None
    client: str | None = None
    own_pid: int | None = None  # PostgreSQL's pid for it, in a container's namespace


BACKGROUND = BackendIdentity(kind="background")


def parse_process_title(title: str) -> BackendIdentity:
    if not title.startswith("postgres: "):
        return BACKGROUND
    words = title[len("postgres: ") :].split(" ")
    index = next((i for i, word in enumerate(words) if _CLIENT.match(word)), None)
    if index is None:
        return BACKGROUND  # autovacuum, checkpointer, background workers...
    before = words[:index]
    if before and before[0].endswith(":") and len(before) > 2:
        before = before[1:]  # cluster_name prefix, for example "15/main:"
    if before and before[0] == "walsender" and len(before) in (2, 3):
        return BackendIdentity(
            "walsender", before[1], before[2] if len(before) == 3 else None, words[index]
        )
    if len(before) == 2:
        return BackendIdentity("client", before[0], before[1], words[index])
    return BACKGROUND


def read_process_title(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            raw = file.read(4096)
    except OSError:
        return None
    # PostgreSQL overwrites argv in place and pads with NULs.
    return raw.split(b"\0", 1)[0].decode(errors="replace") or None


def format_parameter(parameter: BoundParameter, max_length: int) -> str | None:
    """As PostgreSQL logs it: text as is, binary as hex; cut values end in "..."."""
    if parameter.value is None:
        return None
    raw = parameter.value
    cut = parameter.cut or len(raw) > max_length
    raw = raw[:max_length]
    text = (
        "\\x" + raw.hex() if parameter.binary else raw.decode(errors="ignore" if cut else "replace")
    )
    return text + "..." if cut else text


class Enricher:
    def __init__(
        self,
        probe: str,
        binary: str,
        target: str,
        include_background: bool,
        max_backends: int,
        params_max_length: int = 1024,
        redact: bool = False,
        server: ContainerServer | None = None,
        foreign: bool = False,
        host: str | None = None,
    ) -> None:
        self.probe = probe
        self.host = host
        # A server in another pid namespace (a container's instance, or a `pid =` target
        # naming one): its backends' pids are mapped to its own (NSpid). A container's
        # instance's events also say which container.
        self.foreign = foreign or server is not None
        self.container = server.container if server is not None else None
        self.container_hostname = server.hostname if server is not None else None
        self.binary = binary
        self.target = target
        self.params_max_length = params_max_length
        self.redact = redact
        self.include_background = include_background
        self.filtered = 0
        self.own = 0  # the daemon's own EXPLAIN statements, never reported
        # pid -> who it runs for, oldest first. Bounded in case exit notices were lost.
        self._backends: dict[int, BackendIdentity] = {}
        self._max_cached = 2 * max_backends

    def note(self, notice: BackendNotice) -> None:
        if notice.kind == NoticeKind.BACKEND_EXITED:
            self._backends.pop(notice.pid, None)
        else:
            self._lookup(notice.pid)

    def _lookup(self, pid: int) -> BackendIdentity | None:
        """Read the pid's process title now, and remember what it says."""
        title = read_process_title(pid)
        if title is None:
            return None
        backend = parse_process_title(title)
        if self.foreign:
            backend = replace(backend, own_pid=inner_pid(pid))
        self._backends.pop(pid, None)
        self._backends[pid] = backend
        if len(self._backends) > self._max_cached:
            del self._backends[next(iter(self._backends))]
        return backend

    def _params(self, params: list[BoundParameter] | None) -> list[str | None] | None:
        if params is None or self.params_max_length == 0:
            return None  # 0 logs none, as log_parameter_max_length = 0 does
        values = [format_parameter(p, self.params_max_length) for p in params]
        return redact_parameters(values) if self.redact else values

    def enrich(self, raw: RawStatement) -> SlowQuery | None:
        """The event, or None for a non-client process when those are not wanted, and
        for the daemon's own EXPLAIN connections (explain/)."""
        backend = self._backends.get(raw.pid) or self._lookup(raw.pid)
        pid = self._own_pid(raw, backend)
        # pg_backend_pid() of its connections, which reach only servers of our own pid
        # namespace (explain/servers.py): no other server's pids are compared.
        if not self.foreign and pid in EXPLAIN_PIDS:
            self.own += 1
            return None
        if backend is not None and backend.kind != "client" and not self.include_background:
            self.filtered += 1
            return None
        return SlowQuery(
            ts=datetime.fromtimestamp(raw.start_unix_ns / 1e9, timezone.utc),
            duration_ms=raw.duration_ns / 1e6,
            query=redact_literals(raw.query) if self.redact else raw.query,
            query_truncated=raw.query_truncated,
            pid=pid,
            user=backend.user if backend else None,
            database=backend.database if backend else None,
            client=backend.client if backend else None,
            application_name=raw.application_name or None,
            outcome=raw.outcome,
            protocol=raw.protocol,
            statement_name=raw.statement_name or None,
            params=self._params(raw.params),
            probe=self.probe,
            binary=self.binary,
            target=self.target,
            host=self.host,
            backend_exited=raw.backend_exited,
            duration_exact=raw.duration_exact,
            query_id=raw.query_id,
            waits=raw.waits,
            blocked_by=self._blockers(raw.blocked_by),
            lock_wait_start=_timestamp(raw.lock_wait_start_unix_ns),
            resources=raw.resources,
            resources_exact=raw.resources_exact,
            fingerprint=fingerprint(raw.query),
            host_pid=raw.pid,
            container=self.container.name if self.container else None,
            pod_uid=self.container.pod_uid if self.container else None,
            container_hostname=self.container_hostname,
        )

    def _own_pid(self, raw: RawStatement, backend: BackendIdentity | None) -> int | None:
        """PostgreSQL's pid for the backend: the host's, outside containers."""
        if raw.own_pid is not None:
            return raw.own_pid
        if not self.foreign:
            return raw.pid
        if backend is not None and backend.own_pid is not None:
            return backend.own_pid
        return inner_pid(raw.pid)  # read at its first statement; gone since: None

    def _blockers(self, blockers: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        """A blocker's statement is query text like any other: redacted the same way."""
        if not self.redact or not blockers:
            return blockers
        return [
            {**entry, "query": redact_literals(entry["query"])} if entry.get("query") else entry
            for entry in blockers
        ]


def _timestamp(unix_ns: int | None) -> datetime | None:
    return None if unix_ns is None else datetime.fromtimestamp(unix_ns / 1e9, timezone.utc)

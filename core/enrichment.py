"""RawStatement -> SlowQuery: wall-clock time, and who ran it from the process title.

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
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from pgslowlog.compat import SLOTS
from pgslowlog.decoder import BackendNotice, BindMessage, BoundParameter, RawStatement, RecordKind
from pgslowlog.event import SlowQuery
from pgslowlog.redaction import redact_literals, redact_parameters

_CLIENT = re.compile(r"^(\[local\]|\S+\(\d+\))$")


@dataclass(frozen=True, **SLOTS)
class Backend:
    kind: str  # "client", "walsender" or "background"
    user: str | None = None
    database: str | None = None
    client: str | None = None


BACKGROUND = Backend(kind="background")


def parse_process_title(title: str) -> Backend:
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
        return Backend(
            "walsender", before[1], before[2] if len(before) == 3 else None, words[index]
        )
    if len(before) == 2:
        return Backend("client", before[0], before[1], words[index])
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
    ) -> None:
        self.probe = probe
        self.binary = binary
        self.target = target
        self.params_max_length = params_max_length
        self.redact = redact
        # pid -> the Bind message sent just before that pid's statement record
        self._binds: dict[int, BindMessage] = {}
        self.include_background = include_background
        self.filtered = 0
        self._clock_offset_ns = 0
        # pid -> Backend, oldest first. Bounded in case exit notices were lost.
        self._backends: dict[int, Backend] = {}
        self._max_cached = 2 * max_backends

    def note_bind(self, bind: BindMessage) -> None:
        self._binds.pop(bind.pid, None)
        self._binds[bind.pid] = bind
        if len(self._binds) > self._max_cached:  # exit notices lost too: forget the oldest
            del self._binds[next(iter(self._binds))]

    def note(self, notice: BackendNotice) -> None:
        if notice.kind == RecordKind.BACKEND_EXITED:
            self._backends.pop(notice.pid, None)
            self._binds.pop(notice.pid, None)  # a Bind whose statement never came
        else:
            self._lookup(notice.pid)

    def _lookup(self, pid: int) -> Backend | None:
        """Read the pid's process title now, and remember what it says."""
        title = read_process_title(pid)
        if title is None:
            return None
        backend = parse_process_title(title)
        self._backends.pop(pid, None)
        self._backends[pid] = backend
        if len(self._backends) > self._max_cached:
            del self._backends[next(iter(self._backends))]
        return backend

    def _params(self, bind: BindMessage | None) -> list[str | None] | None:
        if bind is None or bind.params is None or self.params_max_length == 0:
            return None  # 0 logs none, as log_parameter_max_length = 0 does
        params = [format_parameter(p, self.params_max_length) for p in bind.params]
        return redact_parameters(params) if self.redact else params

    def sync_clock(self) -> None:
        """Offset from CLOCK_MONOTONIC (bpf_ktime_get_ns) to wall time, once per batch."""
        self._clock_offset_ns = time.time_ns() - time.monotonic_ns()

    def enrich(self, raw: RawStatement) -> SlowQuery | None:
        """The event, or None for a non-client process when those are not wanted."""
        bind = self._binds.pop(raw.pid, None) if self._binds else None
        if bind is not None and bind.start_ns != raw.start_ns:
            bind = None  # left over from a statement whose record was lost
        backend = self._backends.get(raw.pid) or self._lookup(raw.pid)
        if backend is not None and backend.kind != "client" and not self.include_background:
            self.filtered += 1
            return None
        start = datetime.fromtimestamp((raw.start_ns + self._clock_offset_ns) / 1e9, timezone.utc)
        return SlowQuery(
            ts=start,
            duration_ms=raw.duration_ns / 1e6,
            query=redact_literals(raw.query) if self.redact else raw.query,
            query_truncated=raw.query_truncated,
            pid=raw.pid,
            user=backend.user if backend else None,
            database=backend.database if backend else None,
            client=backend.client if backend else None,
            application_name=raw.application_name or None,
            outcome=raw.outcome,
            protocol=raw.protocol,
            statement_name=(bind.statement or None) if bind else None,
            params=self._params(bind),
            probe=self.probe,
            binary=self.binary,
            target=self.target,
            backend_exited=raw.backend_exited,
            duration_exact=raw.duration_exact,
            query_id=raw.query_id,
            waits=raw.waits,
        )

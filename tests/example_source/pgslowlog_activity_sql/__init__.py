"""Example third-party probe definition that is not a BPF program: pg_stat_activity over SQL.

[[target]]
binary = "/usr/lib/postgresql/15/bin/postgres"
probes = ["activity_sql"]

Its source connects to each cluster that runs the target's binary (found in /proc; the
socket and port come from the cluster's postmaster.pid) as the `postgres` role, asks
pg_stat_activity every 20 ms, and reports a statement when its backend shows it over:
no longer active, with the same query_start, ended at state_change. A statement that
begins and ends between two looks is not seen, nor one whose backend went first, so
this is an example of the interface, not a rival to `sampled`. It needs a role that may
read every backend's pg_stat_activity row (trust or peer authentication for root), and
sees the clusters running when it attaches.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional

import psycopg

from pgslowlog import (
    BackendNotice,
    DaemonConfig,
    NoticeKind,
    ProbeDefinition,
    ProbeLoadError,
    RawStatement,
    Record,
    RegisterProbe,
    Target,
    hookimpl,
)

LOOK_INTERVAL_S = 0.02
ACTIVITY = """
    select pid, state = 'active', query, application_name,
           (extract(epoch from query_start) * 1000000)::bigint,
           (extract(epoch from state_change) * 1000000)::bigint
    from pg_stat_activity
    where backend_type = 'client backend' and pid <> pg_backend_pid() and query_start is not null
"""


def postmasters(target: Target) -> list[int]:
    """Pids of the processes running the target's binary whose parent does not."""
    identity = target.file.identity
    running = set()
    for entry in os.listdir("/proc"):
        try:
            status = os.stat(f"/proc/{entry}/exe") if entry.isdigit() else None
        except OSError:
            continue
        if status is not None and (status.st_dev, status.st_ino) == (
            identity.device,
            identity.inode,
        ):
            running.add(int(entry))
    parents = {}
    for pid in running:
        stat = Path(f"/proc/{pid}/stat").read_text()
        parents[pid] = int(stat[stat.rindex(")") + 2 :].split()[1])
    return sorted(pid for pid in running if parents[pid] not in running)


def connection_string(postmaster: int) -> str:
    """From postmaster.pid in the data directory (the postmaster's working directory):
    line 4 is the port, line 5 the socket directory."""
    lines = Path(f"/proc/{postmaster}/cwd/postmaster.pid").read_text().splitlines()
    return f"host={lines[4]} port={lines[3]} user=postgres dbname=postgres"


class ActivityOverSql:
    """The StatementSource, and its own RecordReader (the collector's thread looks)."""

    def __init__(self, target: Target, daemon: DaemonConfig) -> None:
        self._target = target
        self._threshold_us = round(daemon.threshold_ms * 1000)
        self._connections: list[psycopg.Connection[Any]] = []
        # pid -> (query_start in Unix microseconds, query, application_name) while active
        self._running: dict[int, tuple[int, str, str]] = {}
        self._seen: set[int] = set()  # backends announced to the pipeline
        self._counts = dict.fromkeys(("statements", "emitted"), 0)
        self._pending: list[Record] = []  # made by a look, beyond what `read` was asked for
        self._next_look = 0.0
        self._final_look = False

    # StatementSource
    @property
    def attached_count(self) -> int:
        return len(self._connections)

    def describe(self) -> dict[str, object]:
        return {"connections": len(self._connections)}

    def attach(self) -> None:
        try:
            for postmaster in postmasters(self._target):
                self._connections.append(
                    psycopg.connect(connection_string(postmaster), autocommit=True)
                )
        except (OSError, IndexError, psycopg.Error) as error:
            self.close()
            raise ProbeLoadError(f"activity_sql cannot connect: {error}") from None
        if not self._connections:
            raise ProbeLoadError(f"activity_sql: no PostgreSQL runs {self._target.binary.path}")

    def reader(self) -> ActivityOverSql:
        return self

    def set_threshold_ns(self, threshold_ns: int) -> None:
        self._threshold_us = threshold_ns // 1000

    def tick(self) -> None:
        pass

    def counters(self) -> dict[str, int]:
        return dict(self._counts)  # what it cannot know (COUNTERS' others) it leaves out

    def detach(self) -> None:
        self._final_look = bool(self._connections)

    def close(self) -> None:
        for connection in self._connections:
            connection.close()
        self._connections.clear()

    # RecordReader
    def wait(self, timeout_ms: int) -> None:
        time.sleep(max(0.0, min(self._next_look - time.monotonic(), timeout_ms / 1000)))

    def read(self, limit: int) -> list[Record]:
        if not self._pending and (time.monotonic() >= self._next_look or self._final_look):
            self._final_look = False
            self._next_look = time.monotonic() + LOOK_INTERVAL_S
            rows = []
            for connection in self._connections:
                if not connection.closed:
                    rows += connection.execute(ACTIVITY).fetchall()
            self._pending = self._records(rows)
        taken, self._pending = self._pending[:limit], self._pending[limit:]
        return taken

    def decode(self, record: Record) -> Optional[Record]:
        return record  # made as records already

    def _records(self, rows: list[tuple[Any, ...]]) -> list[Record]:
        records: list[Record] = []
        present = set()
        for pid, active, query, application_name, start_us, change_us in rows:
            present.add(pid)
            if pid not in self._seen:
                self._seen.add(pid)
                records.append(BackendNotice(NoticeKind.BACKEND_STARTED, pid))
            running = self._running.get(pid)
            if running is not None and (not active or running[0] != start_us):
                del self._running[pid]
                ended = change_us if running[0] == start_us else start_us
                records += self._ended(pid, running, ended)
            if active and pid not in self._running:
                self._running[pid] = (start_us, query, application_name or "")
        for pid in self._seen - present:
            self._seen.discard(pid)
            self._running.pop(pid, None)
            records.append(BackendNotice(NoticeKind.BACKEND_EXITED, pid))
        return records

    def _ended(self, pid: int, running: tuple[int, str, str], end_us: int) -> list[Record]:
        start_us, query, application_name = running
        self._counts["statements"] += 1
        if end_us - start_us < self._threshold_us:
            return []
        self._counts["emitted"] += 1
        return [
            RawStatement(
                start_unix_ns=start_us * 1000,
                duration_ns=(end_us - start_us) * 1000,
                pid=pid,
                query=query,
                application_name=application_name,
            )
        ]


def open_activity_sql(
    definition: ProbeDefinition, target: Target, daemon: DaemonConfig
) -> ActivityOverSql:
    return ActivityOverSql(target, daemon)


ACTIVITY_SQL = ProbeDefinition(
    name="activity_sql",
    description="pg_stat_activity asked over SQL every 20 ms (an example; misses short statements)",
    open=open_activity_sql,
    automatic=False,
)


@hookimpl
def pgslowlog_register_probes(register: RegisterProbe) -> None:
    register(ACTIVITY_SQL)

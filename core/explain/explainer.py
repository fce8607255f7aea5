"""The Explainer: plans for slow statements, over the daemon's own connections.

It stands between the collectors and the dispatcher (it has the dispatcher's
`dispatch_many`). A batch whose events need no plan goes straight on, unless
batches wait ahead of it: order is kept. An event that needs one waits, in its
batch, until the plan is in or `timeout_ms` has passed; a thread of its own (the
deliverer) hands batches on at their deadline, so a collector thread never waits on
PostgreSQL. One worker thread runs the EXPLAINs, one at a time, over a connection
per (server, database), kept open.

What reaches the server, and nothing else, each through the extended protocol (one
statement per Parse: a text holding `COMMIT; ...` fails to parse there):

    BEGIN READ ONLY
    SET LOCAL statement_timeout = ...; SET LOCAL lock_timeout = ...
    EXPLAIN (FORMAT JSON) <text>                           no $n, or real values bound
    -- or, for a text with $n and no values (a generic plan):
    DEALLOCATE pgslowlog_explain                           only after an earlier failure
    PREPARE pgslowlog_explain AS <text>
    SET LOCAL plan_cache_mode = force_generic_plan
    SET LOCAL enable_partition_pruning = off
    EXPLAIN (FORMAT JSON) EXECUTE pgslowlog_explain(NULL, ...)
    DEALLOCATE pgslowlog_explain
    ROLLBACK

Never ANALYZE: nothing is executed. Why not `EXPLAIN (GENERIC_PLAN)` on 16+: over
the extended protocol the server counts the text's $n as the EXPLAIN's own
parameters and wants a value for each in Bind, and values bound there are planned
with as constants (a NULL made PostgreSQL 18 plan `id = $1` as a one-time false
Result). PREPARE's parameters belong to the prepared statement instead, so the same
path serves 13-18. Its NULLs would let run-time partition pruning remove every
partition from the plan shown (Subplans Removed: all): pruning is off for it, so the
partitions show as GENERIC_PLAN shows them.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple, Optional, Union

import msgspec
from psycopg import pq
from psycopg.conninfo import make_conninfo
from psycopg.pq.abc import PGconn, PGresult

from pgslowlog.config import ExplainConfig
from pgslowlog.dispatcher import HandsEventsOn
from pgslowlog.event import SlowQuery
from pgslowlog.explain import APPLICATION_NAME, OWN_PIDS
from pgslowlog.explain.servers import Server, only_server_of, parent_pid, server_of
from pgslowlog.explain.statements import Plannable, plannable
from pgslowlog.log import get_logger
from pgslowlog.redaction import REDACTED_PARAMETER

log = get_logger(__name__)
STATEMENT_NAME = "pgslowlog_explain"
MAX_CONNECTIONS = 8  # kept open at once; the least recently used is closed beyond
RECONNECT_AFTER_S = 10.0  # after a failed connection, its events fail fast this long
MAX_REMEMBERED = 10_000  # (server, database, fingerprint) results kept for the interval
ONLY_SERVER_FOR_S = 5.0  # how long "the one server of a binary" is believed


class ExplainFailed(Exception):
    """No plan: the message is the event's plan_error."""


class _Request:
    """One EXPLAIN, shared by the events of its (server, database, fingerprint) that
    come while it is pending or within per_fingerprint_interval_s."""

    __slots__ = (
        *("database", "done", "error", "finished_at"),
        *("plan", "server", "statement", "values"),
    )

    def __init__(
        self,
        server: Server,
        database: str,
        statement: Optional[Plannable],  # None: a _Naming
        values: Optional[list[Optional[bytes]]],
    ) -> None:
        self.server = server
        self.database = database
        self.statement = statement
        self.values = values
        self.done = False
        self.plan: Optional[list[dict[str, Any]]] = None
        self.error: Optional[str] = None
        self.finished_at = 0.0


class _Naming(_Request):
    """The relations of one event's blockers, named over the connection to its
    database: EXPLAIN (VERBOSE) of their regclass constants shows each by its name, and
    runs nothing (the connection runs nothing but EXPLAIN and SET LOCAL here too)."""

    __slots__ = ("names", "oids")

    def __init__(self, server: Server, database: str, oids: tuple[int, ...]) -> None:
        super().__init__(server, database, None, None)
        self.oids = oids
        self.names: dict[int, str] = {}


class _Batch(NamedTuple):
    events: list[SlowQuery]
    waiting: list[tuple[int, _Request]]  # (index in events, its request)
    deadline: float


def first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip()


# Why a connection failed, from libpq's message (the server's English text), and the fix.
_CONNECT_CAUSES = (
    ("does not exist", "role", "create the role (docs/explain.md) or set explain.user"),
    ("password authentication failed", "authentication", "correct explain.passfile"),
    ("no password supplied", "authentication", "set explain.passfile, or allow peer"),
    ("peer authentication failed", "authentication", "map the daemon's OS user in pg_ident"),
    ("permission denied for database", "database", "GRANT CONNECT ON DATABASE ... TO the role"),
    ("too many clients", "max_connections", "raise max_connections or lower the load"),
    ("connection slots are reserved", "max_connections", "raise max_connections"),
    ("pg_hba.conf", "pg_hba", "allow the role in pg_hba.conf (docs/explain.md)"),
)


def connect_cause(message: str) -> tuple[str, str]:
    lowered = message.lower()
    if 'database "' in lowered and "does not exist" in lowered:
        return "database", "the event's database is gone, or the role may not see it"
    for needle, cause, fix in _CONNECT_CAUSES:
        if needle in lowered:
            return cause, fix
    return "connection", "check that the server runs and accepts the role (docs/explain.md)"


def fatal_line(message: str) -> str:
    """libpq's message cut to the server's own words: 'FATAL:  role "x" does not exist'."""
    line = message
    for marker in ("FATAL:  ", "ERROR:  "):
        if marker in line:
            line = line[line.index(marker) + len(marker) :]
            break
    return first_line(line)


class Explainer:
    def __init__(
        self,
        config: ExplainConfig,
        dispatcher: HandsEventsOn,
        redact_literals: bool = False,
    ) -> None:
        self.config = config
        self._dispatcher = dispatcher
        self._redact = redact_literals
        self._timeout_s = config.timeout_ms / 1000
        self._changed = threading.Condition()
        self._held: deque[_Batch] = deque()
        self._queue: deque[_Request] = deque()
        self._recent: OrderedDict[tuple[str, int, str, str], _Request] = OrderedDict()
        self._tokens = max(1.0, config.max_per_second)
        self._refilled = time.monotonic()
        self._postmasters: dict[int, Server] = {}
        self._only: dict[str, tuple[float, Union[Server, str]]] = {}  # binary -> until, server
        self._closing = False
        self._stopping = False
        self.stats = {
            "explained": 0,  # EXPLAINs that gave a plan
            "failed": 0,  # EXPLAINs that gave an error (connecting included)
            "shared": 0,  # events that got an earlier EXPLAIN's result
            "not_plannable": 0,
            "rate_limited": 0,
            "queue_full": 0,
            "timed_out": 0,  # events that went on without waiting longer
            "relations_named": 0,  # lookups of blockers' relation names (EXPLAIN VERBOSE)
        }
        # (host, port, database, relation oid) -> its name, as the explain role sees it
        self._names: OrderedDict[tuple[str, int, str, int], str] = OrderedDict()
        # Touched by the worker thread only:
        self._connections: OrderedDict[tuple[str, int, str], PGconn] = OrderedDict()
        self._refused: dict[tuple[str, int, str], tuple[float, str]] = {}
        self._warned: set[str] = set()
        self._leftover: set[tuple[str, int, str]] = set()  # connections with our PREPARE
        self._worker = threading.Thread(target=self._work, name="explain-worker", daemon=True)
        self._deliverer = threading.Thread(
            target=self._deliver, name="explain-deliverer", daemon=True
        )

    def start(self) -> Explainer:
        self._worker.start()
        self._deliverer.start()
        return self

    # ---------------------------------------------------------------- collector side

    def dispatch_many(self, events: list[SlowQuery]) -> None:
        """Called by the collectors; never waits on PostgreSQL."""
        now = time.monotonic()
        with self._changed:
            out = list(events)
            waiting: list[tuple[int, _Request]] = []
            for index, event in enumerate(out):
                try:
                    decided = self._decide(event, now)
                except Exception as error:  # a bug must never cost the event
                    log.exception("explain_decision_failed")
                    decided = msgspec.structs.replace(
                        event, plan_error=f"not explained: {type(error).__name__}"
                    )
                if isinstance(decided, _Request):
                    waiting.append((index, decided))
                else:
                    out[index] = decided
                try:
                    named = self._name_relations(out[index])
                except Exception:  # a bug must never cost the event
                    log.exception("explain_naming_failed")
                    named = None
                if isinstance(named, _Naming):
                    waiting.append((index, named))
                elif named is not None:
                    out[index] = named
            if not waiting and not self._held:
                self._dispatcher.dispatch_many(out)  # under the lock: order is kept
                return
            self._held.append(_Batch(out, waiting, now + self._timeout_s))
            self._changed.notify_all()

    def _decide(self, event: SlowQuery, now: float) -> Union[SlowQuery, _Request]:
        """The event settled (plan_error, or an earlier plan), or the request it waits for."""
        if event.database is None:
            return msgspec.structs.replace(
                event,
                plan_error="not explained: the backend's database is unknown "
                "(it exited before its process title was read)",
            )
        # A fingerprint seen within the interval shares its result, before any parsing.
        # (A cut text, or one with a NUL, is fingerprinted by what comes before: not that.)
        fingerprint = event.fingerprint
        if event.query_truncated or "\0" in event.query:
            fingerprint = None
        server = None
        if fingerprint is not None:
            try:
                server = self._server(event)
            except ValueError:
                pass  # said below, if the text is plannable
            if server is not None:
                shared = self._shared(server, event, fingerprint, now)
                if shared is not None:
                    return shared
        statement = plannable(event.query, event.query_truncated)
        if isinstance(statement, str):
            self.stats["not_plannable"] += 1
            return msgspec.structs.replace(event, plan_error=statement)
        if server is None:
            try:
                server = self._server(event)
            except ValueError as error:
                return msgspec.structs.replace(event, plan_error=f"not explained: {error}")
        key = (server.host, server.port, event.database, fingerprint or statement.text)
        if fingerprint is None:
            shared = self._shared(server, event, statement.text, now)
            if shared is not None:
                return shared
        self._tokens = min(
            max(1.0, self.config.max_per_second),
            self._tokens + (now - self._refilled) * self.config.max_per_second,
        )
        self._refilled = now
        if self._tokens < 1:
            self.stats["rate_limited"] += 1
            return msgspec.structs.replace(
                event, plan_error="not explained: explain.max_per_second was reached"
            )
        if len(self._queue) >= self.config.queue_size:
            self.stats["queue_full"] += 1
            return msgspec.structs.replace(
                event, plan_error="not explained: the explain queue was full (explain.queue_size)"
            )
        self._tokens -= 1
        request = _Request(server, event.database, statement, self._values(event, statement))
        self._queue.append(request)
        self._recent.pop(key, None)
        self._recent[key] = request
        while len(self._recent) > MAX_REMEMBERED:
            self._recent.popitem(last=False)
        return request

    def _name_relations(self, event: SlowQuery) -> Union[SlowQuery, _Naming, None]:
        """The event with its blockers' relations named from what is known, or the
        lookup it waits for; None when there is nothing to name (or no way to)."""
        oids = {
            entry["lock"]["relation"]
            for entry in event.blocked_by or ()
            if isinstance(entry.get("lock"), dict) and "relation" in entry["lock"]
        }
        if not oids or event.database is None:
            return None
        try:
            server = self._server(event)
        except ValueError:
            return None
        key = (server.host, server.port, event.database)
        known = {oid: name for oid in oids if (name := self._names.get((*key, oid)))}
        missing = tuple(sorted(oids - set(known)))
        if not missing:
            return _with_names(event, known)
        if len(self._queue) >= self.config.queue_size:
            return None  # named by oid only: the queue is the plans' first
        naming = _Naming(server, event.database, missing)
        naming.names.update(known)
        self._queue.append(naming)
        return naming

    def _shared(
        self, server: Server, event: SlowQuery, key_text: str, now: float
    ) -> Union[SlowQuery, _Request, None]:
        """The earlier request of this key, pending or fresh, as _decide returns it."""
        assert event.database is not None
        earlier = self._recent.get((server.host, server.port, event.database, key_text))
        if earlier is None:
            return None
        if earlier.done and now - earlier.finished_at >= self.config.per_fingerprint_interval_s:
            return None
        self.stats["shared"] += 1
        if not earlier.done:
            return earlier
        return msgspec.structs.replace(event, plan=earlier.plan, plan_error=earlier.error)

    def _server(self, event: SlowQuery) -> Server:
        host_pid = event.host_pid if event.host_pid is not None else event.pid
        assert host_pid is not None  # the enricher always sets host_pid
        postmaster = parent_pid(host_pid)
        server = self._postmasters.get(postmaster) if postmaster is not None else None
        if server is not None:
            return server
        try:
            server = server_of(host_pid)
        except ValueError as error:
            # A short connection is often gone by now: the one server of its binary.
            try:
                server = self._only_server(event.binary)
            except ValueError as why:
                raise ValueError(f"{error}, and {why}") from None
        if len(self._postmasters) > 64:
            self._postmasters.clear()
        self._postmasters[server.postmaster] = server
        return server

    def _only_server(self, binary: str) -> Server:
        """only_server_of, remembered a few seconds: it reads every process's exe."""
        now = time.monotonic()
        known = self._only.get(binary)
        if known is None or now >= known[0]:
            try:
                known = (now + ONLY_SERVER_FOR_S, only_server_of(binary))
            except ValueError as error:
                known = (now + ONLY_SERVER_FOR_S, str(error))
            self._only[binary] = known
        if isinstance(known[1], str):
            raise ValueError(known[1])
        return known[1]

    def _values(self, event: SlowQuery, statement: Plannable) -> Optional[list[Optional[bytes]]]:
        """The captured values, where they are whole and the text has no other $n; else
        None (a generic plan). A binary value is shown as \\x hex and a cut one ends in
        "...": either could not be sent back as it was, so neither is."""
        params = event.params
        if self._redact or params is None or statement.text != event.query:
            return None
        if len(params) != statement.parameters or statement.parameters == 0:
            return None
        for value in params:
            if value is not None and (
                value.startswith("\\x") or value.endswith("...") or value == REDACTED_PARAMETER
            ):
                return None
        return [None if value is None else value.encode() for value in params]

    # ---------------------------------------------------------------- deliverer

    def _deliver(self) -> None:
        with self._changed:
            while True:
                now = time.monotonic()
                while self._held and (
                    now >= self._held[0].deadline
                    or all(request.done for _, request in self._held[0].waiting)
                ):
                    self._hand_on(self._held.popleft())
                if self._closing and not self._held:
                    return
                timeout = self._held[0].deadline - now if self._held else None
                self._changed.wait(timeout)

    def _hand_on(self, batch: _Batch) -> None:
        events = batch.events
        for index, request in batch.waiting:
            if isinstance(request, _Naming):
                if request.names:  # else: by oid only, as without [explain]
                    events[index] = _with_names(events[index], request.names)
                continue
            if request.done:
                events[index] = msgspec.structs.replace(
                    events[index], plan=request.plan, plan_error=request.error
                )
            else:
                self.stats["timed_out"] += 1
                events[index] = msgspec.structs.replace(
                    events[index],
                    plan_error=f"no plan within explain.timeout_ms ({self.config.timeout_ms} ms)",
                )
        try:
            self._dispatcher.dispatch_many(events)
        except Exception:  # the dispatcher's own errors must not stop delivery
            log.exception("explain_delivery_failed", events=len(events))

    # ---------------------------------------------------------------- worker

    def _work(self) -> None:
        try:
            while True:
                with self._changed:
                    self._changed.wait_for(lambda: self._queue or self._stopping)
                    if self._stopping:
                        return
                    request = self._queue.popleft()
                    if self._too_late(request):
                        continue
                try:
                    plan: Optional[list[dict[str, Any]]] = None
                    if isinstance(request, _Naming):
                        request.names.update(self._name(request))
                    else:
                        plan = self._explain(request)
                    error = None
                except ExplainFailed as failure:
                    plan, error = None, str(failure)
                except Exception as failure:  # a bug must not stop the worker
                    log.exception("explain_failed")
                    plan, error = None, f"not explained: {type(failure).__name__}"
                with self._changed:
                    request.plan, request.error, request.done = plan, error, True
                    request.finished_at = time.monotonic()
                    if isinstance(request, _Naming):
                        self._remember_names(request)
                    else:
                        self.stats["explained" if error is None else "failed"] += 1
                    self._changed.notify_all()
        finally:
            for connection in self._connections.values():
                _finish(connection)
            self._connections.clear()

    def _too_late(self, request: _Request) -> bool:
        """Every event waiting for it has gone on already: no EXPLAIN for nobody."""
        waited = any(request is waiting for batch in self._held for _, waiting in batch.waiting)
        if not waited:
            # Nobody holds it: forget it, so the next event of its key asks again.
            for key, remembered in list(self._recent.items()):
                if remembered is request:
                    del self._recent[key]
        return not waited

    def _connect(self, server: Server, database: str) -> PGconn:
        key = (server.host, server.port, database)
        connection = self._connections.get(key)
        if connection is not None and connection.status == pq.ConnStatus.OK:
            self._connections.move_to_end(key)
            return connection
        if connection is not None:
            _finish(connection)
            del self._connections[key]
            self._leftover.discard(key)  # went with the connection
        refused = self._refused.get(key)
        if refused is not None and time.monotonic() < refused[0]:
            raise ExplainFailed(refused[1])
        config = self.config
        options: dict[str, Any] = dict(
            host=server.host,
            port=server.port,
            dbname=database,
            user=config.user,
            application_name=APPLICATION_NAME,
            connect_timeout=config.connect_timeout_s,
            options="-c default_transaction_read_only=on",
        )
        if config.passfile is not None:
            options["passfile"] = config.passfile
        connection = pq.PGconn.connect(make_conninfo(**options).encode())
        if connection.status != pq.ConnStatus.OK:
            message = connection.get_error_message()
            _finish(connection)
            cause, fix = connect_cause(message)
            reason = f"cannot connect as {config.user}: {fatal_line(message)}"
            if cause not in self._warned:
                self._warned.add(cause)
                log.warning(
                    "explain_cannot_connect",
                    cause=cause,
                    server=f"{server.host}:{server.port}",
                    database=database,
                    user=config.user,
                    error=fatal_line(message),
                    fix=fix,
                    once="said once per cause; the events carry plan_error",
                )
            self._refused[key] = (time.monotonic() + RECONNECT_AFTER_S, reason)
            raise ExplainFailed(reason)
        self._refused.pop(key, None)
        OWN_PIDS.add(connection.backend_pid)  # its statements are never reported
        # NOTICEs raised while planning (a user's function) go nowhere, not to stderr.
        connection.notice_handler = _ignore_notice
        self._connections[key] = connection
        while len(self._connections) > MAX_CONNECTIONS:
            oldest_key, oldest = self._connections.popitem(last=False)
            _finish(oldest)
            self._leftover.discard(oldest_key)
        return connection

    def _remember_names(self, request: _Naming) -> None:
        self.stats["relations_named"] += 1
        key = (request.server.host, request.server.port, request.database)
        for oid, name in request.names.items():
            self._names[(*key, oid)] = name
        while len(self._names) > MAX_REMEMBERED:
            self._names.popitem(last=False)

    @contextmanager
    def _read_only(self, request: _Request) -> Iterator[_Runner]:
        """One read-only transaction, with statement_timeout, on the connection to the
        request's database: rolled back after, or the connection dropped if it was lost
        (with what was left prepared on it)."""
        connection = self._connect(request.server, request.database)
        run = _Runner(connection)
        try:
            run("BEGIN READ ONLY")
            run(f"SET LOCAL statement_timeout = {self.config.statement_timeout_ms}")
            yield run
        finally:
            if connection.status == pq.ConnStatus.OK:
                if connection.transaction_status != pq.TransactionStatus.IDLE:
                    connection.exec_params(b"ROLLBACK", [])
            else:
                key = (request.server.host, request.server.port, request.database)
                self._connections.pop(key, None)
                self._leftover.discard(key)
                _finish(connection)

    def _name(self, request: _Naming) -> dict[int, str]:
        """Each oid's name in the request's database: EXPLAIN (VERBOSE) shows a regclass
        constant by the name regclassout gives it (schema-qualified where the role's
        search_path does not find it); an oid that names nothing stays a number."""
        constants = ", ".join(f"'{int(oid)}'::regclass" for oid in request.oids)
        with self._read_only(request) as run:
            result = run(f"EXPLAIN (VERBOSE, FORMAT JSON) SELECT {constants}")
            shown = json.loads(result.get_value(0, 0) or b"[]")[0]["Plan"].get("Output", [])
        names = {}
        for oid, output in zip(request.oids, shown):
            name = _regclass_literal(output)
            if name is not None and name != str(oid):
                names[oid] = name
        return names

    def _explain(self, request: _Request) -> list[dict[str, Any]]:
        statement = request.statement
        assert statement is not None  # a _Naming is _name's
        key = (request.server.host, request.server.port, request.database)
        with self._read_only(request) as run:
            prepared = False
            try:
                run(f"SET LOCAL lock_timeout = {self.config.lock_timeout_ms}")
                if statement.parameters == 0 or request.values is not None:
                    result = run(f"EXPLAIN (FORMAT JSON) {statement.text}", request.values)
                else:
                    if key in self._leftover:
                        run(f"DEALLOCATE {STATEMENT_NAME}")  # not transactional: stays done
                        self._leftover.discard(key)
                    run(f"PREPARE {STATEMENT_NAME} AS {statement.text}")
                    prepared = True
                    run("SET LOCAL plan_cache_mode = force_generic_plan")
                    # The NULLs would prune every partition at executor start-up, and the
                    # plan would show none: shown all, as EXPLAIN (GENERIC_PLAN) does.
                    run("SET LOCAL enable_partition_pruning = off")
                    nulls = ", ".join(["NULL"] * statement.parameters)
                    result = run(f"EXPLAIN (FORMAT JSON) EXECUTE {STATEMENT_NAME}({nulls})")
                    run(f"DEALLOCATE {STATEMENT_NAME}")
                    prepared = False
                plan: list[dict[str, Any]] = json.loads(result.get_value(0, 0) or b"[]")
                return plan
            finally:
                # Not undone by ROLLBACK: the next EXPLAIN on this connection deallocates
                # (a lost connection takes it along: _read_only forgets it then).
                if prepared and run.connection.status == pq.ConnStatus.OK:
                    self._leftover.add(key)

    # ---------------------------------------------------------------- stopping

    def close(self) -> dict[str, int]:
        """After the collectors stopped: hand on every held event (each waits at most
        timeout_ms), stop the worker, close the connections. Returns the counters."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._deliverer.join(self._timeout_s + 5)
        if self._deliverer.is_alive():
            log.error("explain_deliverer_stuck_at_shutdown")
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        # The worker may be inside one EXPLAIN (bounded by statement_timeout) or a connect.
        self._worker.join(self.config.statement_timeout_ms / 1000 + self.config.connect_timeout_s)
        if self._worker.is_alive():
            log.error("explain_worker_stuck_at_shutdown", action="leaving its connection")
        return dict(self.stats)


def _ignore_notice(_result: PGresult) -> None:
    pass


class _Runner:
    """One statement per call, over the extended protocol (PQexecParams)."""

    def __init__(self, connection: PGconn) -> None:
        self.connection = connection

    def __call__(self, sql: str, values: Optional[Sequence[Optional[bytes]]] = None) -> PGresult:
        result = self.connection.exec_params(sql.encode(), list(values or []))
        if result.status in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
            return result
        if self.connection.status != pq.ConnStatus.OK:
            raise ExplainFailed(
                f"connection lost: {fatal_line(self.connection.get_error_message())}"
            )
        sqlstate = (result.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode()
        primary = result.error_field(pq.DiagnosticField.MESSAGE_PRIMARY) or b""
        # Only the SQLSTATE and the first line: planning may run the user's functions,
        # and their errors' detail is theirs.
        raise ExplainFailed(f"{sqlstate}: {first_line(primary.decode(errors='replace'))}")


def _finish(connection: PGconn) -> None:
    """Close a connection, and stop treating its backend's pid as ours."""
    OWN_PIDS.discard(connection.backend_pid)
    connection.finish()


def _regclass_literal(output: str) -> Optional[str]:
    """ "'public.accounts'::regclass" -> "public.accounts" (a SQL string literal)."""
    if not output.endswith("::regclass"):
        return None
    literal = output[: -len("::regclass")]
    if len(literal) < 2 or literal[0] != "'" or literal[-1] != "'":
        return None
    return literal[1:-1].replace("''", "'")


def _with_names(event: SlowQuery, names: dict[int, str]) -> SlowQuery:
    """The event, its blockers' relation locks named where the name is known."""
    if not event.blocked_by:
        return event
    blocked_by = []
    for entry in event.blocked_by:
        lock = entry.get("lock")
        if isinstance(lock, dict) and lock.get("relation") in names:
            entry = {**entry, "lock": {**lock, "relation_name": names[lock["relation"]]}}
        blocked_by.append(entry)
    return msgspec.structs.replace(event, blocked_by=blocked_by)

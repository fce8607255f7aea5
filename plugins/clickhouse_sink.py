"""The clickhouse sink: every host's slow statements in one ClickHouse table.

ClickHouse's HTTP interface, `INSERT INTO <table> FORMAT JSONEachRow`, batched by the
dispatcher (max_batch, max_delay_ms) as every sink is: no driver, and any ClickHouse
from 18.16 on. The table is made by the operator from `pgslowlog schema clickhouse`
(clickhouse_schema.py); the sink never creates one, and reads its columns at start to
write the layout it has (and to say in one line what does not match).

Nothing is lost while ClickHouse is down, slow or refusing: write() puts each batch
in the spool on disk (clickhouse_spool.py) and returns, and a thread of the sink's
own sends the spool, oldest first, with exponential backoff while ClickHouse does not
take it. A batch handed to the sink is on disk: a SIGTERM or a SIGKILL loses none of
it, and the next start sends it. A batch sent again after a timeout may have landed
the first time: each event's `id` lets the table keep one row (ReplacingMergeTree;
count with FINAL).

What goes wrong is said in one line per cause, when it begins and when it ends, never
per retry: the server unreachable, the credentials refused, the table missing or of
other columns. The health line and /metrics count what is spooled, delivered (also
from the spool), dropped (the spool full) and retried.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Optional
from urllib.parse import urlsplit

import httpx
import msgspec

from pgslowlog.event import SlowQuery
from pgslowlog.hookspecs import hookimpl
from pgslowlog.log import get_logger
from pgslowlog.plugin_manager import RegisterSink
from pgslowlog.plugins.clickhouse_schema import (
    DEFAULT_TABLE,
    layout_of,
    mismatches,
    rows,
    valid_name,
)
from pgslowlog.plugins.clickhouse_spool import Batch, Spool
from pgslowlog.sinks import BaseSink, SinkType, backoff_s, check_writable

log = get_logger(__name__)
DEFAULT_SPOOL = "/var/lib/pgslowlog"  # the unit's StateDirectory=, when not given one


class ClickHouseOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    url: str  # ClickHouse's HTTP interface: "http://ch1:8123", "https://ch.example:8443"
    table: str = DEFAULT_TABLE  # the Distributed table on a cluster
    user: Optional[str] = None
    password_file: Optional[str] = None  # the password, alone in a file (never in here)
    max_batch: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 10_000
    max_delay_ms: Annotated[int, msgspec.Meta(ge=0, le=600_000)] = 1000
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 10.0
    backoff_initial_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 0.5
    backoff_max_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    verify_tls: bool = True
    ca_file: Optional[str] = None  # a private CA's certificates (PEM)
    cert_file: Optional[str] = None  # a client certificate (PEM), for mutual TLS
    key_file: Optional[str] = None  # its key, if not in cert_file
    # Batches ClickHouse has not taken yet. Default: $STATE_DIRECTORY/clickhouse (the
    # unit's /var/lib/pgslowlog), else /var/lib/pgslowlog/clickhouse.
    spool_dir: Optional[str] = None
    spool_max_mb: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 1024

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be http://host:8123 or https://host:8443, not {self.url!r}")
        if parts.username or parts.password:
            raise ValueError("url: no user or password in it; set user and password_file")
        if not valid_name(self.table, dotted=True):
            raise ValueError(f"table must be NAME or DATABASE.NAME, not {self.table!r}")
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file is set without cert_file")

    def spool_directory(self) -> Path:
        if self.spool_dir is not None:
            return Path(self.spool_dir)
        # systemd may list several state directories, separated by ":".
        state = os.environ.get("STATE_DIRECTORY", DEFAULT_SPOOL).split(":")[0]
        return Path(state) / "clickhouse"


def read_password(options: ClickHouseOptions) -> str | None:
    if options.password_file is None:
        return None
    try:
        return Path(options.password_file).read_text().rstrip("\n")
    except OSError as error:
        raise ValueError(
            f"password_file: cannot read {options.password_file}: {error.strerror}"
        ) from None


def check_tls_files(options: ClickHouseOptions) -> None:
    for key in ("ca_file", "cert_file", "key_file"):
        path = getattr(options, key)
        if path is not None and not os.access(path, os.R_OK):
            raise ValueError(f"{key}: cannot read {path}")


def check_options(options: ClickHouseOptions) -> None:
    """What `check` looks at: the secret and TLS files are readable, the spool writable."""
    read_password(options)
    check_tls_files(options)
    check_writable("spool_dir", options.spool_directory(), directory=True)


REJECT_AFTER = 5  # refusals of one batch's rows, sent alone, before it is set aside


class SpoolFault(Exception):
    """The spool could not be read: the disk, permissions, descriptors."""


class Refused(Exception):
    """ClickHouse did not take a request: why, in one line with the fix."""

    def __init__(self, cause: str, message: str, fix: str) -> None:
        super().__init__(message)
        self.cause = cause
        self.fix = fix


def _about_the_rows(cause: str) -> bool:
    """A refusal that another batch would not get: ClickHouse could not take these rows
    (a parse or type error, code_N), or the sink failed on them (internal)."""
    return cause.startswith("code_") or cause == "internal"


# ClickHouse's error codes (its HTTP answers say "Code: N"), by what fixes them.
_AUTH = {192, 193, 194, 195, 497, 516}  # unknown user, wrong/missing password, denied
_NO_TABLE = {60, 81}  # unknown table, unknown database
_SHARD_AWAY = {209, 210, 279}  # a socket timeout, a network error, all tries failed
_CODE = re.compile(rb"Code: (\d+)")


def _refusal(response: httpx.Response, table: str) -> Refused:
    found = _CODE.search(response.content)
    code = int(found.group(1)) if found else None
    text = response.text.strip().splitlines()[0] if response.text.strip() else ""
    text = text[:300]
    if code in _AUTH or response.status_code in (401, 403):
        return Refused(
            "credentials",
            f"ClickHouse refused the credentials (HTTP {response.status_code}): {text}",
            "check sinks.clickhouse.user and the password in password_file",
        )
    if code in _NO_TABLE:
        return Refused(
            "no_table",
            f"ClickHouse has no table {table}: {text}",
            "run the statements of `pgslowlog schema clickhouse` on every shard",
        )
    if code in _SHARD_AWAY:
        return Refused(
            "shard_unreachable",
            f"ClickHouse cannot reach a shard of {table} (HTTP {response.status_code}): {text}",
            "start that shard's server, or fix remote_servers; events wait in the spool meanwhile",
        )
    return Refused(
        f"code_{code}",
        f"ClickHouse answered HTTP {response.status_code}: {text}",
        "see the ClickHouse server's log; if the table is not pgslowlog's, recreate it from "
        "`pgslowlog schema clickhouse`",
    )


class ClickHouseSink(BaseSink):
    """Every batch is written to the spool first, then sent by the sink's own thread,
    oldest first: write() never waits for the network, so a slow or silent ClickHouse
    cannot hold the dispatcher past its shutdown budget, and a batch handed to the sink
    is on disk before write() returns (a SIGTERM or a SIGKILL loses none of it)."""

    def __init__(self, options: ClickHouseOptions) -> None:
        password = read_password(options)
        check_tls_files(options)
        self.options = options
        self.max_batch = options.max_batch
        self.max_delay_s = options.max_delay_ms / 1000
        self.table = options.table
        auth = (options.user or "default", password or "") if options.user or password else None
        self._spool = Spool(options.spool_directory(), options.spool_max_mb * 1024 * 1024)
        self._client = httpx.Client(
            base_url=options.url,
            auth=auth,
            timeout=options.timeout_s,
            verify=self._tls(options),
        )
        self._lock = threading.Lock()  # the spool, the layout, the counts, what is said
        self._wake = threading.Condition(self._lock)
        self._layout: str | None = None  # read from the table, before the first send
        self._said_layout: str | None = None
        self._closing = threading.Event()  # set by close(), read by the sender
        self._trouble: str | None = None  # the cause said last, until it ends
        self.spooled = self._spool.events
        if self.spooled:
            log.info(
                "clickhouse_spool_found", events=self.spooled, directory=str(self._spool.directory)
            )
        self._sender = threading.Thread(
            target=self._send_spool, name="clickhouse-spool", daemon=True
        )
        self._sender.start()

    @staticmethod
    def _tls(options: ClickHouseOptions) -> ssl.SSLContext | bool:
        if not options.verify_tls:
            log.warning(
                "clickhouse_tls_verification_off",
                url=options.url,
                hint="events go to a server whose identity is not checked; set verify_tls = "
                "true (and ca_file for a private CA)",
            )
            return False
        context = ssl.create_default_context(cafile=options.ca_file)
        if options.cert_file is not None:
            context.load_cert_chain(options.cert_file, options.key_file)
        return context

    # -- the dispatcher's thread ---------------------------------------------------

    def write(self, events: Sequence[SlowQuery]) -> int | None:
        batch = list(events)
        with self._lock:
            self._spool.append(batch)
            self._counts()
            self._wake.notify()
        return len(batch)  # counted as delivered (or dropped) when the sender is done

    def close(self) -> None:
        """Stop sending. What is in the spool stays there for the next start: the batch
        being sent too (had it landed, its ids keep it from counting twice)."""
        with self._lock:
            self._closing.set()
            self._wake.notify()
        self._sender.join(0.5)
        # Closing the client ends a request being set up; one waiting for a slow server's
        # answer runs on until timeout_s. The sender is a daemon thread: it goes with the
        # process, and its batch stays in the spool (had it landed, its ids keep it from
        # counting twice).
        self._client.close()
        self._sender.join(0.5)
        with self._lock:
            if self._spool:
                log.info(
                    "clickhouse_spool_kept",
                    events=self._spool.events,
                    directory=str(self._spool.directory),
                    hint="sent at the next start",
                )
            if not self._sender.is_alive():
                self._spool.close()  # the lock goes with the process otherwise

    # -- the sender's thread -------------------------------------------------------

    def _send_spool(self) -> None:
        self._check_table()
        attempt = 0
        while True:
            with self._lock:
                while not self._closing.is_set() and not self._spool:
                    self._wake.wait()
                if self._closing.is_set():
                    return
                # Up to max_batch events in one INSERT: after an outage the spool drains
                # in few large inserts, as ClickHouse prefers. After a failure, one batch
                # at a time, so that a batch ClickHouse refuses is found and set aside.
                taken = self._spool.take_oldest(self.max_batch if attempt == 0 else 1)
            try:
                delivered = self._send(taken)
            except Exception as error:  # kept, and tried again: nothing ends this thread
                attempt += 1
                with self._lock:
                    for batch in taken:
                        self._spool.give_back(batch)
                    if self._closing.is_set():
                        return  # the close ended the request: nothing to say
                    if isinstance(error, Refused):
                        self._layout = None  # the table may have been made anew: read it again
                    cause = self._say_trouble(error)
                    self.retried += sum(batch.events for batch in taken)
                    if attempt > REJECT_AFTER and _about_the_rows(cause):
                        self._set_aside(taken[0], error)
                        attempt = 0
                        continue
                    # New batches do not cut the wait short: the backoff grows.
                    self._wake.wait_for(self._closing.is_set, self._backoff_s(attempt))
                continue
            attempt = 0
            with self._lock:
                if delivered:
                    self._say_recovered()
                for batch in delivered:
                    self._spool.remove(batch)
                    self.delivered_later += batch.events
                self._counts()

    def _send(self, taken: list[Batch]) -> list[Batch]:
        """Send spooled batches in one INSERT: those ClickHouse now has (all but any set
        aside unreadable); raises what kept them from ClickHouse."""
        events: list[SlowQuery] = []
        readable = []
        for batch in taken:
            try:
                events += self._spool.read(batch)  # safe outside the lock: see Spool.read
            except (ValueError, FileNotFoundError) as error:  # msgspec's DecodeError is one
                with self._lock:
                    self._set_aside(batch, error, unreadable=True)
                continue
            except OSError as error:  # the disk, permissions, no descriptor left: try again
                raise SpoolFault(error) from error
            readable.append(batch)
        if not readable:
            return []
        if self._layout is None:
            self._read_layout()
        self._insert(events)
        return readable

    def _check_table(self) -> None:
        """At start, before any event: what keeps ClickHouse from taking them is said at
        once (the daemon runs on, and spools)."""
        try:
            self._read_layout()
        except Exception as error:
            with self._lock:
                if not self._closing.is_set():
                    self._say_trouble(error)

    def _set_aside(self, batch: Batch, error: Exception, unreadable: bool = False) -> None:
        """A batch that can never go: its file cannot be read back (changed by hand, a
        disk fault), or ClickHouse refused its rows REJECT_AFTER times while it takes
        others' (a bug of the sink's). Kept beside the spool for a look, and counted
        as dropped: the batches behind it go on."""
        kept = self._spool.set_aside(batch, ".bad" if unreadable else ".rejected")
        self._counts()
        log.error(
            "clickhouse_spool_unreadable" if unreadable else "clickhouse_batch_rejected",
            file=str(kept),
            events=batch.events,
            error=str(error),
            fix="the batch is dropped and counted, the file kept for a look; the rest is sent",
        )

    def _read_layout(self) -> None:
        describe = f"DESCRIBE TABLE {self.table} FORMAT JSONEachRow"
        response = self._client.post("/", content=describe)
        if response.status_code != 200:
            raise _refusal(response, self.table)
        columns = {}
        for line in response.text.splitlines():
            column = json.loads(line)
            columns[column["name"]] = column["type"]
        layout = layout_of(columns)
        problems = mismatches(layout, columns)
        if problems:
            raise Refused(
                "columns",
                f"ClickHouse table {self.table} is not one pgslowlog writes: "
                + "; ".join(problems[:3])
                + (f"; and {len(problems) - 3} more" if len(problems) > 3 else ""),
                "recreate it from `pgslowlog schema clickhouse` (--modern for DateTime64 and Map)",
            )
        with self._lock:
            said, self._layout, self._said_layout = self._said_layout, layout, layout
        if said != layout:  # once, not at every read after a refusal
            log.info("clickhouse_table", table=self.table, layout=layout, url=self.options.url)

    def _insert(self, events: list[SlowQuery]) -> None:
        assert self._layout is not None
        response = self._client.post(
            "/",
            params={
                "query": f"INSERT INTO {self.table} FORMAT JSONEachRow",
                # Through a Distributed table: answered once every shard has its rows,
                # so that a success means stored, and a failure is retried.
                "insert_distributed_sync": "1",
            },
            content=rows(self._layout, events),
        )
        if response.status_code != 200:
            raise _refusal(response, self.table)

    def _backoff_s(self, attempt: int) -> float:
        return backoff_s(attempt, self.options.backoff_initial_s, self.options.backoff_max_s)

    # -- what is said and counted (under the lock) ---------------------------------

    def _counts(self) -> None:
        self.spooled = self._spool.events
        self.dropped_later = self._spool.dropped

    def _say_trouble(self, error: Exception) -> str:
        """Say what kept ClickHouse from taking a batch, if it is a new cause; the cause."""
        if isinstance(error, Refused):
            cause, message, fix = error.cause, str(error), error.fix
        elif "CERTIFICATE_VERIFY_FAILED" in str(error) or isinstance(error, ssl.SSLError):
            cause = "tls"
            message = f"ClickHouse at {self.options.url}: the TLS handshake failed: {error}"
            fix = (
                "set sinks.clickhouse.ca_file to the CA that signed its certificate (and "
                "cert_file for a server that asks for a client certificate)"
            )
        elif isinstance(error, SpoolFault):
            cause = "spool"
            message = f"the spool cannot be read: {error}"
            fix = f"check {self._spool.directory}: its disk and permissions"
        elif isinstance(error, httpx.TransportError):
            cause = "unreachable"
            message = f"ClickHouse at {self.options.url} cannot be reached: {type(error).__name__}"
            message += f": {error}" if str(error) else ""
            fix = "start it, or fix sinks.clickhouse.url; events wait in the spool meanwhile"
        else:  # pgslowlog's own fault: said as such, the batch kept
            cause = "internal"
            message = f"the clickhouse sink failed: {type(error).__name__}: {error}"
            fix = "report it to pgslowlog's developers; events wait in the spool meanwhile"
        if cause != self._trouble:
            self._trouble = cause
            log.error("clickhouse_not_taking", cause=cause, error=message, fix=fix)
        return cause

    def _say_recovered(self) -> None:
        if self._trouble is not None:
            log.info("clickhouse_taking_again", after=self._trouble, spooled=self._spool.events)
            self._trouble = None


@hookimpl
def pgslowlog_register_sinks(register: RegisterSink) -> None:
    register(
        SinkType(
            name="clickhouse",
            description="ClickHouse over HTTP (JSONEachRow), spooled on disk while it is away",
            options=ClickHouseOptions,
            create=ClickHouseSink,
            check=check_options,
        )
    )

"""The TOML configuration: strict schema, one-line errors that name the key path.

msgspec validates the structure (unknown keys, types, ranges); the checks it cannot
express (either `binary` or `pid`, power-of-two sizes) follow in `_check_semantics`.
Sink options are validated later against the schema each sink plugin declares.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import msgspec

from pgslowlog.compat import tomllib
from pgslowlog.errors import UserError

EXAMPLE = "see etc/pgslowlog.toml for every key"

# BPF per-CPU array values are limited to 32 KiB, and the record that holds the text
# is one: 16 KiB keeps a wide margin.
QUERY_MAX_BYTES_LIMIT = 16384


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class DaemonConfig(_Strict):
    threshold_ms: Annotated[float, msgspec.Meta(ge=0)] = 200.0
    query_max_bytes: Annotated[int, msgspec.Meta(ge=64, le=QUERY_MAX_BYTES_LIMIT)] = 4096
    max_backends: Annotated[int, msgspec.Meta(ge=16, le=1_000_000)] = 16384
    ring_buffer_mib: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 8
    sink_queue_size: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 100_000
    include_background: bool = False
    log_level: str = "info"
    stats_interval_s: Annotated[float, msgspec.Meta(ge=1, le=86400)] = 60.0
    # Bound parameter values (extended protocol, where a probe can read them). Off by
    # default: values may hold personal data.
    capture_params: bool = False
    # Longest value logged, in bytes, like PostgreSQL's log_parameter_max_length;
    # a longer one is cut and ends in "...". 0 logs none.
    params_max_length: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 1024
    # Replace constants in query text with $1, $2, ... (and bound values with
    # "<redacted>") before any sink sees them: query text can hold personal data.
    redact_literals: bool = False
    # How often the `sampled` definition looks at every backend's pg_stat_activity
    # entry while it follows a statement. It sees every statement of at least threshold
    # + 2 intervals. Unset, it follows the threshold: threshold / 5, within 2-10 ms.
    sample_interval_ms: Optional[Annotated[float, msgspec.Meta(ge=1, le=1000)]] = None
    # Why a sampled statement was slow: who blocked it (walks the lock table of a
    # backend seen waiting on a lock), and what it read, wrote and spent on CPU (the
    # backend's counters at its first look and at its end).
    blocked_by: bool = True
    resources: bool = True
    # The name every event carries as `host`: the machine's host name unless set. Set
    # it where that does not tell daemons apart (several on one machine, a DaemonSet's
    # pods) or where a fleet's store wants another name (an FQDN, an inventory name).
    host: Optional[Annotated[str, msgspec.Meta(min_length=1, max_length=255)]] = None

    def host_name(self) -> str:
        return self.host or socket.gethostname()


class TargetConfig(_Strict):
    name: Optional[Annotated[str, msgspec.Meta(min_length=1, max_length=64)]] = None
    binary: Optional[str] = None
    pid: Optional[Annotated[int, msgspec.Meta(ge=1)]] = None
    probes: list[str] = msgspec.field(default_factory=lambda: ["auto"])
    # Every PostgreSQL server in a container (another pid namespace) on this host, each
    # traced as an instance of its own; `binary`, if set, is the path inside them.
    containers: bool = False


# Prometheus's list of exporter ports gives 9187 to postgres_exporter, and fleets
# often run a second one on 9188: pgslowlog's default keeps clear of both.
METRICS_DEFAULT_PORT = 9863


class MetricsConfig(_Strict):
    # "HOST:PORT", "[IPV6]:PORT", ":PORT" (every IPv4 address) or "HOST" (default port).
    listen: str
    # Label values kept apart per target before the rest are folded into "other":
    # a fleet's Prometheus must not grow a series per database or user ever seen.
    max_databases: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 20
    max_users: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 20
    max_containers: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 50


class ExplainConfig(_Strict):
    """[explain]: plans of slow statements (docs/explain.md). On when the table is
    present, unless enabled = false."""

    enabled: bool = True
    user: Annotated[str, msgspec.Meta(min_length=1, max_length=63)] = "pgslowlog"
    # A libpq password file (host:port:database:user:password); none: peer authentication.
    passfile: Optional[str] = None
    # How long an event waits for its plan before it goes on with plan_error.
    timeout_ms: Annotated[int, msgspec.Meta(ge=10, le=60_000)] = 2000
    # SET LOCAL for each EXPLAIN: planning stops after this, and waits no longer for a lock.
    statement_timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=60_000)] = 1000
    lock_timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=60_000)] = 100
    connect_timeout_s: Annotated[int, msgspec.Meta(ge=1, le=60)] = 2
    # At most one EXPLAIN per fingerprint (and database) in this many seconds; the
    # statements of that fingerprint in between get its plan.
    per_fingerprint_interval_s: Annotated[float, msgspec.Meta(ge=0, le=86_400)] = 60.0
    max_per_second: Annotated[float, msgspec.Meta(gt=0, le=10_000)] = 5.0
    queue_size: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 100


class Config(_Strict):
    daemon: DaemonConfig = msgspec.field(default_factory=DaemonConfig)
    target: list[TargetConfig] = msgspec.field(default_factory=list)
    sinks: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    metrics: Optional[MetricsConfig] = None
    explain: Optional[ExplainConfig] = None

    @property
    def explaining(self) -> bool:
        return self.explain is not None and self.explain.enabled

    @property
    def threshold_ns(self) -> int:
        return round(self.daemon.threshold_ms * 1_000_000)


LOG_LEVELS = ("debug", "info", "warning", "error")


def refuse_writable_by_others(path: Path, mode: int) -> None:
    """The config names secret files and what to probe as root: only its owner may edit it."""
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UserError(
            f"config file {path} is writable by group or others (mode {stat.S_IMODE(mode):04o}); "
            "it decides what is probed with root's capabilities and may name secrets",
            f"run `chmod go-w {path}`",
        )


# `-c -`: the config on standard input. The Ansible role checks a new config this way,
# as the service's user inside the unit's sandbox, before it replaces the old file: the
# file it checks is readable by root alone, and systemd opens it for the check.
STDIN = "-"
STDIN_NAME = "on standard input"  # how messages name it: "config on standard input ..."


def load_config(path: str | Path) -> Config:
    """Read and validate the config file; raise UserError naming the cause and the fix."""
    if str(path) == STDIN:
        return parse_config(_decode(sys.stdin.buffer.read(), STDIN_NAME), STDIN_NAME)
    path = Path(path)
    try:
        with path.open("rb") as file:  # tomllib wants bytes, as black reads pyproject.toml
            refuse_writable_by_others(path, os.fstat(file.fileno()).st_mode)
            text = file.read()
    except FileNotFoundError:
        raise UserError(f"config file {path} not found", "pass the right path with -c") from None
    except PermissionError:
        raise UserError(
            f"config file {path} is not readable",
            "make it readable by the daemon's user (root:pgslowlog 0640)",
        ) from None
    except IsADirectoryError:
        raise UserError(f"config path {path} is a directory", "pass the TOML file") from None
    return parse_config(_decode(text, str(path)), str(path))


def _decode(text: bytes, name: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text.decode())
    except UnicodeDecodeError as error:
        raise UserError(
            f"config {name} is not UTF-8 text (byte {error.start})", "save it as UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise UserError(
            f"config {name} is not valid TOML: {error}", "fix the syntax there"
        ) from None


def parse_config(data: dict[str, Any], config_path: str = "config") -> Config:
    try:
        config = msgspec.convert(data, Config)
    except msgspec.ValidationError as error:
        raise config_error(config_path, error) from None
    _check_semantics(config, config_path)
    return config


# DOTALL: a key may hold a newline (TOML allows "\n" = 1), and must still match.
_AT = re.compile(r"^(?P<message>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<key>[^`]+)`$", re.DOTALL)
_MISSING = re.compile(r"^Object missing required field `(?P<key>[^`]+)`$")


def config_error(config_path: str, error: msgspec.ValidationError, prefix: str = "") -> UserError:
    """Turn msgspec's message into 'config X: <key path>: cause; fix'."""
    match = _AT.match(str(error))
    assert match is not None  # the pattern matches any string
    message = match["message"]
    inner = (match["path"] or "").lstrip(".")
    path = ".".join(part for part in (prefix, inner) if part).replace(".[", "[")
    if unknown := _UNKNOWN.match(message):
        name = unknown["key"] if unknown["key"].isprintable() else repr(unknown["key"])
        key = f"{path}.{name}" if path else name
        return UserError(
            f"config {config_path}: unknown key {key}",
            f"remove it or correct its spelling ({EXAMPLE})",
        )
    if missing := _MISSING.match(message):
        key = f"{path}.{missing['key']}" if path else missing["key"]
        return UserError(f"config {config_path}: {key} is required", f"set it ({EXAMPLE})")
    where = path or "top level"
    message = message[:1].lower() + message[1:]  # "Expected ..." continues our sentence
    return UserError(f"config {config_path}: {where}: {message}", f"correct the value ({EXAMPLE})")


def _check_semantics(config: Config, config_path: str) -> None:
    daemon = config.daemon
    if daemon.ring_buffer_mib & (daemon.ring_buffer_mib - 1):
        raise UserError(
            f"config {config_path}: daemon.ring_buffer_mib = {daemon.ring_buffer_mib} is not "
            "a power of two",
            "use 1, 2, 4, 8, 16 ... (the kernel requires it)",
        )
    if daemon.log_level not in LOG_LEVELS:
        raise UserError(
            f"config {config_path}: daemon.log_level = {daemon.log_level!r} is not a level",
            f"use one of {', '.join(LOG_LEVELS)}",
        )
    if not config.target:
        raise UserError(
            f"config {config_path}: no [[target]] table",
            'add one: [[target]] binary = "/usr/lib/postgresql/15/bin/postgres"',
        )
    names = [target.name for target in config.target if target.name is not None]
    if len(names) != len(set(names)):
        raise UserError(
            f"config {config_path}: two [[target]] tables have the same name",
            "give each target its own name",
        )
    for index, target in enumerate(config.target):
        if target.containers and target.pid is not None:
            raise UserError(
                f"config {config_path}: target[{index}] has containers = true and pid = "
                f"{target.pid}: a container's pids change at every restart",
                "remove pid (containers = true finds every containerised server), "
                "or remove containers to trace that one server",
            )
        if target.containers:
            if target.binary is not None and not target.binary.startswith("/"):
                raise UserError(
                    f"config {config_path}: target[{index}].binary = {target.binary!r} is not "
                    "an absolute path",
                    "with containers = true, write the path inside the containers, for example "
                    '"/usr/lib/postgresql/17/bin/postgres"',
                )
        elif (target.binary is None) == (target.pid is None):
            raise UserError(
                f"config {config_path}: target[{index}] needs exactly one of binary or pid",
                'set binary = "/path/to/postgres" or pid = <postmaster pid>, not both',
            )
        if not target.probes:
            raise UserError(
                f"config {config_path}: target[{index}].probes is empty",
                'use ["auto"] or name the probes to attach',
            )
    if not config.sinks:
        raise UserError(
            f"config {config_path}: no sink configured",
            'add one, for example [sinks.file] path = "/var/log/pgslowlog/slow.jsonl"',
        )
    if config.metrics is not None:
        try:
            listen_address(config.metrics.listen)
        except ValueError as error:
            raise UserError(
                f"config {config_path}: metrics.listen = {config.metrics.listen!r} {error}",
                f'use "127.0.0.1:{METRICS_DEFAULT_PORT}", "[::1]:{METRICS_DEFAULT_PORT}" or '
                f'":{METRICS_DEFAULT_PORT}" (every IPv4 address)',
            ) from None
    if config.explain is not None:
        _check_explain(config.explain, config_path)
    for name, options in config.sinks.items():
        if not isinstance(options, dict):
            raise UserError(
                f"config {config_path}: sinks.{name} must be a table", f"write it as [sinks.{name}]"
            )


def _check_explain(explain: ExplainConfig, config_path: str) -> None:
    where = f"config {config_path}: explain"
    if explain.statement_timeout_ms >= explain.timeout_ms:
        raise UserError(
            f"{where}.statement_timeout_ms = {explain.statement_timeout_ms} is not below "
            f"timeout_ms = {explain.timeout_ms}: events would stop waiting before EXPLAIN does",
            "lower statement_timeout_ms or raise timeout_ms",
        )
    if explain.lock_timeout_ms > explain.statement_timeout_ms:
        raise UserError(
            f"{where}.lock_timeout_ms = {explain.lock_timeout_ms} is above "
            f"statement_timeout_ms = {explain.statement_timeout_ms}",
            "keep lock_timeout_ms short (100): EXPLAIN must not queue behind a lock",
        )
    if explain.passfile is not None and not explain.passfile.startswith("/"):
        raise UserError(
            f"{where}.passfile = {explain.passfile!r} is not an absolute path",
            'write the full path, for example "/etc/pgslowlog/pgpass"',
        )
    if not all(char.isprintable() and char not in "'\\" for char in explain.user):
        raise UserError(
            f"{where}.user = {explain.user!r} has a quote, backslash or control character",
            "use the role's plain name",
        )


def listen_address(text: str) -> tuple[str, int]:
    """(host, port) of a `listen` value; ValueError saying what is wrong with it."""
    if not text:
        raise ValueError("is empty: remove the [metrics] table to serve no metrics")
    if "://" in text:
        raise ValueError("is not an address: write HOST:PORT, not a URL (/metrics is the path)")
    host, port = text, str(METRICS_DEFAULT_PORT)
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not host or (rest and not rest.startswith(":")):
            raise ValueError("is not an address: an IPv6 address goes in [brackets]")
        port = rest[1:] if rest else port
    elif text.count(":") == 1:
        host, port = text.split(":")
    elif ":" in text:
        raise ValueError("is not an address: put an IPv6 address in [brackets]")
    # isdecimal alone takes other scripts' digits ("٣"), which int() reads as 3.
    if not (port.isascii() and port.isdecimal()) or not 1 <= int(port) <= 65535:
        raise ValueError(f"has no valid port ({port!r} is not 1 to 65535)")
    if any(char.isspace() or char in "/?#@" for char in host):
        raise ValueError("is not an address: the host has characters no address has")
    try:
        host.encode("idna")  # what getaddrinfo does first: empty or overlong labels fail
    except UnicodeError:
        raise ValueError("is not an address: the host is not a valid name") from None
    return host or "0.0.0.0", int(port)

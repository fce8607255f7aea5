"""What a sink plugin provides: a type with an option schema, and sink objects.

Each sink is driven by its own thread in dispatcher.py, so its methods are never
called concurrently and need no locking. Every ``[sinks.NAME]`` table also takes
the keys in ``COMMON_OPTIONS``, handled by the dispatcher and not passed to the sink.
"""

from __future__ import annotations

import os
import pwd
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional, Protocol

import msgspec

from pgslowlog.config import config_error
from pgslowlog.event import SlowQuery


class Sink(Protocol):
    #: Most events per write() call; the dispatcher collects up to this many.
    max_batch: int
    #: How long the dispatcher waits for a batch to fill before writing it, seconds.
    max_delay_s: float
    #: Deliveries the sink had to retry (it counts them; the dispatcher logs them).
    retried: int

    def write(self, events: Sequence[SlowQuery], /) -> int | None:
        """Deliver a batch. Raising counts the whole batch as failed; the next one still
        comes. A sink with a spool returns how many of the batch it kept there for later
        (counted by it as delivered_later or dropped_later in the end); None: all went."""

    def reopen(self) -> None:
        """SIGHUP: reopen files or connections (for example after logrotate)."""

    def interrupt(self) -> None:
        """Shutdown time is up: make a blocked write() give up soon. Called from another thread."""

    def close(self) -> None:
        """Flush and release everything; called once, after the last write."""


class BaseSink:
    """Defaults for the optional parts of the Sink protocol: subclass and write write().

    The defaults are class attributes that an instance may set for itself, as the
    webhook sink does from its options: instance attributes, as the protocol says."""

    max_batch: int = 1000
    max_delay_s: float = 0.0
    retried: int = 0
    # Optional, read by the dispatcher when present: a sink with a spool of its own
    # (clickhouse) counts the events in it now, those it delivered from it since, and
    # those it had to drop from it (full).
    spooled: int = 0
    delivered_later: int = 0
    dropped_later: int = 0

    def write(self, events: Sequence[SlowQuery]) -> int | None:
        raise NotImplementedError

    def reopen(self) -> None:
        pass

    def interrupt(self) -> None:
        pass

    def close(self) -> None:
        pass


def backoff_s(attempt: int, initial_s: float, max_s: float) -> float:
    """How long to wait before retry `attempt` (1, 2, ...): doubling from `initial_s` up
    to `max_s`, with jitter, so that the hosts of a fleet do not retry in step."""
    ceiling = min(max_s, initial_s * 2.0 ** (attempt - 1))
    return ceiling * random.uniform(0.5, 1.0)


def check_writable(key: str, path: str | Path, *, directory: bool = False) -> None:
    """Raise ValueError("key: ...") unless this process could write `path` now: the file
    itself, or (one that does not exist yet) a new file in its directory; with
    directory=True, files in the directory `path`. A missing directory is made by the
    sink: then its first ancestor that exists must take new directories.

    Run inside the unit's sandbox (the Ansible role's validate does), this sees what the
    service will see: under ProtectSystem=strict every directory outside ReadWritePaths=,
    LogsDirectory= and StateDirectory= is a read-only mount.
    """
    path = Path(path)
    try:
        if path.exists():
            if directory != path.is_dir():
                kind = "a directory" if directory else "a file"
                raise ValueError(f"{key}: {path} is not {kind}; correct the path")
            target = path
        else:
            target = path.parent  # the sink makes what is missing, directories included
            while not target.exists() and target != target.parent:
                target = target.parent
            if not target.is_dir():
                raise ValueError(f"{key}: {target} is not a directory; correct the path")
        if os.access(target, os.W_OK | (os.X_OK if target.is_dir() else 0)):
            return
        read_only = os.statvfs(target).f_flag & os.ST_RDONLY
    except OSError as error:  # a directory on the way this user may not search
        raise ValueError(f"{key}: cannot reach {path}: {error.strerror}") from None
    if read_only:
        raise ValueError(
            f"{key}: {target} is read-only here (under systemd, ProtectSystem=strict leaves "
            "only ReadWritePaths= writable); add the directory to ReadWritePaths= in a "
            "drop-in (the Ansible role adds a sink's directory itself)"
        )
    uid = os.geteuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = f"uid {uid}"
    raise ValueError(f"{key}: user {user} cannot write {target}; make it writable by {user}")


class CommonSinkOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Keys every [sinks.NAME] table accepts, whatever the sink."""

    # Events waiting for this sink; when full, its oldest event is dropped and counted.
    queue_size: Optional[Annotated[int, msgspec.Meta(ge=1, le=10_000_000)]] = None
    # On SIGTERM, how long this sink may take to deliver what is queued.
    shutdown_timeout_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 5.0


COMMON_OPTIONS = frozenset(CommonSinkOptions.__struct_fields__)


@dataclass(frozen=True)
class SinkType:
    """name: the key under [sinks]; options: a msgspec.Struct with
    forbid_unknown_fields=True describing that table; create: opens a sink."""

    name: str
    description: str
    options: type[msgspec.Struct]
    create: Callable[[Any], Sink]
    #: Optional: look at what the options point to (secret files, variables, CA
    #: files) without side effects; raise ValueError("key: what is wrong") when it
    #: is unusable. `check` and `run` then refuse the config in one line.
    check: Callable[[Any], None] | None = None

    def parse_options(
        self, raw: dict[str, Any], config_path: str
    ) -> tuple[CommonSinkOptions, msgspec.Struct]:
        common = {key: value for key, value in raw.items() if key in COMMON_OPTIONS}
        own = {key: value for key, value in raw.items() if key not in COMMON_OPTIONS}
        try:
            return msgspec.convert(common, CommonSinkOptions), msgspec.convert(own, self.options)
        except msgspec.ValidationError as error:
            raise config_error(config_path, error, prefix=f"sinks.{self.name}") from None

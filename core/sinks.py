"""What a sink plugin provides: a type with an option schema, and sink objects.

A sink is driven by its own thread in dispatcher.py, so its methods are never
called concurrently and need no locking.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
from pgslowlog.config import config_error
from pgslowlog.event import SlowQuery


class Sink(Protocol):
    def write(self, event: SlowQuery) -> None:
        """Deliver one event. An exception is logged and counted; the next event still comes."""

    def reopen(self) -> None:
        """SIGHUP: reopen files or connections (for example after logrotate)."""

    def close(self) -> None:
        """Flush and release everything; called once, after the last write."""


@dataclass(frozen=True)
class SinkType:
    """name: the key under [sinks]; options: a msgspec.Struct with
    forbid_unknown_fields=True describing that table; create: opens a sink."""

    name: str
    description: str
    options: type[msgspec.Struct]
    create: Callable[[Any], Sink]

    def parse_options(self, raw: dict[str, Any], source: str) -> msgspec.Struct:
        try:
            return msgspec.convert(raw, self.options)
        except msgspec.ValidationError as error:
            raise config_error(source, error, prefix=f"sinks.{self.name}") from None

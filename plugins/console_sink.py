"""The console sink: one readable line per slow statement on stdout, for trying by hand."""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence

import msgspec

from pgslowlog.event import SlowQuery
from pgslowlog.hookspecs import hookimpl
from pgslowlog.plugin_manager import RegisterSink
from pgslowlog.sinks import BaseSink, SinkType


class ConsoleOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


# C0 and C1 controls, DEL, and the bidirectional overrides that reorder what a
# terminal shows: query text and names are chosen by clients, never trusted.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """The text with anything a terminal would act on shown as an escape."""
    return _UNSAFE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def format_line(event: SlowQuery) -> str:
    who = printable(f"{event.user}@{event.database}") if event.user else "?"
    query = printable(" ".join(event.query.split()))  # one line, whatever the layout
    flags = (" …" if event.query_truncated else "") + (
        " [backend exited]" if event.backend_exited else ""
    )
    stamp = event.ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return (
        f"{stamp} {event.duration_ms:10.1f} ms  pid {event.pid}  {who} "
        f"{printable(event.client or '')}  "
        f"{query}{flags}"
    )


class ConsoleSink(BaseSink):
    def __init__(self, options: ConsoleOptions) -> None:
        pass

    def write(self, events: Sequence[SlowQuery]) -> None:
        sys.stdout.write("".join(format_line(event) + "\n" for event in events))
        sys.stdout.flush()


@hookimpl
def pgslowlog_register_sinks(register: RegisterSink) -> None:
    register(
        SinkType(
            name="console",
            description="readable lines on stdout",
            options=ConsoleOptions,
            create=ConsoleSink,
        )
    )

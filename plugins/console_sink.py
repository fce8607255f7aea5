"""The console sink: one readable line per slow statement on stdout, for trying by hand."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import msgspec

from pgslowlog.event import SlowQuery
from pgslowlog.hookspecs import hookimpl
from pgslowlog.plugin_manager import RegisterSink
from pgslowlog.sinks import BaseSink, SinkType


class ConsoleOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


def format_line(event: SlowQuery) -> str:
    who = f"{event.user}@{event.database}" if event.user else "?"
    query = " ".join(event.query.split())  # one line, whatever the query's layout
    flags = (" …" if event.query_truncated else "") + (
        " [backend exited]" if event.backend_exited else ""
    )
    stamp = event.ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return (
        f"{stamp} {event.duration_ms:10.1f} ms  pid {event.pid}  {who} {event.client or ''}  "
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

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
    line = (
        f"{stamp} {event.duration_ms:10.1f} ms  pid {event.pid}  {who} "
        f"{printable(event.client or '')}  "
        f"{query}{flags}"
    )
    why = format_why(event)
    return f"{line}\n{' ' * 24}why: {why}" if why else line


SNIPPET = 40  # characters of a blocker's statement shown


def format_why(event: SlowQuery) -> str | None:
    """What the definition could tell of why it was slow, in one line: where its time
    went, who blocked it, what it cost. None when it told nothing."""
    parts: list[str] = []
    if event.waits:
        looks = sum(event.waits.values())
        main, count = max(event.waits.items(), key=lambda item: item[1])
        share = round(100 * count / looks) if looks else 0
        parts.append(f"on CPU {share}%" if main == "CPU" else f"waited {share}% {main}")
    if event.blocked_by:
        first = event.blocked_by[0]
        pid = "a prepared transaction" if first.get("pid") == 0 else f"pid {first.get('pid')}"
        state = str(first.get("state") or "")
        if first.get("xact_age_s") is not None:
            state += f" {first['xact_age_s']:.0f} s"
        pieces = [state.strip()]
        if first.get("query"):
            text = " ".join(str(first["query"]).split())
            pieces.append(text[:SNIPPET] + ("…" if len(text) > SNIPPET else ""))
        detail = ": ".join(piece for piece in pieces if piece)
        direct = sum(1 for entry in event.blocked_by if entry.get("level") == 1)
        more = f" and {direct - 1} more" if direct > 1 else ""
        parts.append(f"blocked by {pid}{f' ({detail})' if detail else ''}{more}")
    why = ", ".join(parts)  # where its time went, and who made it wait
    if event.resources:
        cost = event.resources
        figures = [
            f"{cost[name]:,} {label}"
            for name, label in (
                ("shared_blks_hit", "blocks hit"),
                ("shared_blks_read", "read"),
                ("temp_blks_written", "temp written"),
                ("wal_records", "WAL records"),
            )
            if cost.get(name)
        ]
        if cost.get("cpu_ms") is not None:
            figures.insert(0, f"CPU {cost['cpu_ms']:.0f} ms")
        if figures:
            why = "; ".join(filter(None, (why, ", ".join(figures))))
    return printable(why) if why else None


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

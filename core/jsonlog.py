"""A slow statement as the line PostgreSQL's own jsonlog would hold (15+), for pgBadger.

With ``log_min_duration_statement`` PostgreSQL logs a finished statement as a LOG
line ``duration: N ms  statement: TEXT`` (simple protocol) or ``duration: N ms
execute NAME: TEXT`` (extended), its bound values in ``detail``. ``pgbadger -f
jsonlog`` reads such lines; this module writes them, so pgBadger reads pgslowlog's
file as if the server had logged it. What was decided, and why:

- ``timestamp`` is the statement's end (start + duration), when PostgreSQL would
  have written the line, in its format (``2026-12-03 15:34:51.177 UTC``), always UTC.
- Keys appear in PostgreSQL's order and, as there, only when known: no ``user`` or
  ``dbname`` when the backend had exited before it could be named, no
  ``remote_port`` for ``[local]``, no ``query_id`` when the definition does not
  read it. Keys pgslowlog cannot know (session_id, line_num, ps, vxid, txid,
  backend_type) are left out; pgBadger does not need them.
- The protocol unknown (the sampled definition does not tell) gives ``statement:``.
  An extended statement whose name the definition did not see gives ``execute
  <unnamed>``, as PostgreSQL writes the unnamed statement.
- ``detail`` is ``parameters: $1 = '...', $2 = NULL``, quotes doubled: the spelling
  of PostgreSQL 15 and 16 (17 writes "Parameters:"), the only one pgBadger 12 reads.
  Without captured values (capture_params, the extended definition) a text with
  placeholders $1..$n gets ``parameters: $1 = $1, ...``: pgBadger would otherwise
  show every placeholder as an empty string (see parameters_detail).
- A "}" right after an escaped quote in a text ('{"a":"b"}', a jsonb literal), and
  a "," after an escaped quote at a value's end (a text cut after '",'), are written
  as their JSON escapes, backslash-u007d and backslash-u002c: every JSON reader
  decodes the same text, and pgBadger's regex, which ends a value at quote-brace or
  quote-comma-quote, no longer cuts it there (it shows the escape instead).
- A failed or cancelled statement still gets its duration line, so pgBadger counts
  it among the slow queries (PostgreSQL itself would log only the ERROR, without
  the duration). Its outcome goes into an extra key, ``"outcome": "error"`` or
  ``"cancelled"``, which pgBadger ignores (an outcome the definition could not
  tell, "unknown", gets none); a text cut at track_activity_query_size
  adds ``"query_truncated": true``. No ERROR line is made up: the error's message
  and SQLSTATE are unknown, and one fed to pgBadger beside the server's own log
  would count the error twice.
- With [explain], an event that has its plan is written as auto_explain writes one
  with ``log_format = json``: ``duration: N ms  plan:`` and the plan as a JSON object
  (``"Query Text"`` first, then ``"Plan"``), in place of the statement line, so
  pgBadger counts the statement once and shows its plan. An event without one keeps
  its statement line and says why in ``"plan_error"``, a key pgBadger ignores.
- Each line ends in the event's ``"id"`` (pgBadger ignores it too), as every sink's
  output carries it.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Sequence
from typing import Optional

import msgspec

from pgslowlog.event import SlowQuery, terminal_safe

UNNAMED = "<unnamed>"  # PostgreSQL's name for the unnamed prepared statement
FAILED = ("error", "cancelled")  # the outcomes a line names


# Field order is the line's key order: PostgreSQL's (jsonlog.c), then pgslowlog's own.
class JsonLogLine(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    timestamp: str
    user: Optional[str] = None
    dbname: Optional[str] = None
    pid: Optional[int]
    remote_host: Optional[str] = None
    remote_port: Optional[int] = None
    error_severity: str  # no default: omit_defaults would leave it out
    message: str
    detail: Optional[str] = None
    application_name: Optional[str] = None
    query_id: Optional[int] = None
    outcome: Optional[str] = None  # only when not "ok"
    query_truncated: bool = False
    plan_error: Optional[str] = None  # [explain]: why the line has no plan
    id: Optional[str] = None  # the event's id, as every sink's output has it


def log_time(event: SlowQuery) -> str:
    """The statement's end in PostgreSQL's log_time format: milliseconds, truncated.

    In whole microseconds (a float holds today's epoch in microseconds exactly
    enough to round), the seconds formatted once per second: strftime costs more
    than all the rest of a line.
    """
    end_us = round(event.ts.timestamp() * 1e6 + event.duration_ms * 1e3)  # ts is aware UTC
    seconds, us = divmod(end_us, 1_000_000)
    return f"{_utc_seconds(seconds)}.{us // 1000:03d} UTC"


@functools.lru_cache(maxsize=64)
def _utc_seconds(seconds: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


def message(event: SlowQuery) -> str:
    if event.plan:
        return plan_message(event)
    if event.protocol == "extended":
        action = f"execute {event.statement_name or UNNAMED}"
    else:
        action = "statement"
    return f"duration: {event.duration_ms:.3f} ms  {action}: {event.query}"


def plan_message(event: SlowQuery) -> str:
    """auto_explain's line with log_format = json: the duration, then the plan as one
    JSON object, indented as PostgreSQL indents it, "Query Text" first."""
    assert event.plan  # EXPLAIN (FORMAT JSON) gives a list of one object
    explained = {"Query Text": event.query, **event.plan[0]}
    text = json.dumps(explained, indent=2, ensure_ascii=False)
    return f"duration: {event.duration_ms:.3f} ms  plan:\n{text}"


def parameters_detail(params: Optional[list[Optional[str]]], query: str) -> Optional[str]:
    parts = []
    for n, value in enumerate(params or [], start=1):
        if value is None:
            parts.append(f"${n} = NULL")
        else:
            parts.append(f"${n} = '" + value.replace("'", "''") + "'")
    # pgBadger puts the values of detail in place of $1, $2, ... and, given none,
    # empty strings: "where id = $1" would show as "where id = ". So placeholders
    # with no value ($1..$n without captured values; with redact_literals, the
    # constants numbered after the bound values) get "$k = $k": unquoted, no value
    # PostgreSQL would write (it quotes them or says NULL), so it is not one.
    if "$" in query:
        first = len(parts) + 1
        beyond = sorted({int(n) for n in _PLACEHOLDER.findall(query)} - set(range(1, first)))
        # Only a driver's or the redaction's numbering, first..k without a gap: no
        # detail bigger than the text for "$5" in a literal.
        if beyond and beyond == list(range(first, first + len(beyond))):
            parts += [f"${n} = ${n}" for n in beyond]
    return "parameters: " + ", ".join(parts) if parts else None


def plan_detail(text: str) -> Optional[str]:
    """$1 = $1 up to the highest $n of a plan line: a plan shows only the $n its nodes
    use ("(id = $2)" alone for "set v = $1 where id = $2"), so gaps are usual there."""
    highest = max((int(n) for n in _PLACEHOLDER.findall(text)), default=0)
    if not 0 < highest <= MAX_PLAN_PLACEHOLDERS:
        return None
    return "parameters: " + ", ".join(f"${n} = ${n}" for n in range(1, highest + 1))


MAX_PLAN_PLACEHOLDERS = 1000  # a "$99999" in a comment must not make a huge detail
_PLACEHOLDER = re.compile(r"\$(\d+)")
_CLIENT = re.compile(r"(.*)\((\d+)\)\Z", re.DOTALL)


@functools.lru_cache(maxsize=1024)  # a connection's statements share their client
def remote(client: Optional[str]) -> tuple[Optional[str], Optional[int]]:
    """Host and port of the event's client: 10.1.2.3(50312) -> 10.1.2.3 and 50312."""
    if client is None:
        return None, None
    if match := _CLIENT.match(client):
        return match[1], int(match[2])
    return client, None


def jsonlog_line(event: SlowQuery) -> JsonLogLine:
    host, port = remote(event.client)
    text = message(event)
    return JsonLogLine(
        timestamp=log_time(event),
        user=event.user,
        dbname=event.database,
        pid=event.pid,
        remote_host=host,
        remote_port=port,
        error_severity="LOG",
        message=text,
        # A plan line's $n (the plan's are the redacted text's) map to themselves:
        # pgBadger would put the values, or given none empty strings, into the plan.
        detail=parameters_detail(event.params, event.query)
        if not event.plan
        else plan_detail(text),
        application_name=event.application_name,
        query_id=event.query_id,
        # Only what is known to have failed: "unknown" (sampled, when no failure uprobe
        # could tell) is no news to a reader of a slow-query log.
        outcome=event.outcome if event.outcome in FAILED else None,
        query_truncated=event.query_truncated,
        plan_error=event.plan_error,
        id=event.id,
    )


def jsonlog_lines(events: Sequence[SlowQuery]) -> bytes:
    """One jsonlog line per event, newline-terminated, encoded in one call (file sink)."""
    encoded = terminal_safe(_encoder.encode_lines([jsonlog_line(e) for e in events]))
    # pgBadger finds a value's end by the regex '"(.*?)"(,"|})', so an escaped quote
    # followed by "}" in a text ('{"a":"b"}', a jsonb literal), or by "," where the
    # value ends (a text cut after '",'), cuts the value there. Both may be written
    # as \u escapes in JSON: every JSON reader gets the same text back.
    if b'\\"}' in encoded or b'\\",' in encoded:
        encoded = _QUOTE_THEN_END.sub(_escape_end, encoded)
    return encoded


def _escape_end(match: re.Match[bytes]) -> bytes:
    return match[1] + (b"\\u007d" if match[2] == b"}" else b"\\u002c")


_encoder = msgspec.json.Encoder()
# an escaped quote (an odd run of backslashes before it) followed by "}", or by ","
# and the value's closing quote
_QUOTE_THEN_END = re.compile(rb'(?<!\\)((?:\\\\)*\\")(}|,(?="))')

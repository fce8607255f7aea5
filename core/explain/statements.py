"""What may be explained, and the fingerprint every event carries. Pure: pglast only.

The text comes from users, so it is parsed before anything is sent: it must be one
statement, of a kind EXPLAIN plans without running anything else (SELECT, VALUES,
TABLE, WITH; INSERT, UPDATE, DELETE, MERGE, which planning checks privileges for).
The text explained is the redacted one (constants become $n, redaction.py), so the
plan's constants are placeholders too.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional, Union

import msgspec
from pglast import parser

from pgslowlog.redaction import redact_literals

# What EXPLAIN plans: the node names of the parse tree's statements.
PLANNABLE = {
    "SelectStmt": "SELECT",  # also VALUES, TABLE and WITH ... SELECT
    "InsertStmt": "INSERT",
    "UpdateStmt": "UPDATE",
    "DeleteStmt": "DELETE",
    "MergeStmt": "MERGE",
}


@functools.lru_cache(maxsize=4096)  # texts repeat: one parse per distinct text
def fingerprint(text: str) -> Optional[str]:
    """pglast's fingerprint: the same for texts that differ only in constants, $n,
    whitespace and comments. None for a text that does not parse (cut, say)."""
    try:
        return str(parser.fingerprint(text))
    except (parser.ParseError, ValueError, RecursionError):  # a lone surrogate: ValueError
        return None


class Plannable(NamedTuple):
    text: str  # what is sent after EXPLAIN: redacted, constants as $n
    kind: str  # "SELECT", "UPDATE", ...
    parameters: int  # the highest $n in the text (0: none)


def highest_parameter(text: str) -> int:
    numbers = [
        int(text[token.start + 1 : token.end + 1])
        for token in parser.scan(text)
        if token.name == "PARAM" and text[token.start + 1 : token.end + 1].isdigit()
    ]
    return max(numbers, default=0)


class _Statement(msgspec.Struct):
    stmt: dict[str, msgspec.Raw]  # {"SelectStmt": ...}: its inside is decoded only if needed


class _Parsed(msgspec.Struct):
    stmts: list[_Statement] = []


class _Select(msgspec.Struct):
    intoClause: Any = None  # the parse tree's name; only this key is decoded


_parsed = msgspec.json.Decoder(_Parsed)
_select = msgspec.json.Decoder(_Select)


@functools.lru_cache(maxsize=4096)
def plannable(text: str, truncated: bool = False) -> Union[Plannable, str]:
    """The statement to explain, or why none is (a one-line reason for plan_error).

    Parsed to JSON in C and only its top decoded: pglast's Python tree costs ten times
    as much. The redacted text is not parsed again: redaction puts $n where constants
    were and no ";", and the server (which sees one statement per Parse) rejects what
    is no longer SQL (a constant where only a literal may stand, as in varchar(10))."""
    if truncated:
        return "not explained: the text was cut at query_max_bytes"
    if "\0" in text:  # the parser would stop there, and the server never sees one
        return "not explained: the text holds a NUL character"
    try:
        statements = _parsed.decode(parser.parse_sql_json(text)).stmts
        redacted = redact_literals(text)
    except parser.ParseError as error:
        return f"not explained: the text does not parse: {error.args[0]}"
    except (ValueError, RecursionError) as error:  # a lone surrogate, say
        return f"not explained: the text cannot be parsed: {type(error).__name__}"
    if len(statements) != 1:
        return f"not explained: {len(statements)} statements in one text"
    ((name, inside),) = statements[0].stmt.items()
    if name not in PLANNABLE:
        return f"not explained: {name} is not a plannable statement"
    if name == "SelectStmt" and _select.decode(inside).intoClause is not None:
        return "not explained: SELECT INTO creates a table"
    return Plannable(redacted, PLANNABLE[name], highest_parameter(redacted))

"""Literal redaction: constants in query text become $n, as pg_stat_statements shows them.

PostgreSQL's own scanner (through pglast's libpg_query) finds the constants, so
quoting rules (dollar quotes, E'' escapes, U&'' strings, bit strings) are the
server's, not a regular expression's guess. Scanning, not parsing: text cut at
query_max_bytes, or several statements in one string, are still redacted.
Comments are kept, as in pg_stat_statements.
"""

from __future__ import annotations

from pglast import parser

# The scanner's token names for literal constants.
CONSTANT_TOKENS = frozenset({"SCONST", "USCONST", "ICONST", "FCONST", "BCONST", "XCONST"})
REDACTED_PARAMETER = "<redacted>"


def _scan(text: str) -> list[parser.Token]:
    """The tokens; a CUT token where the scanner gave up, and nothing after it.

    The usual cause is a string literal cut off by query_max_bytes: everything from
    the error on is dropped, since it may be that literal's content.
    """
    try:
        return list(parser.scan(text))
    except parser.ParseError as error:
        index = error.args[1] if len(error.args) > 1 and isinstance(error.args[1], int) else 0
        index = max(0, min(index, len(text)))
    try:
        return [*parser.scan(text[:index]), _cut_token(index)]
    except parser.ParseError:
        return [_cut_token(0)]


def _cut_token(index: int) -> parser.Token:
    return parser.Token(start=index, end=-1, name="CUT", kind="NO_KEYWORD")


def redact_literals(text: str) -> str:
    """The text with each constant replaced by $n, numbered after any $n already there."""
    tokens = _scan(text)
    numbers = [
        int(text[token.start + 1 : token.end + 1])
        for token in tokens
        if token.name == "PARAM" and text[token.start + 1 : token.end + 1].isdigit()
    ]
    number = max(numbers, default=0)
    pieces: list[str] = []
    position = 0
    for token in tokens:
        if token.name == "CUT":
            number += 1
            pieces += [text[position : token.start], f"${number}"]
            return "".join(pieces)
        if token.name in CONSTANT_TOKENS:
            number += 1
            pieces += [text[position : token.start], f"${number}"]
            position = token.end + 1
    pieces.append(text[position:])
    return "".join(pieces)


def redact_parameters(params: list[str | None] | None) -> list[str | None] | None:
    """Bound values are literals too: each is replaced, NULL stays NULL."""
    if params is None:
        return None
    return [None if value is None else REDACTED_PARAMETER for value in params]

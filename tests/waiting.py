"""Waiting for a condition: the one polling loop of the tests.

A test that waits names what it waits for, and when the time runs out it fails saying
what that was and what it saw last, never with a bare timeout. Nothing here waits for a
period: a sleep that stands for "by now it has happened" hides a race; this asks again
until it has happened.

Absence is not waited for at all: a test that must show nothing more arrives stops the
daemon (which drains its sources and sink queues before it exits) and then counts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], timeout: float = 10, what: str = "", interval: float = 0.02
) -> T:
    """`predicate()`'s first truthy value, asked every `interval` s for `timeout` s.

    The last look is at or after the deadline, so what got there just in time passes.
    On timeout: AssertionError naming `what` and the last value the predicate gave.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            shown = repr(value)
            if len(shown) > 2000:
                shown = shown[:2000] + "..."
            raise AssertionError(f"not within {timeout} s: {what or predicate}; last: {shown}")
        time.sleep(interval)


class Counted(list):  # type: ignore[type-arg]
    """Items found so far: true once there are at least `wanted`, shown with both counts."""

    def __init__(self, items: Iterable[Any], wanted: int) -> None:
        super().__init__(items)
        self.wanted = wanted

    def __bool__(self) -> bool:
        return len(self) >= self.wanted

    def __repr__(self) -> str:
        return f"{len(self)} of the {self.wanted} wanted: {list.__repr__(self)}"


def wait_for_count(
    find: Callable[[], Iterable[Any]], count: int, what: str, timeout: float = 10
) -> list[Any]:
    """What `find` returns once it holds at least `count` items (more: a duplicate is the
    caller's to see); AssertionError naming `what` and what had arrived if time runs out."""
    return list(wait_until(lambda: Counted(find(), count), timeout, f"{count} {what}"))


def json_lines_written(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a file a sink is still appending to, one per line: only the
    lines written whole (a poll may read the file in the middle of a write); [] while
    the file is not there."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.split("\n")[:-1] if line]

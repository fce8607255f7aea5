"""The file sink: one JSON object per line, appended; SIGHUP reopens (logrotate).

format = "json" (the default) writes pgslowlog's own object (event.py); "jsonlog"
writes PostgreSQL's jsonlog line (jsonlog.py), for ``pgbadger -f jsonlog``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec

from pgslowlog.event import SlowQuery, json_lines
from pgslowlog.hookspecs import hookimpl
from pgslowlog.jsonlog import jsonlog_lines
from pgslowlog.log import get_logger
from pgslowlog.plugin_manager import RegisterSink
from pgslowlog.sinks import BaseSink, SinkType, check_writable

log = get_logger(__name__)
FILE_MODE = 0o640
DIRECTORY_MODE = 0o750


ENCODERS: dict[str, Callable[[Sequence[SlowQuery]], bytes]] = {
    "json": json_lines,
    "jsonlog": jsonlog_lines,
}


class FileSinkOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    path: str
    format: str = "json"

    def __post_init__(self) -> None:
        # A str checked here, not a Literal: the error then names the choices.
        if self.format not in ENCODERS:
            raise ValueError(
                f"format = {self.format!r} is not a format; use "
                + " or ".join(f'"{name}"' for name in ENCODERS)
            )


TORN_TAIL_SEARCH_BYTES = 1 << 20  # far more than one event's line


def remove_torn_line(path: Path) -> None:
    """Cut a last line left half-written (a daemon killed inside write()), so every line parses.

    A write to a file can stop at a page boundary when SIGKILL arrives. The cut
    piece was never a whole event: it is logged with its size, not kept.
    """
    with path.open("r+b") as file:
        size = file.seek(0, os.SEEK_END)
        if size == 0:
            return
        start = max(0, size - TORN_TAIL_SEARCH_BYTES)
        file.seek(start)
        tail = file.read()
        if tail.endswith(b"\n"):
            return
        keep = start + tail.rfind(b"\n") + 1 if b"\n" in tail else start
        file.truncate(keep)
    log.warning("file_sink_torn_line_removed", path=str(path), bytes=size - keep)


class FileSink(BaseSink):
    def __init__(self, options: FileSinkOptions) -> None:
        self.path = Path(options.path)
        self._encode = ENCODERS[options.format]
        self._fd = self._open()

    def _open(self) -> int:
        self.path.parent.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, FILE_MODE)
            # The mode given to open() is filtered by the umask (0077 under systemd).
            os.fchmod(fd, FILE_MODE)
        except FileExistsError:
            remove_torn_line(self.path)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        return fd

    def write(self, events: Sequence[SlowQuery]) -> None:
        # One write() per batch with O_APPEND: readers never see half a line.
        data = self._encode(events)
        size_before = os.fstat(self._fd).st_size
        try:
            while data:
                data = data[os.write(self._fd, data) :]
        except OSError:
            # A full disk can take part of the batch: cut it off, so the file keeps
            # whole lines and the next batch starts on a fresh one. The batch counts
            # as failed (dispatcher); later batches are written once space returns.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size_before)
            raise

    def reopen(self) -> None:
        fd = self._open()
        os.close(self._fd)
        self._fd = fd

    def close(self) -> None:
        os.close(self._fd)


def check_options(options: FileSinkOptions) -> None:
    """What `check` looks at: the file can be written (or made) where it is."""
    check_writable("path", options.path)


@hookimpl
def pgslowlog_register_sinks(register: RegisterSink) -> None:
    register(
        SinkType(
            name="file",
            description="append one JSON line per slow statement to a file (ours, or jsonlog)",
            options=FileSinkOptions,
            create=FileSink,
            check=check_options,
        )
    )

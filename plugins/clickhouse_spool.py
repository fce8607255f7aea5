"""The clickhouse sink's spool: batches ClickHouse did not take yet, on disk, in order.

One file per batch, `<sequence>-<events>.jsonl`, each line an event as every sink's
JSON has it (SlowQuery.to_json), so a spool outlives the daemon (a SIGKILL, a reboot)
and the next start delivers it; rows are made when sent, for the table's layout then.
A file is written under a temporary name and renamed: a spool never holds half a
batch. Past `max_bytes` the oldest batches go first, counted: the newest say most about
what is slow now. Not thread-safe: the sink serialises calls with its own lock.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import msgspec

from pgslowlog.event import SlowQuery, json_lines
from pgslowlog.log import get_logger

log = get_logger(__name__)
SUFFIX = ".jsonl"
_decoder = msgspec.json.Decoder(SlowQuery)


@dataclass(frozen=True)
class Batch:
    path: Path
    sequence: int
    events: int
    size: int

    def read(self) -> list[SlowQuery]:
        return [_decoder.decode(line) for line in self.path.read_bytes().splitlines() if line]


class Spool:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.dropped = 0  # events dropped because the spool was full
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._batches: list[Batch] = []
        for path in directory.iterdir():
            if path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)  # a write a crash cut short: never renamed
                continue
            batch = _parse(path)
            if batch is not None:
                self._batches.append(batch)
        self._batches.sort(key=lambda batch: batch.sequence)
        self._next = self._batches[-1].sequence + 1 if self._batches else 0
        self.bytes = sum(batch.size for batch in self._batches)

    @property
    def events(self) -> int:
        return sum(batch.events for batch in self._batches)

    def __bool__(self) -> bool:
        return bool(self._batches)

    def append(self, events: list[SlowQuery]) -> None:
        """Keep a batch, after the others; drop the oldest if the spool is then full."""
        data = json_lines(events)
        name = f"{self._next:012d}-{len(events)}{SUFFIX}"
        temporary = self.directory / f"{name}.tmp"
        with open(temporary, "wb") as file:
            file.write(data)
        final = self.directory / name
        os.replace(temporary, final)
        self._batches.append(Batch(final, self._next, len(events), len(data)))
        self._next += 1
        self.bytes += len(data)
        self._trim()

    def oldest(self) -> Batch | None:
        return self._batches[0] if self._batches else None

    def remove(self, batch: Batch) -> None:
        """The batch was delivered (or cannot ever be): forget it."""
        self._batches.remove(batch)
        self.bytes -= batch.size
        batch.path.unlink(missing_ok=True)

    def _trim(self) -> None:
        while self.bytes > self.max_bytes and len(self._batches) > 1:
            oldest = self._batches[0]
            self.remove(oldest)
            before = self.dropped
            self.dropped += oldest.events
            if before == 0 or before // 1000 != self.dropped // 1000:
                log.warning(
                    "clickhouse_spool_full",
                    directory=str(self.directory),
                    dropped=self.dropped,
                    fix="ClickHouse has not taken events for a while: bring it back, or "
                    "raise sinks.clickhouse.spool_max_mb",
                )


def _parse(path: Path) -> Batch | None:
    stem = path.name.removesuffix(SUFFIX)
    sequence, _, events = stem.partition("-")
    if not path.name.endswith(SUFFIX) or not sequence.isdigit() or not events.isdigit():
        return None  # not ours: left alone
    try:
        size = path.stat().st_size
    except OSError:
        return None
    return Batch(path, int(sequence), int(events), size)

"""The clickhouse sink's spool: batches on their way to ClickHouse, on disk, in order.

One file per batch, `<sequence>-<events>.jsonl`, each line an event as every sink's
JSON has it (SlowQuery.to_json), so a spool outlives the daemon (a SIGKILL, a reboot)
and the next start sends it; rows are made when sent, for the table's layout then.
A file is written under a temporary name, synced, and renamed: a spool never holds
half a batch, even after a power loss. Past `max_bytes` the oldest batches go first,
counted (the newest say most about what is slow now), but never those being sent.
One daemon per directory: a lock file says whose it is. Not thread-safe: the sink
serialises calls with its own lock.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

import msgspec

from pgslowlog.event import SlowQuery, json_lines
from pgslowlog.log import get_logger

log = get_logger(__name__)
SUFFIX = ".jsonl"
LOCK = ".lock"
_decoder = msgspec.json.Decoder(SlowQuery)


@dataclass(frozen=True)
class Batch:
    path: Path
    sequence: int
    events: int
    size: int

    def read(self) -> list[SlowQuery]:
        """Its events; ValueError if the file does not hold as many as its name says."""
        events = [_decoder.decode(line) for line in self.path.read_bytes().splitlines() if line]
        if len(events) != self.events:
            raise ValueError(f"{self.path.name} holds {len(events)} events, not {self.events}")
        return events


class SpoolInUse(ValueError):
    pass


class Spool:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.dropped = 0  # events dropped: the spool full, or a batch set aside
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_file = open(directory / LOCK, "a")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise SpoolInUse(
                f"spool_dir {directory} is in use by another pgslowlog: give each daemon on "
                "a machine a spool_dir of its own"
            ) from None
        self._batches: list[Batch] = []
        self._sending: list[Batch] = []  # taken by the sender: kept off _trim
        # The newest batch's events, kept in memory too: with ClickHouse taking them,
        # the spool holds one batch at a time, sent without reading it back.
        self._newest: tuple[Batch, list[SlowQuery]] | None = None
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
        """Keep a batch, after the others; drop the oldest if the spool is then full.
        Raises OSError (a full disk) with nothing of the batch left behind."""
        data = json_lines(events)
        sequence, self._next = self._next, self._next + 1  # never reused, even on failure
        name = f"{sequence:012d}-{len(events)}{SUFFIX}"
        temporary = self.directory / f"{name}.tmp"
        final = self.directory / name
        try:
            with open(temporary, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, final)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        batch = Batch(final, sequence, len(events), len(data))
        self._batches.append(batch)
        self._newest = (batch, events)
        try:
            _sync_directory(self.directory)
        except OSError as error:  # the file is there: only a power loss could undo it
            log.warning(
                "clickhouse_spool_not_synced", directory=str(self.directory), error=str(error)
            )
        self.bytes += len(data)
        self._trim()

    def take_oldest(self, max_events: int) -> list[Batch]:
        """The oldest batches, to send in one go: as many as hold `max_events` events at
        most (one at least). They stay in the spool, but are not trimmed away."""
        taken, events = [self._batches[0]], self._batches[0].events
        for batch in self._batches[1:]:
            if events + batch.events > max_events:
                break
            taken.append(batch)
            events += batch.events
        self._sending = list(taken)  # its own list: give_back() empties it, not the caller's
        return taken

    def read(self, batch: Batch) -> list[SlowQuery]:
        """Its events: from memory if it is the newest, else from its file. Safe without
        the sink's lock: one read of _newest, which append() replaces whole."""
        newest = self._newest
        if newest is not None and newest[0] is batch:
            return newest[1]
        return batch.read()

    def give_back(self, batch: Batch) -> None:
        """Not sent: it may be trimmed again."""
        if batch in self._sending:
            self._sending.remove(batch)

    def remove(self, batch: Batch) -> None:
        """The batch was delivered (or trimmed): forget it, and its file."""
        self._forget(batch)
        try:
            batch.path.unlink(missing_ok=True)
        except OSError as error:  # delivered: sent again at the next start, counted once
            log.warning("clickhouse_spool_not_removed", file=str(batch.path), error=str(error))

    def set_aside(self, batch: Batch, suffix: str) -> Path:
        """A batch that can never go: out of the spool, counted as dropped, its file
        renamed (left alone by later starts) for a look. The new path."""
        self._forget(batch)
        self.dropped += batch.events
        kept = batch.path.with_name(batch.path.name + suffix)
        try:
            os.replace(batch.path, kept)
        except OSError:
            return batch.path  # gone, or not renamable: said as it is
        return kept

    def _forget(self, batch: Batch) -> None:
        self.give_back(batch)
        if batch in self._batches:
            self._batches.remove(batch)
            self.bytes -= batch.size
        if self._newest is not None and self._newest[0] is batch:
            self._newest = None

    def close(self) -> None:
        self._lock_file.close()  # and with it the lock

    def _trim(self) -> None:
        while self.bytes > self.max_bytes:
            victims = [batch for batch in self._batches[:-1] if batch not in self._sending]
            if not victims:
                return  # the newest, and the one being sent, stay
            oldest = victims[0]
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


def _sync_directory(directory: Path) -> None:
    """The rename itself survives a power loss once the directory is synced."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


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

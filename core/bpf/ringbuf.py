"""Reads a BPF ring buffer straight from its shared memory, many records per call.

bcc's reader calls a Python function through ctypes for every record, and the
kernel wakes the reader for each record that finds it caught up: at tens of
thousands of statements a second (threshold 0) that is a context switch and a
foreign call per statement, on the cores PostgreSQL needs. Here the kernel wakes
the reader only when the buffer fills up or a record is urgent (slow_query.h
decides), the reader also looks every `poll_interval_ms`, and each look takes
everything committed so far in one Python loop.

The layout is the kernel's (kernel/bpf/ringbuf.c), the one libbpf reads: page 0
holds the consumer position (ours to write), page 1 the producer position, then
the data area, mapped twice in a row so a record that wraps reads contiguously.
Each record starts with an 8-byte header: u32 length with a busy bit (still being
written) and a discard bit, then u32 page offset. Records are 8-byte aligned.
"""

from __future__ import annotations

import mmap
import select
import struct
from collections.abc import Callable
from typing import Optional

from pgslowlog.bpf.decoder import RecordDecoder
from pgslowlog.records import Record

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER_BYTES = 8
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class RingBuffer:
    """One BPF_MAP_TYPE_RINGBUF, given its map fd and data size in bytes."""

    def __init__(self, map_fd: int, size: int) -> None:
        if size <= 0 or size & (size - 1):
            raise ValueError(f"ring buffer size {size} is not a power of two")
        page = mmap.PAGESIZE
        self._mask = size - 1
        self._consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._producer = mmap.mmap(
            map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page
        )
        self._data = memoryview(self._producer)[page:]
        self._epoll = select.epoll()
        self._epoll.register(map_fd, select.EPOLLIN)

    def wait(self, timeout_ms: int) -> None:
        """Sleep until the kernel wakes us (buffer filling, urgent record) or the timeout."""
        try:
            self._epoll.poll(timeout_ms / 1000)
        except InterruptedError:  # a signal: the caller looks at the buffer anyway
            pass

    def pending(self) -> bool:
        """Whether anything was written since the last read: two loads, no call."""
        consumer: int = _U64.unpack_from(self._consumer)[0]
        producer: int = _U64.unpack_from(self._producer)[0]
        return consumer != producer

    def read(self, limit: int = 1 << 30) -> list[bytes]:
        """Every committed record (up to `limit`), oldest first; their space is given back."""
        consumer = _U64.unpack_from(self._consumer)[0]
        producer = _U64.unpack_from(self._producer)[0]
        records, consumer = take_records(self._data, consumer, producer, self._mask, limit)
        _U64.pack_into(self._consumer, 0, consumer)
        return records

    def close(self) -> None:
        self._epoll.close()
        self._data.release()
        self._producer.close()
        self._consumer.close()


def take_records(
    data: memoryview | bytes, consumer: int, producer: int, mask: int, limit: int
) -> tuple[list[bytes], int]:
    """The committed records between the two positions, and the new consumer position.

    `data` is the data area mapped twice in a row, so a record that wraps past the
    end reads contiguously. Stops at a record still being written (busy), since the
    ones after it must wait their turn; skips discarded ones.
    """
    records: list[bytes] = []
    unpack = _U32.unpack_from
    # The kernel clears the busy bit with a release store after writing the record.
    # On x86 (TSO, where this was tested) plain loads keep that order.
    while consumer < producer and len(records) < limit:
        at = consumer & mask
        length = unpack(data, at)[0]
        if length & BUSY_BIT:
            break
        size = length & ~(BUSY_BIT | DISCARD_BIT)
        if not length & DISCARD_BIT:
            records.append(bytes(data[at + HEADER_BYTES : at + HEADER_BYTES + size]))
        consumer += (size + HEADER_BYTES + 7) & ~7
    return records, consumer


def ring_buffer_fd_size(fd: int) -> int:
    """Bytes of data in the ring buffer behind `fd`, from /proc/self/fdinfo."""
    with open(f"/proc/self/fdinfo/{fd}") as info:
        for line in info:
            if line.startswith("max_entries:"):
                return int(line.split()[1])
    raise OSError(f"fd {fd} is not a BPF map")


class RingBufferReader:
    """The sources.RecordReader of one BPF program: its main ring buffer, then its
    spill one, decoded by the program's own RecordDecoder.

    The main ring buffer wakes the reader; the spill one (records the main one
    refused, rare) is read at every look.
    """

    # The decoder's own method, not one that calls it: the collector calls it once a
    # record, and at threshold 0 that is every statement.
    decode: Callable[[bytes], Optional[Record]]

    def __init__(self, rings: list[RingBuffer], decoder: RecordDecoder) -> None:
        self._rings = rings
        self.decoder = decoder
        self.decode = decoder.decode

    def wait(self, timeout_ms: int) -> None:
        self._rings[0].wait(timeout_ms)

    def pending(self) -> bool:
        return any(ring.pending() for ring in self._rings)

    def read(self, limit: int) -> list[bytes]:
        self.decoder.sync_clock()  # once per batch: every record of it gets one offset
        records: list[bytes] = []
        for ring in self._rings:
            if len(records) < limit:
                records += ring.read(limit - len(records))
        return records

    def close(self) -> None:
        for ring in self._rings:
            ring.close()

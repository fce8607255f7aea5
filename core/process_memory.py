"""Reads another process's memory without stopping it: process_vm_readv(2).

The sampler reads PostgreSQL's own bookkeeping (the backend status array and the
PGPROC array live in shared memory, mapped at the same address in every process of
a cluster, so the postmaster's view serves for all backends). One system call
reads many ranges: the kernel copies each remote range into its local buffer.
Needs CAP_SYS_PTRACE over the target (root has it), as /proc/PID/mem would.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from collections.abc import Callable, Sequence

_IOV_MAX = 1024  # UIO_MAXIOV: ranges per system call


class _Iovec(ctypes.Structure):
    _fields_ = (("base", ctypes.c_void_p), ("length", ctypes.c_size_t))


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_readv = _libc.process_vm_readv
_readv.restype = ctypes.c_ssize_t
_readv.argtypes = [
    ctypes.c_int,
    ctypes.POINTER(_Iovec),
    ctypes.c_ulong,
    ctypes.POINTER(_Iovec),
    ctypes.c_ulong,
    ctypes.c_ulong,
]


class MemoryReadError(OSError):
    """The process is gone, or a range is not mapped in it."""


def read_ranges(pid: int, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    """Each (address, size) of `pid`'s memory, in as few system calls as the kernel allows.

    A range that is not mapped (or a process that is gone) raises MemoryReadError:
    the caller decides whether one bad range spoils the rest.
    """
    results: list[bytes] = []
    for start in range(0, len(ranges), _IOV_MAX):
        chunk = ranges[start : start + _IOV_MAX]
        buffers = [ctypes.create_string_buffer(size) for _, size in chunk]
        local = (_Iovec * len(chunk))(
            *(
                _Iovec(ctypes.addressof(buffer), size)
                for buffer, (_, size) in zip(buffers, chunk)  # one buffer per range
            )
        )
        remote = (_Iovec * len(chunk))(*(_Iovec(address, size) for address, size in chunk))
        wanted = sum(size for _, size in chunk)
        got = _readv(pid, local, len(chunk), remote, len(chunk), 0)
        if got < 0:
            error = ctypes.get_errno()
            raise MemoryReadError(error, f"reading pid {pid}: {os.strerror(error)}")
        if got != wanted:
            # Partial: the kernel stops at the first range it cannot read.
            raise MemoryReadError(0, f"reading pid {pid}: {got} of {wanted} bytes readable")
        results += [buffer.raw for buffer in buffers]
    return results


class RangeReader:
    """The same ranges of one process, read again and again into one reused buffer:
    at a hundred looks a second over many backends, making a buffer and an iovec per
    range each time costs more than the system call."""

    def __init__(self, pid: int, ranges: Sequence[tuple[int, int]]) -> None:
        if len(ranges) > _IOV_MAX:
            raise ValueError(f"{len(ranges)} ranges: at most {_IOV_MAX} per read")
        self.pid = pid
        self.offsets: list[int] = []
        total = 0
        for _, size in ranges:
            self.offsets.append(total)
            total += size
        self._buffer = ctypes.create_string_buffer(total)
        base = ctypes.addressof(self._buffer)
        self._local = (_Iovec * len(ranges))(
            *(_Iovec(base + at, size) for at, (_, size) in zip(self.offsets, ranges))
        )
        self._remote = (_Iovec * len(ranges))(*(_Iovec(address, size) for address, size in ranges))
        self._count = len(ranges)
        self._total = total
        self._view = memoryview(self._buffer).cast("B")[:total]

    def read(self) -> memoryview:
        """Every range, one after the other (see `offsets`), in the reused buffer: valid
        until the next read, not copied."""
        got = _readv(self.pid, self._local, self._count, self._remote, self._count, 0)
        if got < 0:
            error = ctypes.get_errno()
            raise MemoryReadError(error, f"reading pid {self.pid}: {os.strerror(error)}")
        if got != self._total:
            raise MemoryReadError(0, f"reading pid {self.pid}: {got} of {self._total} bytes")
        return self._view


class Peeker:
    """Small reads of one process, one after another (a linked list followed through
    shared memory), into one reused buffer: making a buffer and two iovecs per read
    costs several times the system call itself."""

    def __init__(self, pid: int, largest: int = 4096) -> None:
        self.pid = pid
        self._buffer = ctypes.create_string_buffer(largest)
        self._base = ctypes.addressof(self._buffer)
        self._largest = largest
        self._local = _Iovec(self._base, 0)
        self._remote = _Iovec(0, 0)
        self._local_ref = ctypes.byref(self._local)
        self._remote_ref = ctypes.byref(self._remote)

    def read(self, address: int, size: int) -> bytes:
        if size > self._largest:
            return read(self.pid, address, size)
        self._local.length = self._remote.length = size
        self._remote.base = address
        got = _readv(self.pid, self._local_ref, 1, self._remote_ref, 1, 0)
        if got != size:
            error = ctypes.get_errno() if got < 0 else 0
            raise MemoryReadError(error, f"reading pid {self.pid}: {got} of {size} bytes")
        return ctypes.string_at(self._base, size)


class SharedMapping:
    """Another process's shared mapping (PostgreSQL's main shared memory segment),
    mapped read-only into this process through /proc/PID/map_files.

    Reading it is reading memory: no system call, and no lock of the other process's
    address space (process_vm_readv takes the target's mmap lock at every call, which
    the postmaster also takes to fork a backend). Opening a map_files entry needs
    CAP_SYS_ADMIN (or CAP_CHECKPOINT_RESTORE), which the daemon holds for its uprobes;
    without it, for a mapping that is not shared, or where holding it could keep
    PostgreSQL from making a new one (_never_mapped), NotShareable says why and the
    caller reads by copies instead. The mapping keeps the segment alive while it
    exists: `current()` tells whether the process still maps this very segment (a
    postmaster that reset its shared memory after a crash has a new one), and the
    caller closes it when not.
    """

    def __init__(self, pid: int, address: int) -> None:
        self.pid = pid
        found = _shared_range(pid, address)
        if found is None:
            raise NotShareable(f"pid {pid} has no shared mapping at {address:#x}")
        self.start, end, offset = found
        self._entry = f"/proc/{pid}/map_files/{self.start:x}-{end:x}"
        try:
            descriptor = os.open(self._entry, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as error:
            raise NotShareable(f"{self._entry}: {error.strerror}") from None
        try:
            status = os.fstat(descriptor)
            if (why := _never_mapped(status)) is not None:
                raise NotShareable(why)
            self._identity = (status.st_dev, status.st_ino)
            self._map = mmap.mmap(
                descriptor, end - self.start, mmap.MAP_SHARED, mmap.PROT_READ, offset=offset
            )
        except (OSError, ValueError) as error:
            raise NotShareable(f"{self._entry}: {error}") from None
        finally:
            os.close(descriptor)
        self.end = end
        self.view = memoryview(self._map)

    def current(self) -> bool:
        """The process still maps this segment at the same place (one stat, ~5 us)."""
        try:
            status = os.stat(self._entry)
        except OSError:
            return False
        return (status.st_dev, status.st_ino) == self._identity

    def close(self) -> None:
        self.view.release()
        self._map.close()


class NotShareable(Exception):
    """Why a mapping could not be shared (the caller copies instead)."""


def _never_mapped(segment: os.stat_result) -> str | None:
    """Why a segment must not be mapped here: while mapped, it outlives the process
    that made it. PostgreSQL unmaps its segment and makes a new one at once when it
    resets after a crash; with the old one still held, a new segment of huge pages
    (a pool sized for one) or, under strict overcommit, any new segment can fail, and
    the server would stop instead of recovering."""
    if segment.st_blksize > mmap.PAGESIZE:
        return "a segment of huge pages"
    try:
        with open("/proc/sys/vm/overcommit_memory") as setting:
            strict = setting.read().strip() == "2"
    except OSError:
        strict = True  # unknown: assume the worst
    return "vm.overcommit_memory = 2 (strict)" if strict else None


def _shared_range(pid: int, address: int) -> tuple[int, int, int] | None:
    """(start, end, file offset) of the shared mapping of `pid` that holds `address`."""
    try:
        with open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                start, end = (int(bound, 16) for bound in fields[0].split("-"))
                if start <= address < end:
                    return (start, end, int(fields[2], 16)) if fields[1][3] == "s" else None
    except OSError:
        return None
    return None


def read(pid: int, address: int, size: int) -> bytes:
    return read_ranges(pid, [(address, size)])[0]


def read_pointer(pid: int, address: int) -> int:
    return int.from_bytes(read(pid, address, 8), "little")


def read_c_string(
    pid: int, address: int, limit: int, still_ours: Callable[[], bool] = lambda: True
) -> bytes:
    """A NUL-terminated string of at most `limit` bytes (without the NUL).

    Read in pieces that do not cross a page, so a string near the end of a mapping
    is read up to its NUL without touching the next, unmapped page. `still_ours` is
    asked before each piece: False (the process is not the one meant any more) stops
    the reading with MemoryReadError.
    """
    out = bytearray()
    page = 4096
    while len(out) < limit:
        size = min(page - (address % page), limit - len(out))
        if not still_ours():
            raise MemoryReadError(0, f"pid {pid} is not the process it was")
        piece = read(pid, address, size)
        end = piece.find(b"\0")
        if end >= 0:
            return bytes(out + piece[:end])
        out += piece
        address += size
    return bytes(out)


def load_bias(pid: int, binary_inode: int) -> int | None:
    """Where `pid` mapped the binary's file offset 0 (the caller subtracts the file
    address that offset has, elf.PostgresBinary.base_vaddr, to get the load bias).

    The inode alone identifies the file: overlay file systems show another device
    here than stat() does.
    """
    try:
        with open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) < 6 or int(fields[4]) != binary_inode:
                    continue
                if int(fields[2], 16) == 0:
                    return int(fields[0].split("-")[0], 16)
    except OSError:
        return None
    return None

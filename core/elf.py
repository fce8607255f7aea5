"""What a PostgreSQL binary offers a probe: its version, functions, globals, USDT probes.

Uprobes are placed by file offset, so addresses are translated through the PT_LOAD
segment that contains them (this works for PIE and non-PIE builds alike). A
stripped distribution binary has only the dynamic symbol table; a full build has
`.symtab` too, with static functions such as exec_simple_query. USDT probes come
from the `.note.stapsdt` notes of a build made with --enable-dtrace.
"""

from __future__ import annotations

import mmap
import os
import platform
import re
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import NoteSection, SymbolTableSection
from elftools.elf.segments import InterpSegment

from pgslowlog.errors import UserError

# PG_VERSION_STR, compiled into every server:
# "PostgreSQL 15.18 (Debian 15.18-0+deb12u1) on x86_64-pc-linux-gnu, compiled by ..."
_VERSION = re.compile(
    rb"PostgreSQL (\d+)(\.\d+|devel|beta\d+|rc\d+)?[^\x00]{0,80}? on [^\x00]{1,200}"
)
# Present in every PostgreSQL server binary, in the dynamic table even when stripped.
_SERVER_MARKER = "PostgresMain"
_EXAMPLE_BINARY = "/usr/lib/postgresql/15/bin/postgres"
_STAPSDT_ADDRESSES = struct.Struct("<QQQ")  # pc, .stapsdt.base, semaphore (64-bit ELF)


@dataclass(frozen=True)
class Function:
    vaddr: int  # address in the file's view; the load bias is added at run time
    offset: int  # file offset: where a uprobe goes


@dataclass(frozen=True)
class UsdtProbe:
    provider: str
    name: str
    vaddr: int  # the probe point, as a file address
    offset: int  # its file offset: where the uprobe goes
    semaphore_offset: int  # file offset of its semaphore, 0 if it has none
    arguments: tuple[str, ...]  # as written by the compiler: "8@%rbx", "8@-144(%rbp)"


@dataclass(frozen=True)
class PostgresBinary:
    path: str
    version: str
    major: int
    has_symtab: bool
    functions: dict[str, Function] = field(repr=False)
    objects: dict[str, int] = field(repr=False)  # exported globals: name -> file address
    usdt: dict[tuple[str, str], UsdtProbe] = field(repr=False)
    # File address of the start of the file (first PT_LOAD's p_vaddr - p_offset): 0
    # for a position-independent build, 0x400000 or so for one that is not. A running
    # process's load bias is where it mapped file offset 0 minus this.
    base_vaddr: int = 0

    def function_offset(self, name: str) -> int | None:
        function = self.functions.get(name)
        return function.offset if function else None

    def unexported(self, names: Iterable[str]) -> str | None:
        """None if the binary exports every global in `names`, else which it does not."""
        for name in names:
            if name not in self.objects:
                return f"no exported global {name} in {self.path}"
        return None

    @property
    def symbols_kind(self) -> str:
        return "full symbol table" if self.has_symtab else "dynamic symbols only (stripped)"

    @property
    def usdt_kind(self) -> str:
        return f"{len(self.usdt)} USDT probes" if self.usdt else "no USDT probes"


@dataclass(frozen=True)
class FileIdentity:
    """What tells one file at a path from the next: an upgrade renames a new one over it."""

    device: int
    inode: int
    size: int
    mtime_ns: int


def file_identity(path: str) -> FileIdentity | None:
    """The identity of the file at `path`; None if nothing is there."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return identity_of(status)


def identity_of(status: os.stat_result) -> FileIdentity:
    return FileIdentity(status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)


class BinaryFile:
    """A binary opened once: read, identified and attached to through the same open file.

    Between reading a binary's symbols and attaching uprobes at their offsets lies a
    compile of a second or more. A package upgrade that renames a new file over the
    path in that window must not receive the old file's offsets (an int3 in the
    middle of one of its instructions), so uprobes are attached by `attach_path`,
    the kernel's name for this open file, never by the path again.
    """

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd
        self.identity = identity_of(os.fstat(fd))

    @property
    def attach_path(self) -> str:
        """A path the kernel resolves to this very file, whatever the path holds now."""
        if self._fd is None:
            raise ValueError(f"{self.path} was closed before it was attached to")
        return f"/proc/{os.getpid()}/fd/{self._fd}"

    def dup(self) -> BinaryFile:
        """The same open file, on a descriptor of its own (closed on its own): for what
        attaches after the caller has closed this one."""
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        return BinaryFile(self.path, os.dup(self._fd))

    def reader(self) -> BinaryIO:
        """A separate handle on the same open file, for the ELF parser."""
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        return os.fdopen(os.dup(self._fd), "rb")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> BinaryFile:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def open_binary(
    path: str, wanted: frozenset[str], label: str = "binary"
) -> tuple[BinaryFile, PostgresBinary]:
    """Open `path`, check that it is a PostgreSQL server, find the `wanted` symbols.

    The caller owns the open file: attach through it (BinaryFile.attach_path), then
    close it.
    """
    try:
        # O_NONBLOCK: a FIFO at the path must not hang the open; S_ISREG refuses it next.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise UserError(
            f"{label} {path} does not exist",
            f"point it at the postgres server binary, for example {_EXAMPLE_BINARY}",
        ) from None
    except PermissionError:
        raise UserError(
            f"{label} {path} is not readable",
            "make it readable by the daemon's user, or add CAP_DAC_READ_SEARCH to its unit",
        ) from None
    except OSError as error:
        raise UserError(
            f"{label} {path} cannot be opened ({error.strerror})",
            "point it at the postgres server binary",
        ) from None
    binary_file = BinaryFile(path, fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UserError(
                f"{label} {path} is not a file", "point it at the postgres server binary"
            )
        return binary_file, _inspect_binary(path, wanted, label, binary_file)
    except BaseException:
        binary_file.close()
        raise


def inspect_binary(path: str, wanted: frozenset[str], label: str = "binary") -> PostgresBinary:
    """What `open_binary` finds, for a caller that attaches nothing (check, probes)."""
    binary_file, binary = open_binary(path, wanted, label)
    binary_file.close()
    return binary


_cache: dict[tuple[str, frozenset[str], FileIdentity], PostgresBinary] = {}
_CACHED = 32


def _inspect_binary(
    path: str, wanted: frozenset[str], label: str, binary_file: BinaryFile
) -> PostgresBinary:
    """Cached per file, not per path: reading a full symbol table takes most of a second
    and `check` asks twice, but a replaced binary (another identity) is read again."""
    key = (path, wanted, binary_file.identity)
    if (cached := _cache.get(key)) is not None:
        return cached
    try:
        with binary_file.reader() as handle:
            elf = ELFFile(handle)
            _refuse_foreign_build(elf, path, label)
            functions, objects, has_symtab = _symbols(elf, wanted | {_SERVER_MARKER})
            usdt = _usdt_probes(elf)
            base_vaddr = _base_vaddr(elf)
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                match = _VERSION.search(data)
                # Copy the groups out while the mapping is open.
                version_groups = (match.group(1), match.group(2) or b"") if match else None
    except (ELFError, ValueError, struct.error):
        # ValueError: mmap of an empty file; struct.error: a truncated ELF header
        raise UserError(
            f"{label} {path} is not an ELF executable",
            f"point it at the postgres server binary, for example {_EXAMPLE_BINARY}",
        ) from None
    if _SERVER_MARKER not in functions or version_groups is None:
        raise UserError(
            f"{label} {path} is not a PostgreSQL server binary (no PostgresMain)",
            f"point it at the postgres server binary, for example {_EXAMPLE_BINARY}",
        )
    functions.pop(_SERVER_MARKER)
    binary = PostgresBinary(
        path=path,
        version=(version_groups[0] + version_groups[1]).decode(),
        major=int(version_groups[0]),
        has_symtab=has_symtab,
        functions=functions,
        objects=objects,
        usdt=usdt,
        base_vaddr=base_vaddr,
    )
    if len(_cache) >= _CACHED:
        del _cache[next(iter(_cache))]
    _cache[key] = binary
    return binary


# The layouts (pg_layouts) and the BPF programs are checked on x86_64 glibc builds
# (machine.check_architecture refuses other hosts).
_MACHINES = {"x86_64": "EM_X86_64"}
_DEBIAN_IMAGE = "use a Debian-based build (the official image's default, postgres:17-bookworm)"


def _refuse_foreign_build(elf: ELFFile, path: str, label: str) -> None:
    """A build for another architecture, or against musl (Alpine images): refused
    until a test shows that the layouts read from its memory hold there."""
    wanted = _MACHINES.get(platform.machine())
    machine = elf["e_machine"]
    if wanted is not None and machine != wanted:
        raise UserError(
            f"{label} {path} is built for {machine.removeprefix('EM_')}, not for this "
            f"{platform.machine()} host",
            "trace it from a host of its own architecture",
        )
    for segment in elf.iter_segments():
        if isinstance(segment, InterpSegment) and "musl" in segment.get_interp_name():
            raise UserError(
                f"{label} {path} is built against musl (an Alpine image): pgslowlog does "
                "not yet know that PostgreSQL's memory layouts hold there",
                _DEBIAN_IMAGE,
            )


_SYMBOL = struct.Struct("<IBBHQQ")  # Elf64_Sym: name, info, other, shndx, value, size
_STT_OBJECT, _STT_FUNC = 1, 2


def _symbols(
    elf: ELFFile, wanted: frozenset[str]
) -> tuple[dict[str, Function], dict[str, int], bool]:
    functions: dict[str, Function] = {}
    objects: dict[str, int] = {}
    symtab = elf.get_section_by_name(".symtab")
    for section in (symtab, elf.get_section_by_name(".dynsym")):
        if not isinstance(section, SymbolTableSection) or elf.elfclass != 64:
            continue  # absent (stripped), not a symbol table after all, or not 64-bit
        if not elf.little_endian:
            continue  # _SYMBOL reads x86_64's (a big-endian build is refused elsewhere)
        for name, kind, value in _wanted_symbols(elf, section, wanted):
            if kind == _STT_FUNC and name not in functions:
                offset = _file_offset(elf, value)
                if offset is not None:
                    functions[name] = Function(value, offset)
            elif kind == _STT_OBJECT and name not in objects:
                objects[name] = value
    return functions, objects, symtab is not None


def _wanted_symbols(
    elf: ELFFile, section: SymbolTableSection, wanted: frozenset[str]
) -> list[tuple[str, int, int]]:
    """(name, type, value) of the defined symbols named in `wanted`. A symbol table
    holds tens of thousands of entries; parsing each as an object took most of the
    daemon's start-up, so the names are found in the string table first (a name's
    string may also end a longer one: every place it ends with NUL counts), and only
    the entries pointing there are kept, read with struct."""
    strings = elf.get_section(section["sh_link"]).data()
    at_name: dict[int, str] = {}
    for name in wanted:
        needle = name.encode() + b"\0"
        found = strings.find(needle)
        while found >= 0:
            at_name[found] = name
            found = strings.find(needle, found + 1)
    return [
        (at_name[name_at], info & 0xF, value)
        for name_at, info, _other, shndx, value, _size in _SYMBOL.iter_unpack(section.data())
        if name_at in at_name and shndx and value
    ]


def _usdt_probes(elf: ELFFile) -> dict[tuple[str, str], UsdtProbe]:
    notes = elf.get_section_by_name(".note.stapsdt")
    base_section = elf.get_section_by_name(".stapsdt.base")
    if not isinstance(notes, NoteSection) or elf.elfclass != 64:
        return {}
    probes: dict[tuple[str, str], UsdtProbe] = {}
    for note in notes.iter_notes():
        if note["n_name"] != "stapsdt":
            continue
        descriptor: bytes = note["n_descdata"]
        pc, base, semaphore = _STAPSDT_ADDRESSES.unpack_from(descriptor)
        provider, name, arguments = descriptor[_STAPSDT_ADDRESSES.size :].split(b"\0")[:3]
        if base_section is not None:
            pc += base_section["sh_addr"] - base  # the notes predate prelinking
        offset = _file_offset(elf, pc)
        if offset is None:
            continue
        semaphore_offset = _file_offset(elf, semaphore) if semaphore else 0
        key = (provider.decode(), name.decode())
        probes.setdefault(
            key,
            UsdtProbe(
                provider=key[0],
                name=key[1],
                vaddr=pc,
                offset=offset,
                semaphore_offset=semaphore_offset or 0,
                arguments=tuple(arguments.decode().split()),
            ),
        )
    return probes


def _base_vaddr(elf: ELFFile) -> int:
    for segment in elf.iter_segments():
        if segment["p_type"] == "PT_LOAD":
            return int(segment["p_vaddr"] - segment["p_offset"])
    return 0


def _file_offset(elf: ELFFile, address: int) -> int | None:
    for segment in elf.iter_segments():
        if segment["p_type"] != "PT_LOAD":
            continue
        start = segment["p_vaddr"]
        if start <= address < start + segment["p_filesz"]:
            return address - start + segment["p_offset"]
    return None

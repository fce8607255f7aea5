"""What is loaded, and onto which file: the layout checks, and attaching through the
very file that was read, even when an upgrade replaces it in between."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from waiting import wait_until

from pgslowlog.bpf.compiler import KPROBE, CompileError, compile_program
from pgslowlog.bpf.program import BpfProgram
from pgslowlog.config import DaemonConfig, TargetConfig
from pgslowlog.dispatcher import Dispatcher
from pgslowlog.planner import Planner
from pgslowlog.plugin_manager import Plugins
from pgslowlog.probe_set import ProbeSet
from pgslowlog.sinks import BaseSink

pytestmark = pytest.mark.ebpf


class ListSink(BaseSink):
    def __init__(self) -> None:
        self.events: list[Any] = []

    def write(self, events):
        self.events.extend(events)


@pytest.mark.parametrize(
    ("flag", "wrong", "named"),
    [
        ("-DPY_HEADER_outcome=27", "-DPY_HEADER_outcome=28", "record_header.outcome"),
        ("-DPY_RECORD_HEADER_SIZE=96", "-DPY_RECORD_HEADER_SIZE=88", "size of struct record"),
        ("-DPY_COUNTER_COUNT=5", "-DPY_COUNTER_COUNT=6", "COUNTER_COUNT"),
    ],
)
def test_a_layout_user_space_does_not_share_stops_the_compile(flag, wrong, named):
    """The C side checks every offset, size and index user space reads."""
    plugins = Plugins.load()
    config = TargetConfig(binary="/usr/lib/postgresql/15/bin/postgres", probes=["activity"])
    target, (definition,) = Planner(plugins).resolve(config, 0)
    target.file.close()
    program = definition.open
    assert isinstance(program, BpfProgram)
    flags = program.cflags_for(target, DaemonConfig())
    assert flag in flags  # what bpf/decoder.py and bpf/program.py say today
    flags[flags.index(flag)] = wrong
    with pytest.raises(CompileError) as refused:
        compile_program(program.text(), flags, [("on_report_activity", KPROBE)], [])
    message = str(refused.value)
    assert "differs between bpf/slow_query.h and user space" in message
    assert named in message and "\n" not in message


def test_a_binary_replaced_before_attach_never_gets_the_old_offsets(pg15, pg18, tmp_path):
    """An upgrade renames a new binary over the path between reading and attaching.

    The target path first holds PostgreSQL 15 (a hard link: the inode pg15 runs). It is
    read, then PostgreSQL 18 is renamed over it, then the probes attach. They must land
    on the file that was read: pg15's statements are seen, and pg18 gets no uprobe at
    offsets that belong to another build.
    """
    path = tmp_path / "postgres"
    os.link(pg15.postgres, path)
    config = TargetConfig(binary=str(path), probes=["activity"])
    target, definitions = Planner(Plugins.load()).resolve(config, 0)
    assert target.binary.major == 15
    upgrade = tmp_path / "postgres.dpkg-new"
    os.link(pg18.postgres, upgrade)
    os.rename(upgrade, path)  # what dpkg does
    assert os.stat(path).st_ino == os.stat(pg18.postgres).st_ino

    sink = ListSink()
    dispatcher = Dispatcher()
    dispatcher.add_sink("list", sink, 1000, 5.0)
    dispatcher.start()
    failures: list[str] = []
    probes = ProbeSet(dispatcher, DaemonConfig(threshold_ms=200), failures.append)
    try:
        with target.file:
            (running,) = probes.start(target, definitions)
        assert running.source.attached_count >= 1
        pg18.psql("select pg_sleep(0.3) /* on the new file */", check=True)
        pg15.psql("select pg_sleep(0.3) /* on the file read */", check=True)
        wait_until(
            lambda: any("file read" in e.query for e in sink.events),
            10,
            "the statement on the file read, at the sink",
        )
    finally:
        probes.stop_all()
        dispatcher.close()
    assert [e.query for e in sink.events] == ["select pg_sleep(0.3) /* on the file read */"]
    assert sink.events[0].binary == str(path) and not failures
    # pg18 was never probed at pg15's offsets: it still answers.
    assert pg18.psql("select 41 + 1", check=True).stdout.strip() == "42"


def test_the_binary_is_read_through_the_file_that_is_attached(tmp_path):
    """The identity the watcher keeps is the open file's, not a later look at the path."""
    path = tmp_path / "postgres"
    os.link("/usr/lib/postgresql/15/bin/postgres", path)
    target, _ = Planner(Plugins.load()).resolve(TargetConfig(binary=str(path)), 0)
    with target.file:
        os.unlink(path)
        attach_path = Path(target.file.attach_path)
        assert os.stat(attach_path).st_ino == target.file.identity.inode
        assert os.readlink(attach_path).endswith("(deleted)")

"""The daemon's supervisor parts without root: probe set, health, watcher, reload.

Sources here are fakes that hand out decoded records; the collectors, the
enricher, the dispatcher and a list sink around them are the real ones.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs
from waiting import wait_for_count, wait_until

from pgslowlog.config import DaemonConfig, TargetConfig, parse_config
from pgslowlog.daemon import Daemon
from pgslowlog.dispatcher import Dispatcher
from pgslowlog.elf import BinaryFile, PostgresBinary
from pgslowlog.errors import UserError
from pgslowlog.health import HealthReporter
from pgslowlog.live_config import merge_live, needs_restart
from pgslowlog.planner import Plan, PlannedTarget, Planner
from pgslowlog.plugin_manager import Plugins
from pgslowlog.probe_set import ProbeSet, RunningProbe
from pgslowlog.probes import ProbeDefinition
from pgslowlog.records import RawStatement
from pgslowlog.sinks import BaseSink
from pgslowlog.sources import COUNTERS, HandsOver, ProbeLoadError
from pgslowlog.target_watch import TargetWatcher
from pgslowlog.targets import Target


class ListSink(BaseSink):
    def __init__(self) -> None:
        self.events: list[Any] = []

    def write(self, events):
        self.events.extend(events)


class FakeReader:
    def __init__(self) -> None:
        self.records: list[RawStatement] = []
        self.lock = threading.Lock()
        self.closed = False

    def wait(self, timeout_ms: int) -> None:
        time.sleep(timeout_ms / 1000)  # a reader with nothing to wake it waits it out

    def read(self, limit: int) -> list[RawStatement]:
        with self.lock:
            taken, self.records = self.records[:limit], self.records[limit:]
        return taken

    def decode(self, record: RawStatement) -> RawStatement:
        return record

    def close(self) -> None:
        self.closed = True


class FakeSource:
    """A StatementSource whose statements a test puts in by hand."""

    def __init__(self, definition: ProbeDefinition, target: Target, fail_attach: bool = False):
        self.definition = definition
        self.target = target
        self.fail_attach = fail_attach
        self.threshold_ns: int | None = None
        self.attached = False
        self.closed = False
        self.ticks = 0
        self._reader = FakeReader()
        self.counts = dict.fromkeys(COUNTERS, 0)

    @property
    def attached_count(self) -> int:
        return 2 if self.attached else 0

    def describe(self) -> dict[str, object]:
        return {"uprobes": self.attached_count}

    def attach(self) -> None:
        if self.fail_attach:
            raise ProbeLoadError(f"{self.definition.name} refused")
        self.threshold_ns_at_attach = self.threshold_ns
        self.attached = True

    def reader(self) -> FakeReader:
        return self._reader

    def set_threshold_ns(self, threshold_ns: int) -> None:
        self.threshold_ns = threshold_ns

    def tick(self) -> None:
        self.ticks += 1

    def counters(self) -> dict[str, int]:
        return dict(self.counts)

    def detach(self) -> None:
        self.attached = False

    def close(self) -> None:
        self.detach()
        self.closed = True

    def emit(self, query: str, pid: int = 1) -> None:
        with self._reader.lock:
            self._reader.records.append(
                RawStatement(
                    start_unix_ns=0, duration_ns=300_000_000, pid=pid, query=query, outcome="ok"
                )
            )
        self.counts["statements"] += 1
        self.counts["emitted"] += 1


def never_opened(*_args: Any) -> FakeSource:
    raise AssertionError("this definition is only planned, never opened")


def definition(name: str) -> ProbeDefinition:
    """A definition the watcher's tests plan with; opened only through a Harness."""
    return ProbeDefinition(name=name, description=name, open=never_opened)


_opened: list[BinaryFile] = []


@pytest.fixture(autouse=True)
def close_binary_files():
    yield
    while _opened:
        _opened.pop().close()


def binary_file(path: Path) -> BinaryFile:
    _opened.append(BinaryFile(str(path), os.open(path, os.O_RDONLY)))
    return _opened[-1]


def target(tmp_path: Path, index: int = 0, name: str = "main") -> Target:
    path = tmp_path / f"postgres{index}"
    path.write_bytes(b"not really postgres")
    binary = PostgresBinary(str(path), "15.18", 15, False, {}, {}, {})
    return Target(index, binary, binary_file(path), name)


class Harness:
    """A probe set with fake sources, feeding a real dispatcher and a list sink."""

    def __init__(self, fail: set[str] = frozenset()) -> None:
        self.sink = ListSink()
        self.dispatcher = Dispatcher()
        self.dispatcher.add_sink("list", self.sink, 1000, 5.0)
        self.dispatcher.start()
        self.failures: list[str] = []
        self.fail = fail
        self.opened: list[FakeSource] = []
        self.probes = ProbeSet(
            self.dispatcher, DaemonConfig(include_background=True), self.failures.append
        )
        self.health = HealthReporter(self.probes, self.dispatcher)
        self.probes.add_listener(self.health)
        self.daemons: list[Daemon] = []

    def daemon(self, config: Any, config_path: str = "unused.toml") -> Daemon:
        """A daemon over this harness's dispatcher, with a probe set of its own."""
        self.daemons.append(Daemon(config_path, config, Planner(Plugins()), self.dispatcher))
        return self.daemons[-1]

    def define(self, name: str, kind: type[FakeSource] = FakeSource) -> ProbeDefinition:
        """A definition whose factory makes a `kind` source, kept in `opened`."""

        def open_fake(definition: ProbeDefinition, target: Target, daemon: Any) -> FakeSource:
            source = kind(definition, target, fail_attach=definition.name in self.fail)
            self.opened.append(source)
            return source

        return ProbeDefinition(name=name, description=name, open=open_fake)

    def wait_for_events(self, count: int) -> list[Any]:
        """At least `count` events at the list sink (all of them, more included)."""
        wait_for_count(lambda: self.sink.events, count, "events at the list sink", timeout=5)
        return self.sink.events

    def close(self) -> None:
        for daemon in self.daemons:
            daemon.probes.stop_all()
        self.probes.stop_all()
        self.dispatcher.close()


@pytest.fixture
def harness():
    made: list[Harness] = []

    def make(**options: Any) -> Harness:
        made.append(Harness(**options))
        return made[-1]

    yield make
    for each in made:
        each.close()


def test_probe_set_runs_each_source_with_its_collector(harness, tmp_path):
    h = harness()
    started = h.probes.start(target(tmp_path), [h.define("a"), h.define("b")])
    assert [r.name for r in started] == ["a@main", "b@main"]
    h.opened[1].emit("select from b")
    events = h.wait_for_events(1)
    assert (events[0].query, events[0].probe, events[0].target) == ("select from b", "b", "main")
    h.probes.set_threshold_ns(5)
    h.probes.tick()
    assert [(s.threshold_ns, s.ticks) for s in h.opened] == [(5, 1), (5, 1)]


def test_a_target_starts_all_its_probes_or_none(harness, tmp_path):
    h = harness(fail={"b"})
    with pytest.raises(ProbeLoadError, match="b refused"):
        h.probes.start(target(tmp_path), [h.define("a"), h.define("b")])
    assert len(h.probes) == 0
    assert all(source.closed for source in h.opened)
    assert h.opened[0]._reader.closed  # the collector that had started read to its end


def test_a_source_whose_collector_cannot_start_is_closed(harness, tmp_path, monkeypatch):
    h = harness()
    monkeypatch.setattr(FakeSource, "reader", lambda self: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        h.probes.start(target(tmp_path), [h.define("a")])
    assert len(h.probes) == 0 and h.opened[0].closed and not h.opened[0].attached


class Recorder:
    """A probe set listener that notes what it saw of each probe retiring."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bool]] = []

    def retiring(self, running: RunningProbe) -> None:
        assert isinstance(running.source, FakeSource)
        self.seen.append((running.name, running.source.closed))


def test_stopping_one_target_drains_it_and_keeps_the_other(harness, tmp_path):
    h = harness()
    recorder = Recorder()
    h.probes.add_listener(recorder)
    h.probes.start(target(tmp_path, 0, "one"), [h.define("a")])
    h.probes.start(target(tmp_path, 1, "two"), [h.define("a")])
    one, two = h.opened
    one.emit("last words")  # still in the reader when the stop begins
    stopped = h.probes.stop_target(0)
    assert [r.name for r in stopped] == ["a@one"]
    assert recorder.seen == [("a@one", False)]  # a listener sees it open, then it is closed
    assert one.closed and not two.closed
    assert [r.target.name for r in h.probes] == ["two"]
    assert [e.query for e in h.wait_for_events(1)] == ["last words"]


def test_losses_are_warned_once_each_and_health_sums_per_target(harness, tmp_path):
    h = harness()
    h.probes.start(target(tmp_path), [h.define("a"), h.define("b")])
    a, b = h.opened
    a.counts["ringbuf_full"] = 3
    with capture_logs() as logs:
        h.health.report_losses()
        h.health.report_losses()  # nothing new: nothing said
        a.counts["ringbuf_full"] = 5
        h.health.report_losses()
    dropped = [entry["count"] for entry in logs if entry["event"] == "slow_statements_dropped"]
    assert dropped == [3, 2]
    a.emit("x")
    b.emit("y")
    b.counts["unrecorded"] = 4
    h.health.report_losses()  # the main loop reads the sources, then logs the line
    health = h.health.health()
    assert health["targets"] == {
        "main": {
            "probes_attached": 2,
            "attachments": 4,
            "statements": 2,
            "slow_events": 2,
            "lost": 5,
            "untracked": 4,
            "blind_ms": 0,  # these sources trap every statement: never blind
        }
    }
    assert health["sinks"]["list"]["dropped"] == 0


def totals(h: Harness) -> dict[str, tuple[int, int]]:
    """definition -> (statements, places attached), as /metrics and the health line have them."""
    return {
        t.definition: (t.counters["statements"], t.attached_count) for t in h.health.probe_totals()
    }


def test_totals_never_go_back_across_a_switch_and_a_failed_retire(harness, tmp_path):
    h = harness()
    main = target(tmp_path)
    h.probes.start(main, [h.define("a")])
    a = h.opened[0]
    a.emit("x")
    a.emit("y")
    h.health.report_losses()
    assert totals(h) == {"a": (2, 2)}
    h.probes.switch(main, [h.define("b")])  # a stops: it cannot hand over
    h.health.report_losses()
    assert totals(h) == {"a": (2, 0), "b": (0, 2)}
    b = h.opened[1]
    b.emit("z")
    h.health.report_losses()

    def unreadable() -> dict[str, int]:
        raise OSError("reading counter statements failed")

    b.counters = unreadable  # its counters cannot be read as it retires
    h.probes.stop_all()
    # Its last figures stay counted, and it no longer counts as attached.
    assert totals(h) == {"a": (2, 0), "b": (1, 0)}
    assert h.health.health()["targets"]["main"]["statements"] == 3


def test_an_observer_that_fails_costs_no_event(harness, tmp_path):
    h = harness()

    def broken(events):
        raise ZeroDivisionError("a bug in counting")

    h.dispatcher.observers.append(broken)
    h.probes.start(target(tmp_path), [h.define("a")])
    with capture_logs() as logs:
        h.opened[0].emit("x")
        assert [e.query for e in h.wait_for_events(1)] == ["x"]
        # The sink may have the event before the collector has called the observers:
        # wait for the failure to be said.
        (said,) = wait_until(
            lambda: [entry for entry in logs if entry["event"] == "observer_failed"],
            what="the observer's failure logged",
        )
    assert said["events"] == 1
    assert not h.failures  # the collector carries on


def test_stopped_line_counts_what_each_probe_did(harness, tmp_path):
    h = harness()
    h.probes.start(target(tmp_path), [h.define("a")])
    h.opened[0].emit("x")
    h.wait_for_events(1)
    stopped = h.health.stopped(h.probes.stop_all())
    assert stopped["kernel_counters"]["a@main"]["emitted"] == 1
    assert stopped["targets"]["main"]["slow_events"] == 1
    # What was attached during the run, though detached by the time it is counted.
    assert stopped["targets"]["main"]["probes_attached"] == 1
    assert stopped["targets"]["main"]["attachments"] == 2


class FakeProbeSet:
    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.calls: list[tuple[str, int]] = []

    def stop_target(self, index):
        self.calls.append(("stop", index))
        return []

    def start(self, target, definitions):
        self.calls.append(("start", target.index))
        if self.refuse:
            raise ProbeLoadError("refused")


def test_watcher_attaches_to_a_new_file_once_and_names_a_missing_one(tmp_path):
    path = tmp_path / "bin" / "postgres"
    path.parent.mkdir()
    config = TargetConfig(binary=str(path))
    resolved: list[Target] = []

    def resolve(target_config, index):
        resolved.append(target(tmp_path))
        # what was read is the file at the path
        resolved[-1].file.close()
        file = binary_file(path)
        return Target(index, resolved[-1].binary, file, "main"), [definition("a")]

    probes = FakeProbeSet()
    watcher = TargetWatcher(resolve, probes)
    watcher.watch(0, config, None)
    with capture_logs() as logs:
        watcher.poll()  # nothing there yet
        path.write_bytes(b"v1")
        watcher.poll()
        watcher.poll()  # the same file: nothing to do
        replacement = tmp_path / "new"
        replacement.write_bytes(b"v2, longer")
        os.rename(replacement, path)  # as dpkg does
        watcher.poll()
        path.unlink()
        watcher.poll()
        watcher.poll()
    events = [entry["event"] for entry in logs]
    assert events == ["target_attached", "target_reattached", "target_binary_missing"]
    assert probes.calls == [("stop", 0), ("start", 0), ("stop", 0), ("start", 0)]


def test_watcher_does_not_retry_a_file_it_could_not_attach_to(tmp_path):
    path = tmp_path / "postgres"
    path.write_bytes(b"v1")

    def resolve(target_config, index):
        file = binary_file(path)
        binary = PostgresBinary(str(path), "15.18", 15, False, {}, {}, {})
        return Target(index, binary, file, "main"), [definition("a")]

    probes = FakeProbeSet(refuse=True)
    watcher = TargetWatcher(resolve, probes)
    watcher.watch(0, TargetConfig(binary=str(path)), None)
    with capture_logs() as logs:
        watcher.poll()
        watcher.poll()
    assert [entry["event"] for entry in logs] == ["target_attach_failed"]
    assert probes.calls == [("stop", 0), ("start", 0)]


def test_watcher_remembers_the_file_it_read_not_the_one_it_saw_first(tmp_path):
    """A second upgrade between stat and open: the identity kept is the file read."""
    path = tmp_path / "postgres"
    path.write_bytes(b"v1")

    def resolve(target_config, index):
        newer = tmp_path / "newer"
        newer.write_bytes(b"v2, newer")
        os.rename(newer, path)
        file = binary_file(path)
        binary = PostgresBinary(str(path), "15.18", 15, False, {}, {}, {})
        return Target(index, binary, file, "main"), [definition("a")]

    watcher = TargetWatcher(resolve, FakeProbeSet())
    watcher.watch(0, TargetConfig(binary=str(path)), None)
    watcher.poll()
    assert watcher.watched[0].attached.inode == os.stat(path).st_ino
    assert watcher.watched[0].attached.size == len(b"v2, newer")


BASE = {"target": [{"binary": "/x/postgres"}], "sinks": {"file": {"path": "/tmp/x"}}}


def test_reload_applies_live_keys_and_names_the_rest():
    running = parse_config({**BASE, "daemon": {"threshold_ms": 200, "capture_params": False}})
    new = parse_config(
        {
            **BASE,
            "daemon": {"threshold_ms": 50, "log_level": "debug", "capture_params": True},
            "sinks": {"file": {"path": "/tmp/y"}},
        }
    )
    assert needs_restart(running, new) == ["daemon.capture_params", "sinks"]
    merged = merge_live(running, new)
    assert (merged.daemon.threshold_ms, merged.daemon.log_level) == (50, "debug")
    assert merged.daemon.capture_params is False and merged.sinks == running.sinks
    # Compared with what is in effect, the same file asks for the same restart again.
    assert needs_restart(merged, new) == ["daemon.capture_params", "sinks"]
    assert needs_restart(merged, merged) == []


def test_daemon_reload_moves_the_threshold_and_reopens_sinks(harness, tmp_path, monkeypatch):
    config_path = tmp_path / "pgslowlog.toml"
    config_path.write_text(
        '[daemon]\nthreshold_ms = 200\n[[target]]\nbinary = "/x/postgres"\nprobes = ["a"]\n'
        '[sinks.file]\npath = "/tmp/x"\n'
    )
    h = harness()
    running = parse_config(
        {
            "target": [{"binary": "/x/postgres", "probes": ["a"]}],
            "sinks": {"file": {"path": "/tmp/x"}},
        }
    )
    daemon = h.daemon(running, str(config_path))
    daemon.probes.start(target(tmp_path), [h.define("a")])
    config_path.write_text(config_path.read_text().replace("200", "1500"))
    reopened = []
    h.sink.reopen = lambda: reopened.append(True)
    levels: list[str] = []  # the real one would replace capture_logs' configuration
    monkeypatch.setattr("pgslowlog.daemon.configure_logging", levels.append)
    with capture_logs() as logs:
        daemon.reload()
    assert h.opened[0].threshold_ns == 1_500_000_000
    assert [e["event"] for e in logs] == ["reloaded"] and levels == ["info"]
    config_path.write_text("not toml [")
    with capture_logs() as logs:
        daemon.reload()
    assert [e["event"] for e in logs] == ["reload_failed"]
    assert h.opened[0].threshold_ns == 1_500_000_000  # unchanged
    wait_until(lambda: reopened, timeout=5, what="the sink reopened on its own thread")


def test_a_closed_binary_file_cannot_be_attached_to(tmp_path):
    """Attaching goes through the open file: once closed, there is nothing to attach to."""
    t = target(tmp_path)
    assert os.readlink(t.file.attach_path) == str(tmp_path / "postgres0")
    t.file.close()
    t.file.close()  # twice is fine
    with pytest.raises(ValueError, match="closed"):
        _ = t.file.attach_path


def test_a_threshold_moved_by_reload_reaches_probes_started_later(harness, tmp_path):
    """A target re-attached after a SIGHUP (an upgrade) uses the live threshold."""
    h = harness()
    h.probes.start(target(tmp_path, 0), [h.define("a")])
    h.probes.set_threshold_ns(1_500_000_000)
    h.probes.stop_target(0)
    h.probes.start(target(tmp_path, 0), [h.define("a")])  # as the watcher does
    assert [s.threshold_ns for s in h.opened] == [1_500_000_000, 1_500_000_000]
    assert h.opened[0].threshold_ns_at_attach == 200_000_000
    assert h.opened[1].threshold_ns_at_attach == 1_500_000_000


class BrokenSource(FakeSource):
    def attach(self) -> None:
        raise OSError("a third-party source failed in its own way")


def test_a_source_that_raises_anything_is_one_failed_start_and_a_clean_stop(harness, tmp_path):
    h = harness()
    broken = h.define("broken", BrokenSource)
    config = parse_config(BASE)
    daemon = h.daemon(config)
    the_plan = Plan(config, [PlannedTarget(target(tmp_path, 0), [h.define("a"), broken])], [], {})
    with capture_logs() as logs:
        assert daemon._attach(the_plan) is False
    (failed,) = [entry for entry in logs if entry["event"] == "probe_failed"]
    assert "OSError: a third-party source failed" in failed["error"]
    assert len(daemon.probes) == 0 and h.opened[0].closed  # the one that had started is stopped
    assert the_plan.targets[0].target.file._fd is None  # the binary is closed


class HandingOverSource(FakeSource):
    """Like `sampled`: shares out the statements around a definition switch."""

    def __init__(self, *args: Any, **options: Any) -> None:
        super().__init__(*args, **options)
        self.took_over_at: int | None = None
        self.handed_over_at: int | None = None
        self.still_running = True

    def take_over(self, at_ns: int) -> None:
        self.took_over_at = at_ns

    def hand_over(self, at_ns: int) -> None:
        self.handed_over_at = at_ns

    def handed_over(self) -> bool:
        return not self.still_running


def test_a_source_hands_over_only_if_it_says_so():
    assert isinstance(HandingOverSource(definition("x"), None), HandsOver)  # type: ignore[arg-type]
    assert not isinstance(FakeSource(definition("x"), None), HandsOver)  # type: ignore[arg-type]


def test_switching_to_a_source_that_takes_over_stops_the_old_one_at_once(harness, tmp_path):
    h = harness()
    where = target(tmp_path)
    h.probes.start(where, [h.define("trapping")])
    before = time.time_ns()
    started = h.probes.switch(where, [h.define("sampling", HandingOverSource)])
    assert [r.name for r in started] == ["sampling@main"]
    new = h.opened[1]
    assert before <= new.took_over_at <= time.time_ns()
    # The old one was told nothing ends its way any more, then stopped and freed.
    assert h.opened[0].threshold_ns == 2**63 - 1 and h.opened[0].closed
    assert [r.name for r in h.probes] == ["sampling@main"]


def test_switching_away_from_a_source_that_hands_over_keeps_it_until_done(harness, tmp_path):
    h = harness()
    where = target(tmp_path)
    h.probes.start(where, [h.define("sampling", HandingOverSource)])
    assert [r.name for r in h.probes.switch(where, [h.define("trapping")])] == ["trapping@main"]
    old = h.opened[0]
    assert old.handed_over_at is not None and not old.closed
    h.opened[0].emit("select from before the switch")  # its own statements still arrive
    assert h.wait_for_events(1)[0].query == "select from before the switch"
    h.probes.tick()
    assert {r.name for r in h.probes} == {"sampling@main", "trapping@main"}
    old.still_running = False  # its last statement ended
    h.probes.tick()
    assert [r.name for r in h.probes] == ["trapping@main"] and old.closed


def test_a_switch_whose_new_source_fails_keeps_the_old_one(harness, tmp_path):
    h = harness(fail={"trapping"})
    where = target(tmp_path)
    h.probes.start(where, [h.define("sampling", HandingOverSource)])
    with pytest.raises(ProbeLoadError):
        h.probes.switch(where, [h.define("trapping")])
    assert [r.name for r in h.probes] == ["sampling@main"]
    assert h.opened[0].handed_over_at is None and not h.opened[0].closed


def test_a_failed_switch_leaves_the_old_threshold_as_it_was(harness, tmp_path):
    """The new source took over, then a second new one failed: the old one keeps
    running with its own threshold, not the one raised for the switch."""
    h = harness(fail={"second"})
    where = target(tmp_path)
    h.probes.start(where, [h.define("trapping")])
    h.probes.set_threshold_ns(200_000_000)
    with pytest.raises(ProbeLoadError):
        h.probes.switch(
            where,
            [h.define("sampling", HandingOverSource), h.define("second", HandingOverSource)],
        )
    assert h.opened[1].took_over_at is not None  # it was told, then stopped again
    assert h.opened[0].threshold_ns == 200_000_000 and not h.opened[0].closed
    assert [r.name for r in h.probes] == ["trapping@main"]


def test_the_new_source_takes_over_before_its_collector_reads(harness, tmp_path):
    h = harness()
    where = target(tmp_path)
    h.probes.start(where, [h.define("trapping")])

    class Early(HandingOverSource):
        def reader(self) -> FakeReader:
            assert self.took_over_at is not None, "read before the take-over mark"
            return super().reader()

    h.probes.switch(where, [h.define("early", Early)])
    assert h.opened[1].took_over_at is not None


class FakePlanner:
    """What follow_auto asks of the planner: the choice on the binary already read, then
    the target resolved again (its file opened anew) when the choice changed."""

    def __init__(self, choice: list[ProbeDefinition], resolved: Target | None = None) -> None:
        self.choice = choice
        self.resolved = resolved
        self.refusal: UserError | None = None
        self.resolves = 0

    def choose(self, target_config, binary, label, daemon) -> list[ProbeDefinition]:
        if self.refusal is not None:
            raise self.refusal
        return self.choice

    def resolve(
        self, target_config, index, daemon, server=None
    ) -> tuple[Target, list[ProbeDefinition]]:
        self.resolves += 1
        assert self.resolved is not None
        return self.resolved, self.choice


AUTO = parse_config(BASE)  # one target, probes = ["auto"]


def reopened(where: Target) -> Target:
    """The same file as `where`, opened again, as resolving the target does."""
    return Target(where.index, where.binary, binary_file(Path(where.file.path)), where.name)


def test_auto_switches_a_target_whose_choice_changed(harness, tmp_path):
    h = harness()
    where = target(tmp_path)
    h.probes.start(where, [h.define("trapping")])
    again = reopened(where)
    assert h.probes.follow_auto(AUTO, FakePlanner([h.define("sampling")], again)) == [
        "sampling@main"
    ]
    assert [r.name for r in h.probes] == ["sampling@main"] and h.opened[0].closed
    with pytest.raises(ValueError, match="closed"):
        _ = again.file.attach_path  # the file opened to switch is closed again


def test_auto_leaves_a_target_whose_choice_is_the_same(harness, tmp_path):
    h = harness()
    trapping = h.define("trapping")
    h.probes.start(target(tmp_path), [trapping])
    planner = FakePlanner([trapping])
    assert h.probes.follow_auto(AUTO, planner) == [] and planner.resolves == 0
    assert [r.name for r in h.probes] == ["trapping@main"]


def test_auto_waits_for_a_hand_over_before_switching_again(harness, tmp_path):
    h = harness()
    where = target(tmp_path)
    h.probes.start(where, [h.define("sampling", HandingOverSource)])
    switched = h.probes.follow_auto(AUTO, FakePlanner([h.define("trapping")], reopened(where)))
    assert switched == ["trapping@main"] and h.probes.handing_over
    # The threshold moves again while sampling still hands over: decided later.
    third = FakePlanner([h.define("third")], reopened(where))
    assert h.probes.follow_auto(AUTO, third) == [] and h.probes.auto_pending
    h.opened[0].still_running = False
    h.probes.tick()  # the hand-over is done: sampling stops
    assert not h.probes.handing_over
    assert h.probes.follow_auto(AUTO, third) == ["third@main"] and not h.probes.auto_pending
    assert [r.name for r in h.probes] == ["third@main"]


def test_auto_does_not_switch_onto_a_replaced_binary(harness, tmp_path):
    h = harness()
    h.probes.start(target(tmp_path, 0), [h.define("trapping")])
    other = target(tmp_path, 1)  # the path now holds another file: the watcher's job
    assert h.probes.follow_auto(AUTO, FakePlanner([h.define("sampling")], other)) == []
    assert [r.name for r in h.probes] == ["trapping@main"]


def test_auto_that_cannot_choose_says_so_and_keeps_what_runs(harness, tmp_path):
    h = harness()
    h.probes.start(target(tmp_path), [h.define("trapping")])
    planner = FakePlanner([])
    planner.refusal = UserError("target[0]: no probe can attach", "point the target elsewhere")
    with capture_logs() as logs:
        assert h.probes.follow_auto(AUTO, planner) == []
    (failed,) = [entry for entry in logs if entry["event"] == "probe_switch_failed"]
    assert failed["target"] == "main" and "no probe can attach" in failed["error"]
    assert [r.name for r in h.probes] == ["trapping@main"]

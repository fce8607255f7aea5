"""The pipeline's logic without root: dispatcher, enrichment and probe selection.

Real objects throughout. The only stand-ins are at the edges: sinks written here
(the dispatcher's callers), PostgresBinary values built by hand instead of read from
an ELF file, and the process title, which the enricher reads from /proc.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from events import numbered
from structlog.testing import capture_logs
from waiting import wait_for_count, wait_until

from pgslowlog import enrichment
from pgslowlog.bpf.attachments import OUTCOME_UPROBES, Uprobe, Usdt
from pgslowlog.bpf.program import SHARED_GLOBALS, BpfProgram
from pgslowlog.config import DaemonConfig
from pgslowlog.dispatcher import Dispatcher
from pgslowlog.elf import Function, PostgresBinary, UsdtProbe
from pgslowlog.enrichment import Enricher
from pgslowlog.errors import UserError
from pgslowlog.event import SlowQuery
from pgslowlog.probes import ChecksBinary, ProbeDefinition, select_probes, wanted_symbols
from pgslowlog.records import BackendNotice, BoundParameter, NoticeKind, RawStatement
from pgslowlog.sampled.source import auto_floor_ms as sampled_floor
from pgslowlog.sinks import BaseSink

# -- dispatcher ---------------------------------------------------------------------------


def events(*numbers: int) -> list[SlowQuery]:
    return [numbered(n) for n in numbers]


class RecordingSink(BaseSink):
    """Keeps each batch with the time it was written, and what else was called."""

    def __init__(self, max_batch: int = 1000, max_delay_s: float = 0.0) -> None:
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.batches: list[tuple[float, list[str]]] = []
        self.calls: list[str] = []  # write/reopen/close in order, with the thread's name
        self.threads: set[str] = set()

    def write(self, events: Sequence[SlowQuery]) -> None:
        self.threads.add(threading.current_thread().name)
        self.batches.append((time.monotonic(), [e.query for e in events]))
        self.calls.append("write " + " ".join(e.query for e in events))

    def reopen(self) -> None:
        self.threads.add(threading.current_thread().name)
        self.calls.append("reopen")

    def close(self) -> None:
        self.threads.add(threading.current_thread().name)
        self.calls.append("close")

    @property
    def written(self) -> list[str]:
        return [query for _, batch in self.batches for query in batch]


class GatedSink(RecordingSink):
    """Blocks in write() until the gate opens; with `interruptible`, interrupt() opens it
    and the write fails, as a sink's timeout would."""

    def __init__(self, interruptible: bool = False) -> None:
        super().__init__()
        self.interruptible = interruptible
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.interrupted = False

    def write(self, events: Sequence[SlowQuery]) -> None:
        self.entered.set()
        self.gate.wait(30)
        if self.interrupted:
            raise TimeoutError("interrupted at shutdown")
        super().write(events)

    def interrupt(self) -> None:
        if self.interruptible:
            self.interrupted = True
            self.gate.set()


@pytest.fixture
def dispatcher():
    dispatcher = Dispatcher()
    yield dispatcher
    dispatcher.close()  # a no-op for a closed one: its threads are gone


def test_a_full_queue_drops_its_oldest_events_and_counts_them(dispatcher):
    sink = GatedSink()
    dispatcher.add_sink("slow", sink, queue_size=3, shutdown_timeout_s=5)
    dispatcher.start()
    with capture_logs() as logs:
        dispatcher.dispatch_many(events(0))
        assert sink.entered.wait(5)  # q0 is inside write(); the queue is empty
        dispatcher.dispatch_many(events(1, 2))
        dispatcher.dispatch_many(events(3, 4, 5))  # five waiting: q1 and q2 make room
        assert dispatcher.stats()["slow"].dropped == 2
        for n in range(6, 1006):  # one at a time: each makes the oldest go
            dispatcher.dispatch_many(events(n))
        assert dispatcher.stats()["slow"].dropped == 1002
    # Said on the first drop and when the count reached a thousand, not per event.
    warnings = [entry for entry in logs if entry["event"] == "sink_queue_full"]
    assert [(w["sink"], w["dropped"]) for w in warnings] == [("slow", 2), ("slow", 1000)]
    assert warnings[0]["fix"] == "the sink is too slow: raise sinks.slow.queue_size or fix it"
    sink.gate.set()
    wait_for_count(lambda: sink.written, 4, "written: q0 and the newest three")
    assert sink.written == ["q0", "q1003", "q1004", "q1005"]
    stats = dispatcher.close()["slow"]
    assert (stats.delivered, stats.dropped, stats.failed) == (4, 1002, 0)


def test_a_batch_holds_at_most_max_batch_and_a_short_one_waits_max_delay(dispatcher):
    sink = RecordingSink(max_batch=4, max_delay_s=1.0)
    dispatcher.add_sink("batched", sink, queue_size=100, shutdown_timeout_s=5)
    dispatcher.start()
    started = time.monotonic()
    dispatcher.dispatch_many(events(*range(10)))
    wait_for_count(lambda: sink.written, 10, "written: all of them")
    assert [batch for _, batch in sink.batches] == [
        ["q0", "q1", "q2", "q3"],
        ["q4", "q5", "q6", "q7"],
        ["q8", "q9"],
    ]
    full, again, short = (written - started for written, _ in sink.batches)
    assert full < 0.9 and again < 0.9  # full batches do not wait for the 1 s delay
    assert short >= 0.95  # two of four: it waited max_delay_s for more


def test_events_arriving_within_max_delay_join_the_batch(dispatcher):
    sink = RecordingSink(max_batch=3, max_delay_s=0.5)
    lazy = RecordingSink(max_batch=100, max_delay_s=5.0)
    dispatcher.add_sink("joined", sink, queue_size=100, shutdown_timeout_s=5)
    dispatcher.add_sink("lazy", lazy, queue_size=100, shutdown_timeout_s=5)
    dispatcher.start()
    started = time.monotonic()
    dispatcher.dispatch_many(events(0))
    time.sleep(0.1)  # q1 comes 100 ms later: within the 0.5 s q0's batch waits
    dispatcher.dispatch_many(events(1))
    wait_for_count(lambda: sink.written, 2, "written: q0 and q1 together")
    assert [batch for _, batch in sink.batches] == [["q0", "q1"]]
    assert sink.batches[0][0] - started >= 0.45  # written when the delay ran out
    dispatcher.dispatch_many(events(2, 3, 4))  # a full batch goes at once, no delay
    wait_for_count(lambda: sink.written, 5, "written: q0 to q4")
    assert sink.batches[1][1] == ["q2", "q3", "q4"]
    assert sink.batches[1][0] - started < 1.5
    # The lazy sink (5 s delay) still holds everything: shutdown ends the wait and delivers.
    assert lazy.batches == []
    stats = dispatcher.close()
    assert lazy.written == ["q0", "q1", "q2", "q3", "q4"]
    assert stats["lazy"].delivered == 5 and stats["lazy"].dropped == 0
    assert time.monotonic() - started < 3


class FailingOnceSink(RecordingSink):
    def write(self, events: Sequence[SlowQuery]) -> None:
        if not self.calls:
            self.calls.append("failed")
            raise OSError("No space left on device")
        super().write(events)


def test_a_sink_that_raises_loses_its_batch_only(dispatcher):
    flaky, steady = FailingOnceSink(), RecordingSink()
    dispatcher.add_sink("flaky", flaky, queue_size=100, shutdown_timeout_s=5)
    dispatcher.add_sink("steady", steady, queue_size=100, shutdown_timeout_s=5)
    dispatcher.start()
    with capture_logs() as logs:
        dispatcher.dispatch_many(events(0, 1, 2))  # one batch: the flaky sink fails it
        wait_until(lambda: flaky.calls == ["failed"], what="the flaky sink's first write")
        dispatcher.dispatch_many(events(3, 4))
        wait_for_count(lambda: flaky.written, 2, "written by the flaky sink, its second batch")
        wait_for_count(lambda: steady.written, 5, "written by the steady sink: everything")
        stats = dispatcher.close()
    assert flaky.written == ["q3", "q4"]
    assert steady.written == ["q0", "q1", "q2", "q3", "q4"]
    assert (stats["flaky"].delivered, stats["flaky"].failed, stats["flaky"].dropped) == (2, 3, 0)
    assert (stats["steady"].delivered, stats["steady"].failed) == (5, 0)
    (failure,) = [entry for entry in logs if entry["event"] == "sink_write_failed"]
    assert (failure["sink"], failure["events"], failure["error"]) == (
        "flaky",
        3,
        "No space left on device",
    )


class SlowSink(RecordingSink):
    def write(self, events: Sequence[SlowQuery]) -> None:
        time.sleep(0.1)  # each write takes 100 ms, as a slow receiver's would
        super().write(events)


def test_shutdown_delivers_within_the_budget_and_counts_the_rest_as_dropped(dispatcher):
    slow, fast = SlowSink(max_batch=1), RecordingSink()
    dispatcher.add_sink("slow", slow, queue_size=100, shutdown_timeout_s=0.35)
    dispatcher.add_sink("fast", fast, queue_size=100, shutdown_timeout_s=0.35)
    dispatcher.start()
    dispatcher.dispatch_many(events(*range(20)))  # 2 s of writing for the slow sink
    started = time.monotonic()
    with capture_logs() as logs:
        stats = dispatcher.close()
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 1.8  # its budget, and the write in progress; not 2 s
    slow_stats = stats["slow"]
    assert slow_stats.delivered == len(slow.written) >= 1
    assert slow_stats.delivered + slow_stats.dropped == 20 and slow_stats.failed == 0
    (given_up,) = [entry for entry in logs if entry["event"] == "sink_undelivered_at_shutdown"]
    assert (given_up["sink"], given_up["events"]) == ("slow", slow_stats.dropped)
    assert slow.calls[-1] == "close"  # closed after its last write, once
    assert slow.calls.count("close") == 1
    assert fast.written == [f"q{n}" for n in range(20)] and stats["fast"].dropped == 0


def test_a_write_blocked_at_shutdown_is_interrupted(dispatcher):
    sink = GatedSink(interruptible=True)
    dispatcher.add_sink("blocked", sink, queue_size=100, shutdown_timeout_s=0.2)
    dispatcher.start()
    dispatcher.dispatch_many(events(0))
    assert sink.entered.wait(5)
    dispatcher.dispatch_many(events(1, 2, 3))
    started = time.monotonic()
    stats = dispatcher.close()["blocked"]
    assert time.monotonic() - started < 1.0  # the interrupted write gave up at once
    assert sink.interrupted
    # The interrupted write is a failed batch; what still waited is dropped.
    assert (stats.delivered, stats.failed, stats.dropped) == (0, 1, 3)
    assert sink.calls == ["close"]


def test_a_write_that_ignores_the_interrupt_is_abandoned_in_bounded_time(dispatcher):
    stuck, healthy = GatedSink(), RecordingSink()
    dispatcher.add_sink("stuck", stuck, queue_size=100, shutdown_timeout_s=0.2)
    dispatcher.add_sink("healthy", healthy, queue_size=100, shutdown_timeout_s=0.2)
    dispatcher.start()
    dispatcher.dispatch_many(events(0))
    assert stuck.entered.wait(5)
    dispatcher.dispatch_many(events(1, 2, 3))
    started = time.monotonic()
    try:
        with capture_logs() as logs:
            stats = dispatcher.close()
        elapsed = time.monotonic() - started
    finally:
        stuck.gate.set()  # let the abandoned thread finish
    assert 1.1 <= elapsed < 3.0  # the budget, then one second of grace after interrupt()
    # In write() and still queued: all counted as dropped, nothing as delivered.
    assert (stats["stuck"].delivered, stats["stuck"].dropped) == (0, 4)
    (abandoned,) = [entry for entry in logs if entry["event"] == "sink_stuck_at_shutdown"]
    assert (abandoned["sink"], abandoned["undelivered"]) == ("stuck", 4)
    assert healthy.written == ["q0", "q1", "q2", "q3"] and healthy.calls[-1] == "close"
    assert (stats["healthy"].delivered, stats["healthy"].dropped) == (4, 0)


def test_an_abandoned_write_that_returns_late_is_not_counted_twice(dispatcher):
    stuck = GatedSink()
    dispatcher.add_sink("stuck", stuck, queue_size=100, shutdown_timeout_s=0.1)
    dispatcher.start()
    dispatcher.dispatch_many(events(0, 1))
    assert stuck.entered.wait(5)
    stats = dispatcher.close()
    assert (stats["stuck"].delivered, stats["stuck"].dropped) == (0, 2)
    stuck.gate.set()  # the write returns after all
    wait_until(lambda: stuck.calls[-1:] == ["close"], what="the abandoned lane to finish")
    late = dispatcher.stats()["stuck"]
    assert (late.delivered, late.dropped) == (0, 2)


class BrokenReopenSink(RecordingSink):
    def reopen(self) -> None:
        super().reopen()
        raise PermissionError("cannot reopen /var/log/pgslowlog/slow.jsonl")


def test_reopen_reaches_each_sink_between_writes_on_its_own_thread(dispatcher):
    sink, broken = RecordingSink(), BrokenReopenSink()
    dispatcher.add_sink("file", sink, queue_size=100, shutdown_timeout_s=5)
    dispatcher.add_sink("broken", broken, queue_size=100, shutdown_timeout_s=5)
    dispatcher.start()
    dispatcher.dispatch_many(events(0))
    wait_until(lambda: sink.written == ["q0"], what="q0 written")
    with capture_logs() as logs:
        dispatcher.reopen()
        wait_until(lambda: "reopen" in sink.calls, what="the file sink reopened")
        wait_until(
            lambda: any(e["event"] == "sink_reopen_failed" for e in logs), what="failure said"
        )
    dispatcher.dispatch_many(events(1))
    wait_until(lambda: broken.written == ["q0", "q1"], what="q1 written after a failed reopen")
    dispatcher.close()
    assert sink.calls == ["write q0", "reopen", "write q1", "close"]
    assert sink.threads == {"sink-file"}  # never from the caller's thread
    (failure,) = [entry for entry in logs if entry["event"] == "sink_reopen_failed"]
    assert failure["sink"] == "broken" and "cannot reopen" in failure["error"]


# -- enrichment ---------------------------------------------------------------------------

CLIENT_TITLE = "postgres: 15/main: app shop 10.1.2.3(50312) idle"
TITLES = {
    101: CLIENT_TITLE,
    102: "postgres: 15/main: autovacuum worker shop",
    103: "postgres: 15/main: walsender repl 10.0.0.2(5555) streaming 0/3000148",
    104: None,  # gone before its title could be read
    105: "postgres: app2 shop [local] SELECT",
}


@pytest.fixture
def titles(monkeypatch):
    """The process titles the enricher sees, and the pids it read them for."""
    current = dict(TITLES)
    reads: list[int] = []

    def read_process_title(pid: int) -> str | None:
        reads.append(pid)
        return current.get(pid)

    monkeypatch.setattr(enrichment, "read_process_title", read_process_title)
    return current, reads


def enricher(**options) -> Enricher:
    defaults = {
        "probe": "activity",
        "binary": "/usr/lib/postgresql/15/bin/postgres",
        "target": "main",
        "include_background": False,
        "max_backends": 16,
    }
    return Enricher(**{**defaults, **options})


def statement(
    pid: int = 101, start_ns: int = 1_000, query: str = "select 1", **fields: Any
) -> RawStatement:
    return RawStatement(
        start_unix_ns=start_ns,
        duration_ns=300_000_000,
        pid=pid,
        query=query,
        outcome="ok",
        protocol="extended",
        **fields,
    )


def test_background_processes_are_filtered_and_counted(titles):
    plain = enricher()
    client, autovacuum, walsender, gone, local = (plain.enrich(statement(pid)) for pid in TITLES)
    assert autovacuum is None and walsender is None
    assert plain.filtered == 2
    assert client is not None and local is not None and gone is not None
    assert (client.user, client.database, client.client) == ("app", "shop", "10.1.2.3(50312)")
    assert (local.user, local.client) == ("app2", "[local]")
    # A backend whose title could not be read is reported, without who ran it.
    assert (gone.pid, gone.user, gone.database, gone.client) == (104, None, None, None)
    assert (client.probe, client.binary, client.target) == (
        "activity",
        "/usr/lib/postgresql/15/bin/postgres",
        "main",
    )
    assert client.application_name is None  # empty in the record: not an empty string


def test_background_processes_are_reported_when_included(titles):
    everything = enricher(include_background=True)
    reported = [everything.enrich(statement(pid)) for pid in TITLES]
    assert [e.pid for e in reported if e is not None] == list(TITLES)
    assert everything.filtered == 0
    autovacuum, walsender = reported[1], reported[2]
    assert autovacuum is not None and walsender is not None
    assert (autovacuum.user, autovacuum.database) == (None, None)
    assert (walsender.user, walsender.client) == ("repl", "10.0.0.2(5555)")


def test_a_title_is_kept_until_the_backend_exits(titles):
    current, reads = titles
    enrich = enricher()
    enrich.note(BackendNotice(NoticeKind.BACKEND_STARTED, 101))
    assert reads == [101]
    current[101] = "postgres: 15/main: checkpointer "  # not read again while 101 lives
    first, second = enrich.enrich(statement(101)), enrich.enrich(statement(101, start_ns=2_000))
    assert first is not None and second is not None and second.user == "app"
    assert reads == [101]
    # The backend exits; a background process gets its pid: its title is read afresh.
    enrich.note(BackendNotice(NoticeKind.BACKEND_EXITED, 101))
    assert enrich.enrich(statement(101, start_ns=3_000)) is None
    assert reads == [101, 101] and enrich.filtered == 1


def test_bound_values_are_formatted_as_postgresql_logs_them_and_cut(titles):
    enrich = enricher(params_max_length=4)
    parameters = [
        BoundParameter(b"0.25", binary=False, cut=False),  # exactly the limit: whole
        BoundParameter(b"abcdef", binary=False, cut=False),  # over it: cut, with "..."
        BoundParameter(b"\x01\x02\xff", binary=True, cut=False),  # binary: hex
        BoundParameter(None, binary=False, cut=False),  # NULL stays NULL
        BoundParameter(b"ab", binary=False, cut=True),  # the kernel's copy ended in it
        BoundParameter("日本".encode(), binary=False, cut=False),  # no half character
    ]
    event = enrich.enrich(statement(101, statement_name="", params=parameters))
    assert event is not None
    assert event.params == ["0.25", "abcd...", "\\x0102ff", None, "ab...", "日..."]
    assert event.statement_name is None  # the unnamed statement


def test_params_max_length_0_logs_no_values(titles):
    enrich = enricher(params_max_length=0)
    values = [BoundParameter(b"secret", binary=False, cut=False)]
    event = enrich.enrich(statement(101, statement_name="named", params=values))
    assert event is not None and event.params is None and event.statement_name == "named"


def test_redaction_replaces_literals_and_bound_values(titles):
    query = "select * from users where email = 'alice@example.com' and age > 41 and id = $1"
    for redact, expected_query, expected_params in [
        (True, "select * from users where email = $2 and age > $3 and id = $1", ["<redacted>"]),
        (False, query, ["42"]),
    ]:
        enrich = enricher(redact=redact)
        values = [
            BoundParameter(b"42", binary=False, cut=False),
            BoundParameter(None, False, False),
        ]
        event = enrich.enrich(statement(101, query=query, params=values))
        assert event is not None
        assert event.query == expected_query
        assert event.params == [*expected_params, None]


def test_a_blocker_s_statement_is_redacted_like_the_event_s_own(titles):
    blocker = {"pid": 7, "level": 1, "query": "update t set v = 'secret' where id = 3"}
    prepared = {"pid": 0, "level": 1, "query": None}
    for redact, expected in [
        (True, "update t set v = $1 where id = $2"),
        (False, "update t set v = 'secret' where id = 3"),
    ]:
        event = enricher(redact=redact).enrich(
            statement(101, blocked_by=[blocker, prepared], lock_wait_start_unix_ns=10**18)
        )
        assert event is not None and event.blocked_by is not None
        assert [entry["query"] for entry in event.blocked_by] == [expected, None]
        assert event.lock_wait_start == datetime.fromtimestamp(10**9, timezone.utc)
    assert blocker["query"] == "update t set v = 'secret' where id = 3"  # not changed in place


def test_the_event_starts_when_the_record_says_in_utc(titles):
    start = datetime(2026, 12, 7, 10, 30, 15, 250_000, tzinfo=timezone.utc)
    event = enricher().enrich(statement(101, start_ns=int(start.timestamp()) * 10**9 + 250_000_000))
    assert event is not None
    assert event.ts == start and event.ts.tzinfo is timezone.utc
    assert event.duration_ms == 300.0


# -- probe selection ----------------------------------------------------------------------

PATH = "/opt/pg/bin/postgres"


def binary(
    functions: Sequence[str] = ("f_common",),
    usdt: Sequence[tuple[str, str]] = (),
    objects: Sequence[str] = (),
    has_symtab: bool = False,
    major: int = 16,
) -> PostgresBinary:
    return PostgresBinary(
        path=PATH,
        version=f"{major}.4",
        major=major,
        has_symtab=has_symtab,
        functions={name: Function(0x1000 + n, 0x100 + n) for n, name in enumerate(functions)},
        objects={name: 0x2000 + n for n, name in enumerate(objects)},
        usdt={key: UsdtProbe(*key, 0x3000, 0x300, 0, ("8@%rbx",)) for key in usdt},
    )


def definition(
    name: str,
    *attachments: Uprobe | Usdt,
    globals: tuple[str, ...] = (),
    requirement: Callable[[PostgresBinary], str | None] | None = None,
    **options: Any,
) -> ProbeDefinition:
    """A BPF definition (never compiled here): what it needs is its program's."""
    program = BpfProgram(
        c_file=Path("x.c"),
        attachments=attachments or (Uprobe("f_common", f"on_{name}"),),
        globals=globals,
        **({"requirement": requirement} if requirement else {}),
    )
    return ProbeDefinition(name=name, description=f"{name} for the tests", open=program, **options)


MANUAL = definition("manual", priority=100, automatic=False)  # supported, never automatic
MISSING = definition("missing", Uprobe("f_missing", "on_missing"), priority=50)
HIGH = definition("high", priority=20)
LOW = definition("low", priority=10)
AVAILABLE = {d.name: d for d in (LOW, MISSING, HIGH, MANUAL)}


def names(chosen: list[ProbeDefinition]) -> list[str]:
    return [d.name for d in chosen]


def test_auto_picks_the_highest_priority_supported_automatic_definition():
    assert names(select_probes(["auto"], AVAILABLE, binary(), "target[0]")) == ["high"]
    reversed_order = dict(reversed(AVAILABLE.items()))
    assert names(select_probes(["auto"], reversed_order, binary(), "target[0]")) == ["high"]
    # Where the higher one can attach, it wins.
    both = binary(functions=("f_common", "f_missing"))
    assert names(select_probes(["auto"], AVAILABLE, both, "target[0]")) == ["missing"]


def test_auto_picks_a_definition_with_a_floor_only_at_or_over_it():
    """As `sampled`: first choice from 50 ms while the interval follows the threshold,
    and from 5 sampling intervals when one is set."""
    looking = definition("looking", priority=200, auto_floor_ms=sampled_floor)
    available = {**AVAILABLE, "looking": looking}

    def auto(**settings) -> list[str]:
        daemon = DaemonConfig(**settings)
        return names(select_probes(["auto"], available, binary(), "t", daemon))

    assert auto(threshold_ms=200) == ["looking"]
    assert auto(threshold_ms=50) == ["looking"]
    assert auto(threshold_ms=49.9) == ["high"]
    assert auto(threshold_ms=200, sample_interval_ms=50) == ["high"]
    assert auto(threshold_ms=250, sample_interval_ms=50) == ["looking"]
    with pytest.raises(UserError) as refused:
        select_probes(["auto"], {"looking": looking}, binary(), "t", DaemonConfig(threshold_ms=1))
    assert "looking: threshold_ms 1 is under its floor of 50 ms" in refused.value.cause


def test_auto_never_picks_a_definition_that_is_not_automatic():
    available = {"manual": MANUAL, "missing": MISSING}
    with pytest.raises(UserError) as refused:
        select_probes(["auto"], available, binary(), "target[0]")
    assert refused.value.cause == (
        f"target[0]: no probe can attach to {PATH} (missing: no function f_missing in {PATH} "
        "(the binary is stripped; use a build with symbols))"
    )
    assert refused.value.fix == "point the target at a PostgreSQL server binary"
    assert "manual" not in str(refused.value)
    # Named, it attaches.
    assert names(select_probes(["manual"], available, binary(), "target[0]")) == ["manual"]


def test_auto_with_no_definition_installed():
    with pytest.raises(UserError, match=r"^target\[0\]: no probe definition is installed; "):
        select_probes(["auto"], {}, binary(), "target[0]")


@pytest.mark.parametrize(
    ("candidate", "target_binary", "reason"),
    [
        (
            MISSING,
            binary(),
            f"no function f_missing in {PATH} (the binary is stripped; use a build with symbols)",
        ),
        (
            MISSING,
            binary(has_symtab=True),
            f"no function f_missing in {PATH} (the function is inlined or absent in this build)",
        ),
        (
            definition("usdt", Usdt("postgresql", "query__start", "on_query_start")),
            binary(usdt=[("postgresql", "query__done")]),
            f"no USDT probe postgresql:query__start in {PATH} (built without --enable-dtrace)",
        ),
        (
            definition("status", globals=("MyBEEntry",)),
            binary(objects=("application_name",)),
            f"no exported global MyBEEntry in {PATH}",
        ),
        (
            definition(
                "layout",
                requirement=lambda b: None if b.major >= 15 else f"no layout for {b.major}",
            ),
            binary(major=14),
            "no layout for 14",
        ),
    ],
)
def test_a_named_definition_that_cannot_attach_is_one_line_naming_why(
    candidate, target_binary, reason
):
    assert candidate.unsupported_reason(target_binary) == reason
    with pytest.raises(UserError) as refused:
        select_probes([candidate.name], {candidate.name: candidate}, target_binary, "target[2]")
    assert refused.value.cause == f"target[2]: probe {candidate.name} cannot attach: {reason}"
    assert refused.value.fix == 'use probes = ["auto"] to pick one that can'
    assert "\n" not in str(refused.value)


def test_what_a_definition_needs_is_checked_in_full():
    usdt = definition("usdt", Usdt("postgresql", "query__start", "on_query_start"))
    assert usdt.unsupported_reason(binary(usdt=[("postgresql", "query__start")])) is None
    status = definition("status", globals=("MyBEEntry",))
    assert status.unsupported_reason(binary(objects=("MyBEEntry",))) is None
    layout = definition("layout", requirement=lambda b: None if b.major >= 15 else "old")
    assert layout.unsupported_reason(binary(major=15)) is None
    # The requirement is asked only once the symbols are there.
    both = definition("both", Uprobe("f_missing", "on_x"), requirement=lambda b: "old")
    assert both.unsupported_reason(binary()).startswith("no function f_missing")


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(UserError) as refused:
        select_probes(["high", "nosuch"], AVAILABLE, binary(), "target[0]")
    assert refused.value.cause == "target[0]: unknown probe 'nosuch'"
    assert refused.value.fix == "use one of auto, high, low, manual, missing"


def test_a_definition_named_twice_or_also_picked_by_auto_attaches_once():
    chosen = select_probes(["high", "auto", "low", "high", "low"], AVAILABLE, binary(), "t")
    assert names(chosen) == ["high", "low"]
    assert names(select_probes(["auto", "auto"], AVAILABLE, binary(), "t")) == ["high"]


def test_a_factory_that_checks_no_binary_fits_every_binary():
    def open_anything(*_args: object) -> Any:
        raise NotImplementedError

    plain = ProbeDefinition(name="plain", description="", open=open_anything)
    assert not isinstance(plain.open, ChecksBinary)
    assert plain.unsupported_reason(binary()) is None and plain.symbols == frozenset()

    class Picky:
        symbols = frozenset({"f_special"})

        def unsupported_reason(self, checked: PostgresBinary) -> str | None:
            return None if "f_special" in checked.functions else "no f_special"

        def __call__(self, *_args: object) -> Any:
            raise NotImplementedError

    picky = ProbeDefinition(name="picky", description="", open=Picky())
    assert isinstance(picky.open, ChecksBinary)
    assert picky.unsupported_reason(binary()) == "no f_special"
    assert picky.unsupported_reason(binary(functions=("f_special",))) is None
    assert wanted_symbols([plain, picky]) == {"f_special"}


def test_wanted_symbols_are_the_definitions_and_the_shared_ones():
    wanted = wanted_symbols(
        [
            definition("a", Uprobe("f_a", "on_a"), Usdt("postgresql", "query__start", "on_q")),
            definition("b", globals=("MyBEEntry",)),
        ]
    )
    shared = {uprobe.symbol for uprobe in OUTCOME_UPROBES} | set(SHARED_GLOBALS)
    assert wanted == {"f_a", "f_common", "MyBEEntry"} | shared


def test_activity_and_extended_refuse_a_major_whose_states_are_not_verified():
    """A wrong STATE_RUNNING would leave every statement unseen: never guessed."""
    from pgslowlog.plugins.activity_probe import ACTIVITY
    from pgslowlog.plugins.extended_probe import EXTENDED

    functions = ("pgstat_report_activity", "exec_parse_message", "exec_bind_message")
    newer = binary(functions=(*functions, "exec_execute_message"), major=19)
    reason = (
        "PostgreSQL 19's struct layout is not known to pgslowlog "
        "(verified from real headers: 13, 14, 15, 16, 17, 18)"
    )
    assert ACTIVITY.unsupported_reason(newer) == EXTENDED.unsupported_reason(newer) == reason
    known = binary(functions=(*functions, "exec_execute_message"), major=18)
    assert ACTIVITY.unsupported_reason(known) is EXTENDED.unsupported_reason(known) is None

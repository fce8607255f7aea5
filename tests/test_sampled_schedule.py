"""When `sampled` looks, and the time it did not look when it should have: pure logic
(the real looks against real servers are in test_sampled.py and test_sampled_faults.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from pgslowlog.sampled import schedule
from pgslowlog.sampled.blind import BlindTime
from pgslowlog.sampled.schedule import Schedule, interval_ms
from pgslowlog.sampled.statements import BackendSample, StatementTracker


@pytest.mark.parametrize(
    ("threshold_ms", "expected"),
    [(0, 2.0), (5, 2.0), (10, 2.0), (20, 4.0), (35, 7.0), (50, 10.0), (200, 10.0), (60_000, 10.0)],
)
def test_unset_the_interval_is_a_fifth_of_the_threshold_within_2_and_10_ms(threshold_ms, expected):
    assert interval_ms(None, threshold_ms) == expected


def test_a_set_interval_is_kept_and_moves_the_floor_with_it():
    assert interval_ms(25.0, 20) == 25.0
    assert schedule.auto_floor_ms(None) == 50.0
    assert schedule.auto_floor_ms(25.0) == 125.0


@pytest.mark.parametrize("threshold_ms", [0, 1, 10, 20, 50, 100, 200, 1000, 60_000])
@pytest.mark.parametrize("configured", [None, 1.0, 10.0, 100.0])
def test_a_statement_is_followed_before_its_text_is_due(threshold_ms, configured):
    """One that begins just after a look is seen at the next (maybe younger than the age
    from which statements are followed) and followed at the one after: by then it must
    not be older than the age at which its text is read."""
    at = Schedule.at(threshold_ms * 1000, configured)
    assert at.interval_us <= at.pause_us <= schedule.PAUSE_MAX_MS * 1000 or (
        at.pause_us == at.interval_us
    )
    if at.text_age_us >= at.interval_us + at.follow_age_us:
        assert at.follow_age_us + at.pause_us <= at.text_age_us
    else:  # a threshold of few intervals: no pause at all
        assert at.pause_us == at.interval_us
    assert at.follow_age_us <= max(at.interval_us, threshold_ms * 1000)


def test_at_the_default_threshold_looks_pause_for_a_quarter_of_it():
    at = Schedule.at(200_000, None)
    assert (at.interval_us, at.pause_us, at.follow_age_us, at.text_age_us) == (
        10_000,
        50_000,
        10_000,
        170_000,
    )
    # At the floor there is no room for a pause: every interval.
    floor = Schedule.at(20_000, None)
    assert floor.pause_us == floor.interval_us == 4_000


def sample(start_us: int, wait: str = "CPU", running: bool = True) -> BackendSample:
    return BackendSample(pid=7, running=running, activity_start_us=start_us,
                         state_start_us=start_us, wait=wait)  # fmt: skip


def test_a_look_after_a_pause_counts_its_wait_for_the_intervals_it_stands_for():
    tracker = StatementTracker()
    # First seen 40 ms after it began, at an interval of 10 ms: 4 intervals of Lock.
    tracker.observe(sample(0, "Lock:transactionid"), 40_000, 10_000)
    tracker.observe(sample(0, "CPU"), 50_000, 10_000)
    tracker.observe(sample(0, "CPU"), 61_000, 10_000)  # a little late: still one
    done = tracker.observe(sample(0, running=False), 70_000, 10_000)
    assert done is not None
    assert done.waits == {"Lock:transactionid": 4, "CPU": 2}


def test_a_late_look_counts_blind_time_only_past_an_interval():
    blind = BlindTime("t")
    now = time.monotonic()
    blind.baseline(now)
    blind.late(0.5, now)  # nothing ran meanwhile, nor was ready to: stopped
    assert blind.counters()["blind_ms_stopped"] == 500
    assert blind.counters()["blind_ms"] == 500
    blind.add("cluster_unreadable", 20.0, now)
    assert blind.counters()["blind_ms"] == 520
    blind.close()


def test_blind_time_while_the_daemon_itself_was_busy_is_held_up():
    """Another of its threads busy (holding the interpreter, a garbage collection)
    while the looking one sleeps: the process's CPU shows it."""
    blind = BlindTime("t")
    blind.baseline(time.monotonic())
    started = time.process_time()

    def spin() -> None:
        while time.process_time() < started + 0.3:  # 300 ms of this process's CPU
            pass

    busy = threading.Thread(target=spin)
    busy.start()
    busy.join()
    blind.late(0.3, time.monotonic())
    counts = blind.counters()
    assert counts["blind_ms_held_up"] == 300 and counts["blind_ms_stopped"] == 0, counts
    blind.close()


def test_blind_time_adding_up_is_warned_about_once_with_its_cause():
    blind = BlindTime("main")
    now = time.monotonic()
    with capture_logs() as logs:
        blind.add("stopped", 100.0, now)  # under the warning's threshold
        blind.add("stopped", 200.0, now)
        blind.add("stopped", 900.0, now + 1)  # within WARN_EVERY_S of the warning
    warnings = [entry for entry in logs if entry["event"] == "blind_time"]
    assert len(warnings) == 1, logs
    (warning,) = warnings
    assert (warning["target"], warning["cause"], warning["blind_ms"]) == ("main", "stopped", 300)
    assert "SIGSTOP" in warning["why"]
    blind.close()


STARVED = r"""
import os, sys, time
from pgslowlog.sampled.blind import BlindTime

hog = os.fork()
if hog == 0:  # a hog in the same group, in a process of its own (no GIL shared)
    os.close(1)  # not holding the test's pipe open
    while True:
        pass
time.sleep(0.3)  # the hog has spent the quota of a few periods: throttled now and then
blind = BlindTime("t")
blind.baseline(time.monotonic())
late = 0.0
begun = time.monotonic()
while late < 0.3 and time.monotonic() - begun < 10:  # wake-ups wait for the next period
    started = time.monotonic()
    time.sleep(0.005)
    late += time.monotonic() - started - 0.005
blind.late(late, time.monotonic())
os.kill(hog, 9)
print(blind.counters()["blind_ms_cpu_starved"], round(late * 1000))
"""


@pytest.mark.ebpf  # needs root: a cgroup of its own (v1 cpu controller)
def test_blind_time_under_a_cpu_quota_is_cpu_starved():
    """The looking thread is ready but its cgroup's CPU quota is spent (a systemd
    CPUQuota=): its run delay shows it, and the cause says cpu_starved."""
    group = Path("/sys/fs/cgroup/cpu") / f"pgslowlog-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("10000")  # 10% of a core
        child = subprocess.Popen(
            [sys.executable, "-c", STARVED],
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())),
        )
        output, _ = child.communicate(timeout=60)
    finally:
        for pid in (group / "cgroup.procs").read_text().split():
            os.kill(int(pid), 9)
        while (group / "cgroup.procs").read_text().strip():
            time.sleep(0.05)
        group.rmdir()
    starved_ms, late_ms = map(int, output.splitlines()[-1].split())  # after its warning
    assert late_ms >= 300, output  # the quota held it back
    assert starved_ms == late_ms, output

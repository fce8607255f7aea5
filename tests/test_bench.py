"""The benchmark keeps working: a short run prints every condition and loses nothing silently.

The figures themselves are not asserted (they are for reading; see the table in docs/probes.md).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ebpf

BENCH = Path(__file__).parent.parent / "bench" / "pgslowlog_bench.py"


def bench_conditions() -> list[str]:
    """The conditions the script runs, every one of which must get its row."""
    spec = importlib.util.spec_from_file_location("pgslowlog_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return list(module.CONDITIONS)


def test_benchmark_runs_and_accounts_for_every_event():
    result = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--seconds",
            "5",
            "--rounds",
            "1",
            "--workloads",
            "select-only simple",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [
        line.split("|")
        for line in result.stdout.splitlines()
        if line.startswith("| select-only simple |")
    ]
    conditions = bench_conditions()
    assert [row[2].strip() for row in rows] == conditions
    assert len(conditions) >= 9  # no tracing, the floor, pgslowlog x4, PostgreSQL x2, dbslower
    assert all(float(row[3].replace(",", "")) > 0 for row in rows), rows
    counted = re.findall(
        r"threshold 0 \((\w+), select-only simple\), runs 1: pgbench issued (\d+), emitted (\d+), "
        r"written (\d+), lost in kernel (\d+) \(ring buffer full\) \+ (\d+) \(untracked\), "
        r"sink drops (\d+), background processes left out (\d+)",
        result.stdout,
    )
    assert [probe for probe, *_ in counted] == ["auto", "backend_status"], result.stdout
    for _probe, *figures in counted:
        issued, emitted, written, full, untracked, drops, background = map(int, figures)
        assert issued > 1000
        # every statement pgbench completed left the kernel or was counted as lost there
        # (emitted also holds pgbench's own set-up statements)
        assert emitted + full + untracked >= issued
        # every event the kernel sent is written or counted
        assert written + drops + background == emitted
    assert re.search(r"statement end to file sink: p50 [\d.]+ ms, p99 [\d.]+ ms", result.stdout)
    # PostgreSQL's CPU per transaction for every condition but dbslower; the daemon's for
    # pgslowlog's; and the BPF run time of the uprobe definitions, which trap per statement.
    for row in rows:
        # | workload | condition | TPS | ratio | A/A | range | CPU | ratio | A/A | daemon |
        condition, cpu, daemon = row[2].strip(), row[7].strip(), row[10].strip()
        assert re.fullmatch(r"\d+\.\d\d", row[5].strip()), row  # the noise beside each ratio
        assert (cpu == "-") == condition.startswith("dbslower"), row
        assert (daemon == "-") != condition.startswith("pgslowlog"), row
    assert re.search(
        r"BPF run time, pgslowlog activity 200ms, select-only simple \([\d,]+ transactions\): "
        r"[\d,]+ calls at [\d,]+ ns",
        result.stdout,
    ), result.stdout

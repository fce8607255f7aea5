"""A real Prometheus server (Debian's `prometheus`), started by a test to scrape daemons."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from waiting import wait_until

from pgslowlog.testing.cluster import free_port

PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector of `expr` as the HTTP API returns it."""
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        answer.raise_for_status()
        return answer.json()["data"]["result"]

    def values(self, expr: str, *labels: str) -> dict[tuple[str, ...], float]:
        """`expr`'s samples keyed by the values of `labels`."""
        return {
            tuple(sample["metric"].get(label, "") for label in labels): float(sample["value"][1])
            for sample in self.query(expr)
        }

    def wait_for(
        self, expr: str, labels: tuple[str, ...], done: Callable[[dict], bool], timeout: float = 60
    ) -> dict[tuple[str, ...], float]:
        """`values(expr, *labels)` once `done` holds of it (the last seen in the error)."""
        seen: list[dict[tuple[str, ...], float]] = []

        def found() -> tuple[dict[tuple[str, ...], float]] | None:
            seen[:] = [self.values(expr, *labels)]
            return (seen[0],) if done(seen[0]) else None  # true even when done with {}

        try:
            return wait_until(found, timeout, expr, interval=0.5)[0]
        except AssertionError as error:
            raise AssertionError(f"{error}; last values: {seen[-1:]}") from None


@contextmanager
def prometheus(directory: Path, targets: dict[str, list[str]]) -> Iterator[Prometheus]:
    """Prometheus scraping every second, job name -> ["host:port", ...]; stopped on
    every path, a failed start included."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "prometheus.yml"
    scrape_configs = [
        {"job_name": job, "static_configs": [{"targets": addresses}]}
        for job, addresses in targets.items()
    ]
    # JSON is YAML: no YAML writer needed.
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": scrape_configs,
            }
        )
    )
    port = free_port()
    log = (directory / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(
                    f"prometheus exited: {(directory / 'prometheus.log').read_text()}"
                )
            try:
                return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 60, "prometheus answering /-/ready", interval=0.2)
        yield Prometheus(url)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()

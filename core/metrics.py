"""Prometheus metrics: `[metrics] listen` serves /metrics through prometheus-client.

Slow statements are counted here as the collectors hand them to the dispatcher
(`SlowStatementCounts.observe`, a dispatcher observer: every event, whatever a sink's
queue later drops, which is the sink's own figure). Everything else (statements seen,
records lost, probes attached, the sinks' figures) is read at scrape time from the
same place as the `health` line: HealthReporter's figures and the dispatcher's
per-sink stats. prometheus-client writes the exposition format; `ScrapeCollector`
only says what the values are.
"""

from __future__ import annotations

import bisect
import errno
import platform
import socket
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple
from wsgiref.simple_server import WSGIServer

import httpx
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pgslowlog import __version__
from pgslowlog.config import Config, MetricsConfig, listen_address
from pgslowlog.dispatcher import Dispatcher
from pgslowlog.errors import UserError
from pgslowlog.event import SlowQuery
from pgslowlog.health import GONE, LOSS_CAUSES, HealthReporter
from pgslowlog.log import get_logger
from pgslowlog.machine import Finding
from pgslowlog.pg_layouts import WAIT_EVENT_TYPES
from pgslowlog.probe_set import ProbeSet
from pgslowlog.targets import target_name

log = get_logger(__name__)

# Slow statements last from the threshold (10 ms and up are common) to minutes.
DURATION_BUCKETS_S = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0, 3600.0,
)  # fmt: skip
OTHER = "other"  # the label value of everything beyond max_databases / users / containers
UNKNOWN = "unknown"  # the backend exited before its user and database were read
# Records lost, by cause: the sources' loss counters, and records the daemon could
# not decode or handle.
LOST_CAUSES = (*LOSS_CAUSES, "undecodable")
BLIND_PREFIX = "blind_ms_"  # a source's blind time by cause: blind_ms_<cause>
# The wait event types of every major (pg_layouts), and CPU for none: a bounded label.
WAIT_CLASSES = frozenset(
    {"CPU"} | {name for names in WAIT_EVENT_TYPES.values() for name in names.values()}
)


def _wait_class(wait: str) -> str:
    """ "Lock:transactionid" -> "Lock"; a type PostgreSQL does not have (a third party's
    source may say anything) -> "other", so the label stays bounded."""
    kind = wait.partition(":")[0]
    return kind if kind in WAIT_CLASSES else OTHER


class LabelFolder:
    """Keeps the first `limit` values it is given; every later one becomes "other"."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._kept: set[str] = set()

    def __call__(self, value: str | None) -> str:
        if value is None:
            return UNKNOWN
        if value in self._kept:
            return value
        if len(self._kept) < self.limit:
            self._kept.add(value)
            return value
        return OTHER


@dataclass
class _Histogram:
    buckets: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS_S) + 1))
    sum_s: float = 0.0


class SlowStatementCounts:
    """Slow statements by target, database, user and outcome; their durations; and for
    sampled ones the time spent per wait event type. Called from every collector thread."""

    def __init__(self, max_databases: int, max_users: int, max_containers: int = 50) -> None:
        self._lock = threading.Lock()
        # Per target: a container keeps its own label until max_containers were seen (a
        # Kubernetes container gets a new id at every restart); "" outside containers.
        self._containers: dict[str, LabelFolder] = {}
        self._max_containers = max_containers
        # Per target: a database or user is folded by how many that target has seen.
        self._databases: dict[str, LabelFolder] = {}
        self._users: dict[str, LabelFolder] = {}
        self._max_databases = max_databases
        self._max_users = max_users
        # Read and written under the lock only: snapshot() hands out copies.
        self._statements: dict[tuple[str, str, str, str, str], int] = {}
        self._durations: dict[tuple[str, str, str], _Histogram] = {}
        self._wait_s: dict[tuple[str, str, str], float] = {}
        self._main_wait: dict[tuple[str, str, str], int] = {}  # target, container, wait type

    def observe(self, events: Sequence[SlowQuery]) -> None:
        with self._lock:
            for event in events:
                target = event.target
                container = self._container(target, event.container)
                database = self._fold(self._databases, self._max_databases, target)(event.database)
                user = self._fold(self._users, self._max_users, target)(event.user)
                key = (target, container, database, user, event.outcome)
                self._statements[key] = self._statements.get(key, 0) + 1
                seconds = event.duration_ms / 1000
                histogram = self._durations.get((target, container, database))
                if histogram is None:
                    histogram = self._durations[target, container, database] = _Histogram()
                histogram.buckets[bisect.bisect_left(DURATION_BUCKETS_S, seconds)] += 1
                histogram.sum_s += seconds
                if event.waits:
                    self._share_out_waits((target, container), seconds, event.waits)

    def container_label(self, target: str, container: str | None) -> str:
        with self._lock:
            return self._container(target, container)

    def _container(self, target: str, container: str | None) -> str:
        if not container:
            return ""
        return self._fold(self._containers, self._max_containers, target)(container)

    def _share_out_waits(
        self, target: tuple[str, str], seconds: float, waits: dict[str, int]
    ) -> None:
        # Each look saw the statement doing one thing: its duration is shared out by looks.
        looks = sum(waits.values())
        if looks <= 0:
            return  # a third-party source's empty counts: nothing to share out
        for wait, count in waits.items():
            key = (*target, _wait_class(wait))
            self._wait_s[key] = self._wait_s.get(key, 0.0) + seconds * count / looks
        main = (*target, _wait_class(max(waits.items(), key=lambda item: item[1])[0]))
        self._main_wait[main] = self._main_wait.get(main, 0) + 1

    @staticmethod
    def _fold(folders: dict[str, LabelFolder], limit: int, target: str) -> LabelFolder:
        folder = folders.get(target)
        if folder is None:
            folder = folders[target] = LabelFolder(limit)
        return folder

    def snapshot(self) -> CountsSnapshot:
        with self._lock:
            durations = {
                key: _Histogram(list(value.buckets), value.sum_s)
                for key, value in self._durations.items()
            }
            return CountsSnapshot(
                dict(self._statements), durations, dict(self._wait_s), dict(self._main_wait)
            )


class CountsSnapshot(NamedTuple):
    # target, container ("" outside containers), then:
    statements: dict[tuple[str, str, str, str, str], int]  # database, user, outcome
    durations: dict[tuple[str, str, str], _Histogram]  # database
    wait_s: dict[tuple[str, str, str], float]  # wait event type
    main_wait: dict[tuple[str, str, str], int]  # wait event type seen most


@dataclass
class ScrapeSources:
    """What a scrape reads. The daemon's parts are there once Metrics.connect has run
    (a scrape may come first): until then, only the counts and the configured figures."""

    target_names: list[str]  # every configured target, one waiting for its binary too
    container_targets: list[str]  # the containers = true ones
    threshold_s: float  # the configured threshold, until the probe set tells the live one
    counts: SlowStatementCounts
    probes: ProbeSet | None = None
    health: HealthReporter | None = None
    dispatcher: Dispatcher | None = None


class ScrapeCollector(Collector):
    """prometheus-client's collector interface: what one scrape of /metrics returns."""

    def __init__(self, state: ScrapeSources) -> None:
        self.state = state
        self._build_info = _build_info()

    def collect(self) -> Iterator[Metric]:
        yield self._build_info
        yield from self._slow_statements()
        state = self.state
        threshold = GaugeMetricFamily(
            "pgslowlog_threshold_seconds", "Statements at least this long are slow (live)."
        )
        live = state.probes.threshold_ns / 1e9 if state.probes is not None else None
        threshold.add_metric([], state.threshold_s if live is None else live)
        yield threshold
        if state.health is not None:
            yield from self._probes(state.health)
        if state.dispatcher is not None:
            yield from self._sinks(state.dispatcher)

    def _slow_statements(self) -> Iterator[Metric]:
        statements, durations, waits, main_waits = self.state.counts.snapshot()
        total = CounterMetricFamily(
            "pgslowlog_slow_statements",
            "Slow statements handed to the sinks.",
            labels=["target", "container", "database", "user", "outcome"],
        )
        for labels, count in sorted(statements.items()):
            total.add_metric(list(labels), count)
        yield total
        histogram = HistogramMetricFamily(
            "pgslowlog_slow_statement_duration_seconds",
            "Durations of slow statements.",
            labels=["target", "container", "database"],
        )
        for where, value in sorted(durations.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*DURATION_BUCKETS_S, float("inf")), value.buckets):
                cumulative += count
                buckets.append((_bound(bound), cumulative))
            histogram.add_metric(list(where), buckets, value.sum_s)
        yield histogram
        wait = CounterMetricFamily(
            "pgslowlog_slow_statement_wait_seconds",
            "Time slow statements spent per wait event type (CPU: none), as the sampled "
            "definition saw it: each statement's duration shared out by its looks.",
            labels=["target", "container", "wait_event_type"],
        )
        for what, seconds in sorted(waits.items()):
            wait.add_metric(list(what), seconds)
        yield wait
        by_wait = CounterMetricFamily(
            "pgslowlog_slow_statements_by_wait",
            "Slow statements by the wait event type the sampled definition saw them in "
            "most (CPU: none; a type PostgreSQL does not have: other).",
            labels=["target", "container", "wait_event_type"],
        )
        for what, count in sorted(main_waits.items()):
            by_wait.add_metric(list(what), count)
        yield by_wait

    def _probes(self, health: HealthReporter) -> Iterator[Metric]:
        seen = CounterMetricFamily(
            "pgslowlog_statements_seen",
            "Statements the definition saw, slow or not (a trapping program counts each as "
            "it begins; backend_status and sampled, each as it ends).",
            labels=["target", "container", "probe"],
        )
        lost = CounterMetricFamily(
            "pgslowlog_records_lost",
            "Slow statements or records lost, by cause (see docs/sinks.md, its metrics list).",
            labels=["target", "container", "probe", "cause"],
        )
        attachments = GaugeMetricFamily(
            "pgslowlog_probe_attachments",
            "Places a definition watches on a target now (uprobes, USDT probes, clusters).",
            labels=["target", "container", "probe"],
        )
        looks = CounterMetricFamily(
            "pgslowlog_looks",
            "Looks a definition that samples took (sampled): how often it read the servers.",
            labels=["target", "container", "probe"],
        )
        blind = CounterMetricFamily(
            "pgslowlog_blind_seconds",
            "Time a look was due and none was taken, by cause (stopped, cpu_starved, "
            "held_up, cluster_unreadable): statements that began and ended then are unseen.",
            labels=["target", "container", "probe", "cause"],
        )
        totals = health.probe_totals()
        # Summed by labels: containers beyond max_containers share "other".
        seen_by: dict[tuple[str, ...], int] = {}
        lost_by: dict[tuple[str, ...], int] = {}
        attached_by: dict[tuple[str, ...], int] = {}
        looks_by: dict[tuple[str, ...], float] = {}
        blind_by: dict[tuple[str, ...], float] = {}
        for probe in totals:
            if probe.container == GONE:
                # What gone containers' instances counted: their series ended with them
                # (moved under one label, old losses would look like new ones).
                continue
            container = self.state.counts.container_label(probe.target, probe.container)
            labels = (probe.target, container, probe.definition)
            if "statements" in probe.counters:  # where the definition knows it
                seen_by[labels] = seen_by.get(labels, 0) + probe.counters["statements"]
            for cause in LOST_CAUSES:
                key = (*labels, cause)
                lost_by[key] = lost_by.get(key, 0) + probe.counters.get(cause, 0)
            attached_by[labels] = attached_by.get(labels, 0) + probe.attached_count
            if "looks" in probe.counters:  # a definition that samples
                looks_by[labels] = looks_by.get(labels, 0) + probe.counters["looks"]
            for counter, ms in probe.counters.items():
                if counter.startswith(BLIND_PREFIX):
                    key = (*labels, counter.removeprefix(BLIND_PREFIX))
                    blind_by[key] = blind_by.get(key, 0) + ms / 1000
        families: list[tuple[CounterMetricFamily | GaugeMetricFamily, Mapping[Any, float]]] = [
            (seen, seen_by),
            (lost, lost_by),
            (attachments, attached_by),
            (looks, looks_by),
            (blind, blind_by),
        ]
        for family, values in families:
            for label_values, value in values.items():
                family.add_metric(list(label_values), value)
        yield from (seen, lost, attachments, looks, blind)
        # Every configured target, one still waiting for its binary (no totals) at 0.
        attached_per_target = dict.fromkeys(self.state.target_names, 0)
        for probe in totals:  # per configured target: its containers' instances summed
            if probe.target in attached_per_target:
                attached_per_target[probe.target] += probe.attached_count > 0
        per_target = GaugeMetricFamily(
            "pgslowlog_target_probes_attached",
            "Definitions attached per configured target (0: it is not being watched).",
            labels=["target"],
        )
        for target, count in sorted(attached_per_target.items()):
            per_target.add_metric([target], count)
        yield per_target
        servers = GaugeMetricFamily(
            "pgslowlog_container_servers",
            "Servers in containers a containers = true target traces now (0 is no fault: "
            "a node may run none).",
            labels=["target"],
        )
        instances = dict.fromkeys(self.state.container_targets, 0)
        # Attached now: a gone container's totals (GONE) are retired, attached to nothing.
        live = {(p.target, p.container) for p in totals if p.container and p.attached_count}
        for target, _container in live:
            if target in instances:
                instances[target] += 1
        for target, count in sorted(instances.items()):
            servers.add_metric([target], count)
        yield servers

    @staticmethod
    def _sinks(dispatcher: Dispatcher) -> Iterator[Metric]:
        stats = dispatcher.stats()
        for field_name, metric, text in (
            ("delivered", "pgslowlog_sink_delivered_events", "Events the sink took."),
            ("retried", "pgslowlog_sink_retries", "Deliveries the sink had to retry."),
            ("failed", "pgslowlog_sink_failed_events", "Events in batches the sink failed."),
            (
                "dropped",
                "pgslowlog_sink_dropped_events",
                "Events dropped: the sink's queue (or spool) was full, or shutdown time ran out.",
            ),
        ):
            family = CounterMetricFamily(metric, text, labels=["sink"])
            for sink, figures in stats.items():
                family.add_metric([sink], getattr(figures, field_name))
            yield family
        spooled = GaugeMetricFamily(
            "pgslowlog_sink_spooled_events",
            "Events in the sink's spool on disk, waiting to be delivered (clickhouse).",
            labels=["sink"],
        )
        for sink, figures in stats.items():
            spooled.add_metric([sink], figures.spooled)
        yield spooled


def _build_info() -> Metric:
    info = InfoMetricFamily("pgslowlog_build", "pgslowlog's version and what it runs on.")
    try:
        import bcc

        bcc_version = str(getattr(bcc, "__version__", UNKNOWN))
    except ImportError:  # a machine without bcc can still serve the other figures
        bcc_version = "none"
    info.add_metric(
        [],
        {
            "version": __version__,
            "python": platform.python_version(),
            "bcc": bcc_version,
            "kernel": platform.release(),
        },
    )
    return info


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class Metrics:
    """/metrics on `listen`, served by prometheus-client in a thread of its own from the
    moment it is made: a taken port is refused before anything else starts."""

    def __init__(self, config: Config) -> None:
        assert config.metrics is not None  # made only for a config with [metrics]
        self.listen = listen = config.metrics.listen
        self.counts = SlowStatementCounts(
            config.metrics.max_databases, config.metrics.max_users, config.metrics.max_containers
        )
        self._sources = ScrapeSources(
            # A containers = true target may rightly have no server (a node without
            # PostgreSQL pods): pgslowlog_container_servers says how many it traces.
            target_names=[
                target_name(t, i) for i, t in enumerate(config.target) if not t.containers
            ],
            container_targets=[
                target_name(t, i) for i, t in enumerate(config.target) if t.containers
            ],
            threshold_s=config.daemon.threshold_ms / 1000,
            counts=self.counts,
        )
        registry = CollectorRegistry(auto_describe=False)
        registry.register(ScrapeCollector(self._sources))
        host, port = listen_address(listen)
        self._server: WSGIServer
        self._thread: threading.Thread
        try:
            self._server, self._thread = start_http_server(port, host, registry)
        except (OSError, UnicodeError) as error:
            raise cannot_serve(listen, error) from None
        log.info("metrics_serving", listen=listen, path="/metrics")

    def connect(self, probes: ProbeSet, health: HealthReporter, dispatcher: Dispatcher) -> None:
        """The one place the daemon's parts reach /metrics: slow statements counted as
        the collectors hand them to the dispatcher, the rest read at scrape time."""
        dispatcher.observers.append(self.counts.observe)
        self._sources.probes = probes
        self._sources.health = health
        self._sources.dispatcher = dispatcher

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def cannot_serve(listen: str, error: OSError | UnicodeError) -> UserError:
    if isinstance(error, socket.gaierror):
        why = f"the host is not known ({error.strerror})"
    elif isinstance(error, OSError):
        why = error.strerror or str(error)
    else:
        why = "the host is not a valid name"
    return UserError(
        f"metrics.listen = {listen!r} cannot be served: {why}",
        "choose a free port and an address of this machine in [metrics] listen",
    )


def check_listen(metrics: MetricsConfig) -> Finding:
    """For `check`: can `listen` be served? A port in use is accepted when a pgslowlog
    answers /metrics there: the daemon this file is for, still running (the role
    validates a new file while the old daemon runs). Raises UserError otherwise."""
    listen = metrics.listen
    host, port = listen_address(listen)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (OSError, UnicodeError) as error:
        raise cannot_serve(listen, error) from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
        try:
            probe.bind(address)
        except OSError as error:
            # Only "in use" can be our own daemon: another machine's address, or a
            # privileged port, is refused whoever answers there.
            if error.errno != errno.EADDRINUSE or not _pgslowlog_serves(str(address[0]), port):
                raise cannot_serve(listen, error) from None
            return Finding(
                True,
                f"metrics.listen {listen} is served by a running pgslowlog "
                "(a restart hands it over)",
            )
    if port < (unprivileged := _unprivileged_port_start()):
        # check may run as root (by hand); the unit's user has no
        # CAP_NET_BIND_SERVICE, so the service itself would be refused at start.
        return Finding(
            True,
            f"metrics.listen {listen}: port {port} is privileged; the service's user "
            "(pgslowlog, without CAP_NET_BIND_SERVICE) cannot bind it: choose a port "
            f"of {unprivileged} or above",
            warning=True,
        )
    return Finding(True, f"metrics.listen {listen} is free")


def _unprivileged_port_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        return 1024


def _pgslowlog_serves(host: str, port: int) -> bool:
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    url = f"http://[{host}]:{port}/metrics" if ":" in host else f"http://{host}:{port}/metrics"
    try:
        # trust_env=False: a proxy from the environment must not answer for localhost.
        return "pgslowlog_build_info" in httpx.get(url, timeout=2, trust_env=False).text
    except httpx.HTTPError:
        return False

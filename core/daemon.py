"""`pgslowlog run`: wire the pipeline together and live with signals.

probe in the kernel (loader) -> ring buffer -> collector (decoder, enrichment)
-> dispatcher -> sinks. SIGHUP re-reads the config: the threshold changes through
the BPF map, sinks reopen their files; nothing is detached. SIGTERM/SIGINT detach
the probes, drain the ring buffers and the sink queues, and exit 0.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from types import FrameType

import msgspec

from pgslowlog.collector import Collector
from pgslowlog.config import Config, TargetConfig, load_config
from pgslowlog.dispatcher import Dispatcher
from pgslowlog.elf import file_identity
from pgslowlog.enrichment import Enricher
from pgslowlog.errors import UserError
from pgslowlog.loader import LoadedProbe, ProbeLoadError
from pgslowlog.log import configure_logging, get_logger
from pgslowlog.machine import require_machine
from pgslowlog.plugin_manager import Plugins
from pgslowlog.probes import ProbeDefinition, select_probes, wanted_symbols
from pgslowlog.sinks import CommonSinkOptions
from pgslowlog.target_watch import WATCH_INTERVAL_S, WatchedTarget
from pgslowlog.targets import Target, resolve_target, target_name

log = get_logger(__name__)
LOSS_CHECK_INTERVAL_S = 10.0  # kernel loss counters are checked at least this often
# Changing these needs new maps or new probes: applied on restart, not on SIGHUP.
RESTART_ONLY = (
    "capture_params",
    "params_max_length",
    "redact_literals",
    "query_max_bytes",
    "max_backends",
    "ring_buffer_mib",
    "sink_queue_size",
    "stats_interval_s",
)
# The per-target figures of the health line.
TARGET_HEALTH = ("probes_attached", "uprobes", "statements", "slow_events", "lost", "untracked")
# Kernel counters that mean something was lost: log event, cause, fix.
LOSS_COUNTERS = {
    "untracked": (
        "statements_untracked",
        "no kernel memory for a backend's statement state",
        "look for memory pressure in the kernel log",
    ),
    "unrecorded": (
        "statements_unrecorded",
        "track_activities is off, so PostgreSQL kept no record for the probe to read",
        "turn track_activities on, or use the activity probe",
    ),
    "ringbuf_full": (
        "slow_statements_dropped",
        "ring buffer full",
        "raise daemon.ring_buffer_mib or the threshold",
    ),
}


@dataclass
class Plan:
    """What the config asks for, resolved against the installed plugins and binaries."""

    config: Config
    probes: list[tuple[Target, ProbeDefinition]]
    # binary targets whose file is not there yet (PostgreSQL installed after the daemon)
    pending: list[int] = field(default_factory=list)
    sink_options: dict[str, tuple[CommonSinkOptions, object]] = field(default_factory=dict)


def resolve_with_probes(
    target_config: TargetConfig, index: int, plugins: Plugins
) -> tuple[Target, list[ProbeDefinition]]:
    """One [[target]]: its binary inspected, and the probe definitions that attach to it."""
    wanted = wanted_symbols(plugins.probe_definitions.values())
    target = resolve_target(target_config, index, wanted)
    definitions = select_probes(
        target_config.probes, plugins.probe_definitions, target.binary, target.label
    )
    return target, definitions


def plan(config: Config, plugins: Plugins, source: str) -> Plan:
    chosen: list[tuple[Target, ProbeDefinition]] = []
    pending = []
    for index, target_config in enumerate(config.target):
        if target_config.binary is not None and file_identity(target_config.binary) is None:
            pending.append(index)
            continue
        target, definitions = resolve_with_probes(target_config, index, plugins)
        chosen += [(target, definition) for definition in definitions]
    sink_options = {}
    for name, raw in config.sinks.items():
        sink_type = plugins.sink_types.get(name)
        if sink_type is None:
            installed = ", ".join(sorted(plugins.sink_types)) or "none"
            raise UserError(
                f"config {source}: no sink plugin named {name!r} (installed: {installed})",
                "correct the [sinks.NAME] table or install the plugin",
            )
        sink_options[name] = sink_type.parse_options(raw, source)
        if sink_type.check is not None:
            try:
                sink_type.check(sink_options[name][1])
            except ValueError as error:
                raise UserError(
                    f"config {source}: sinks.{name}.{error}",
                    "fix that option, or the file or variable it names",
                ) from None
    return Plan(config=config, probes=chosen, pending=pending, sink_options=sink_options)


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about readiness; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.sendto(state.encode(), address)


class Daemon:
    def __init__(self, config_path: str) -> None:
        self.config_path = config_path
        self._wake = threading.Event()
        self._reload_requested = False
        self._stop_signal: str | None = None
        self._failure: str | None = None
        self._loaded: list[LoadedProbe] = []
        self._collectors: list[Collector] = []
        self._last_counters: dict[LoadedProbe, dict[str, int]] = {}
        self._watched: list[WatchedTarget] = []

    def run(self) -> int:
        config = load_config(self.config_path)
        require_machine()  # privileges, bcc, headers...: one line naming what is missing
        configure_logging(config.daemon.log_level)
        plugins = Plugins.load()
        the_plan = plan(config, plugins, self.config_path)
        self.config = config
        self.plugins = plugins

        self.dispatcher = Dispatcher()
        failed_sinks = []
        for name, (common, options) in the_plan.sink_options.items():
            try:
                sink = plugins.sink_types[name].create(options)
            except Exception as error:  # a third-party sink may raise anything
                failed_sinks.append(f"sink {name} cannot start: {error}")
                log.error("sink_start_failed", sink=name, error=str(error))
                continue
            queue_size = common.queue_size or config.daemon.sink_queue_size
            self.dispatcher.add_sink(name, sink, queue_size, common.shutdown_timeout_s)
        if len(failed_sinks) == len(the_plan.sink_options):
            raise UserError(
                "; ".join(failed_sinks),
                "fix the [sinks.NAME] options, the path's permissions, or the plugin",
            )
        self.dispatcher.start()

        self._install_signal_handlers()
        self._watch_binary_targets(config)
        try:
            for target, definition in the_plan.probes:
                self._start_probe(target, definition, config)
        except ProbeLoadError as error:
            log.error("probe_failed", error=str(error))
            self._shutdown()
            return 1
        for index in the_plan.pending:
            log.warning(
                "target_waiting",
                target=target_name(config.target[index], index),
                binary=config.target[index].binary,
                action=f"attaching when the file appears (checked every {WATCH_INTERVAL_S:g} s)",
            )
        log.info(
            "ready",
            threshold_ms=config.daemon.threshold_ms,
            probes=[f"{p.definition.name}@{p.target.binary.path}" for p in self._loaded],
            sinks=self.dispatcher.sink_names(),
        )
        sd_notify("READY=1")

        stats_interval = config.daemon.stats_interval_s
        next_sink_report = time.monotonic() + stats_interval
        while self._stop_signal is None:
            self._wake.wait(min(LOSS_CHECK_INTERVAL_S, stats_interval, WATCH_INTERVAL_S))
            self._wake.clear()
            if self._reload_requested:
                self._reload_requested = False
                self._reload()
            self._check_binary_targets()
            for loaded in self._loaded:
                loaded.sync_clock()
            self._report_losses()
            if time.monotonic() >= next_sink_report:
                log.info("health", **self._health())
                next_sink_report = time.monotonic() + stats_interval
        log.info("stopping", signal=self._stop_signal)
        sd_notify("STOPPING=1")
        self._shutdown()
        if self._failure is not None:
            log.error("exiting_after_failure", reason=self._failure)
            return 1
        return 0

    def _watch_binary_targets(self, config: Config) -> None:
        for index, target_config in enumerate(config.target):
            if target_config.binary is not None:
                # Taken before the file is read: a replacement in between is seen next time.
                watched = WatchedTarget(index, target_config, file_identity(target_config.binary))
                self._watched.append(watched)

    def _check_binary_targets(self) -> None:
        """Attach to a binary that appeared or replaced the one the probes are on."""
        for watched in self._watched:
            name = target_name(watched.config, watched.index)
            new_file = watched.change()
            if new_file is None:
                gone = watched.attached is not None and file_identity(watched.path) is None
                if gone and not watched.missing_logged:
                    watched.missing_logged = True
                    log.error(
                        "target_binary_missing",
                        target=name,
                        binary=watched.path,
                        action="probes stay on the old file for processes still running it; "
                        "other targets are served; attaching again when a binary appears",
                    )
                continue
            watched.missing_logged = False
            try:
                target, definitions = resolve_with_probes(
                    watched.config, watched.index, self.plugins
                )
            except UserError as error:
                watched.refused = new_file
                log.error("target_unusable", target=name, binary=watched.path, error=str(error))
                continue
            replaced = watched.attached is not None
            self._stop_target_probes(watched.index)
            try:
                for definition in definitions:
                    self._start_probe(target, definition, self.config)
            except ProbeLoadError as error:
                watched.refused = new_file
                log.error("target_attach_failed", target=name, error=str(error))
                self._stop_target_probes(watched.index)
                continue
            watched.attached = new_file
            log.warning(
                "target_reattached" if replaced else "target_attached",
                target=name,
                binary=watched.path,
                postgres_version=target.binary.version,
                reason="the binary was replaced" if replaced else "the binary appeared",
            )

    def _stop_target_probes(self, index: int) -> None:
        """Detach one target's probes, deliver what their ring buffers hold, free them."""
        keep_loaded, keep_collectors = [], []
        for loaded, collector in zip(self._loaded, self._collectors, strict=True):
            if loaded.target.index != index:
                keep_loaded.append(loaded)
                keep_collectors.append(collector)
                continue
            loaded.detach()
            collector.stop()
            collector.join()
            self._report_losses_of(loaded)
            loaded.close()
            self._last_counters.pop(loaded, None)
        self._loaded, self._collectors = keep_loaded, keep_collectors

    def _start_probe(self, target: Target, definition: ProbeDefinition, config: Config) -> None:
        loaded = LoadedProbe(definition, target, config.daemon)
        self._loaded.append(loaded)
        try:
            loaded.attach()
        except ProbeLoadError:
            self._loaded.pop()
            loaded.close()
            raise
        enricher = Enricher(
            definition.name,
            target.binary.path,
            target.name,
            config.daemon.include_background,
            config.daemon.max_backends,
            config.daemon.params_max_length,
            config.daemon.redact_literals,
        )
        collector = Collector(loaded, enricher, self.dispatcher, self._fail)
        self._collectors.append(collector)
        collector.start()
        log.info(
            "probe_attached",
            probe=definition.name,
            target=target.name,
            binary=target.binary.path,
            postgres_version=target.binary.version,
            uprobes=loaded.attached_count,
            compiler_peak_rss_mb=loaded.compiler_peak_rss_mb,
        )

    def _fail(self, reason: str) -> None:
        self._failure = reason
        self._stop_signal = "internal failure"
        self._wake.set()

    def _install_signal_handlers(self) -> None:
        def stop(signum: int, _frame: FrameType | None) -> None:
            self._stop_signal = signal.Signals(signum).name
            self._wake.set()

        def reload(_signum: int, _frame: FrameType | None) -> None:
            self._reload_requested = True
            self._wake.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)

    def _reload(self) -> None:
        sd_notify("RELOADING=1")
        try:
            new = load_config(self.config_path)
        except UserError as error:
            log.error("reload_failed", error=str(error), action="keeping the running configuration")
            sd_notify("READY=1")
            return
        old = self.config
        configure_logging(new.daemon.log_level)
        for loaded in self._loaded:
            loaded.set_threshold_ns(new.threshold_ns)
        self.dispatcher.reopen()
        needs_restart = [
            f"daemon.{key}"
            for key in RESTART_ONLY
            if getattr(old.daemon, key) != getattr(new.daemon, key)
        ]
        if new.target != old.target:
            needs_restart.append("target")
        if new.sinks != old.sinks:
            needs_restart.append("sinks")
        if new.daemon.include_background != old.daemon.include_background:
            needs_restart.append("daemon.include_background")
        if needs_restart:
            log.warning("reload_needs_restart", changed=needs_restart)
        # Remember what is really in effect, so the next reload compares honestly.
        self.config = _merge_live(old, new)
        log.info("reloaded", threshold_ms=new.daemon.threshold_ms, probes_reattached=0)
        sd_notify("READY=1")

    def _report_losses(self) -> None:
        for loaded in self._loaded:
            self._report_losses_of(loaded)

    def _report_losses_of(self, loaded: LoadedProbe) -> None:
        now = loaded.counters()
        before = self._last_counters.get(loaded, dict.fromkeys(now, 0))
        self._last_counters[loaded] = now
        for counter, (event, cause, fix) in LOSS_COUNTERS.items():
            if lost := now[counter] - before[counter]:
                log.warning(event, probe=loaded.definition.name, count=lost, cause=cause, fix=fix)

    def _target_health(self) -> dict[str, dict[str, int]]:
        """Per target: probes attached and the kernel's counters, summed over its probes."""
        targets: dict[str, dict[str, int]] = {}
        for loaded in self._loaded:
            counters = loaded.counters()
            entry = targets.setdefault(loaded.target.name, dict.fromkeys(TARGET_HEALTH, 0))
            entry["probes_attached"] += loaded.attached_count > 0
            entry["uprobes"] += loaded.attached_count
            entry["statements"] += counters["statements"]
            entry["slow_events"] += counters["emitted"]
            entry["lost"] += counters["ringbuf_full"]
            entry["untracked"] += counters["untracked"] + counters["unrecorded"]
        return targets

    def _health(self) -> dict[str, object]:
        """What an operator checks first: is every target probed, is anything lost."""
        return {
            "targets": self._target_health(),
            "sinks": {name: asdict(stats) for name, stats in self.dispatcher.stats().items()},
            "undecodable_records": sum(c.failed_records + c.undecodable for c in self._collectors),
        }

    def _shutdown(self) -> None:
        for loaded in self._loaded:
            loaded.detach()
        for collector in self._collectors:
            collector.stop()
        for collector in self._collectors:
            collector.join()
        self._report_losses()
        totals = {f"{p.definition.name}@{p.target.index}": p.counters() for p in self._loaded}
        targets = self._target_health()
        for loaded in self._loaded:
            loaded.close()
        sink_stats = self.dispatcher.close()
        log.info(
            "stopped",
            targets=targets,
            kernel_counters=totals,
            sinks={name: asdict(stats) for name, stats in sink_stats.items()},
            filtered_background=sum(c.enricher.filtered for c in self._collectors),
            failed_records=sum(c.failed_records + c.undecodable for c in self._collectors),
        )


def _merge_live(old: Config, new: Config) -> Config:
    """The config really in effect after a reload: live keys from new, the rest from old."""
    daemon = msgspec.structs.replace(
        old.daemon, threshold_ms=new.daemon.threshold_ms, log_level=new.daemon.log_level
    )
    return msgspec.structs.replace(old, daemon=daemon)

"""`pgslowlog run`: the supervisor. Starts the pipeline, keeps it going, stops it.

source (probe in the kernel, or a sampler) -> collector (decoder, enrichment) ->
dispatcher -> sinks. The parts live in their own modules: planner (what to
attach where), probe_set (each source with its collector), target_watch
(re-attach after an upgrade), health (losses and the health line). This class
keeps the main loop, the signals and the reload: SIGHUP re-reads the config (the
threshold changes through the sources, sinks reopen their files, nothing is
detached); SIGTERM/SIGINT detach, drain the sources and the sink queues, exit 0.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from dataclasses import asdict
from types import FrameType

from pgslowlog.config import Config, TargetConfig, load_config
from pgslowlog.dispatcher import Dispatcher
from pgslowlog.errors import UserError
from pgslowlog.health import HealthReporter
from pgslowlog.live_config import merge_live, needs_restart
from pgslowlog.log import configure_logging, get_logger
from pgslowlog.machine import require_machine
from pgslowlog.metrics import MetricsServer, MetricsSources, SlowStatementCounts
from pgslowlog.planner import Plan, plan, resolve_with_probes
from pgslowlog.plugin_manager import Plugins
from pgslowlog.probe_set import ProbeSet
from pgslowlog.probes import AUTO, ProbeDefinition, select_probes
from pgslowlog.sources import ProbeLoadError
from pgslowlog.target_watch import WATCH_INTERVAL_S, TargetWatcher
from pgslowlog.targets import Target, target_name

log = get_logger(__name__)
LOSS_CHECK_INTERVAL_S = 10.0  # loss counters are checked at least this often


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about readiness; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.sendto(state.encode(), address)


def start_sinks(the_plan: Plan, plugins: Plugins) -> Dispatcher:
    """A dispatcher with every sink that could start; UserError if none could."""
    dispatcher = Dispatcher()
    failed = []
    for name, (common, options) in the_plan.sink_options.items():
        try:
            sink = plugins.sink_types[name].create(options)
        except Exception as error:  # a third-party sink may raise anything
            failed.append(f"sink {name} cannot start: {error}")
            log.error("sink_start_failed", sink=name, error=str(error))
            continue
        queue_size = common.queue_size or the_plan.config.daemon.sink_queue_size
        dispatcher.add_sink(name, sink, queue_size, common.shutdown_timeout_s)
    if len(failed) == len(the_plan.sink_options):
        raise UserError(
            "; ".join(failed),
            "fix the [sinks.NAME] options, the path's permissions, or the plugin",
        )
    return dispatcher


class Daemon:
    def __init__(self, config_path: str) -> None:
        self.config_path = config_path
        self._wake = threading.Event()
        self._reload_requested = False
        self._stop_signal: str | None = None
        self._failure: str | None = None
        self._switch_waiting = False  # a reload's switch waits for a hand-over to finish
        self.metrics: MetricsServer | None = None
        self._metrics_sources: MetricsSources | None = None  # what /metrics reads

    def run(self) -> int:
        config = load_config(self.config_path)
        require_machine()  # privileges, bcc, headers...: one line naming what is missing
        configure_logging(config.daemon.log_level)
        plugins = Plugins.load()
        the_plan = plan(config, plugins, self.config_path)
        try:
            # Listening first: a taken port is refused before anything starts.
            if config.metrics is not None:
                counts = SlowStatementCounts(config.metrics.max_databases, config.metrics.max_users)
                self._metrics_sources = MetricsSources(config, counts)
                self.metrics = MetricsServer(config.metrics.listen, self._metrics_sources)
            self.dispatcher = start_sinks(the_plan, plugins)
        except BaseException:
            the_plan.close()
            self._close_metrics()
            raise
        try:
            if not self._run(config, plugins, the_plan):
                return 1
        finally:
            self._close_metrics()
        if self._failure is not None:
            log.error("exiting_after_failure", reason=self._failure)
            return 1
        return 0

    def _run(self, config: Config, plugins: Plugins, the_plan: Plan) -> bool:
        """Attach, serve until a signal, stop. False when nothing could attach."""
        self.config = config
        self.dispatcher.start()
        self.probes = ProbeSet(self.dispatcher, config.daemon, self._fail)
        self.health = HealthReporter(self.probes, self.dispatcher)
        if self._metrics_sources is not None:
            self.dispatcher.observers.append(self._metrics_sources.counts.observe)
            self._metrics_sources.health = self.health
            self._metrics_sources.dispatcher = self.dispatcher
        self.plugins = plugins
        self.watcher = TargetWatcher(self._resolve, self.probes, self.health.retire)
        self._install_signal_handlers()
        try:
            if not self._attach(the_plan):
                return False
            log.info(
                "ready",
                threshold_ms=config.daemon.threshold_ms,
                probes=[f"{r.definition.name}@{r.target.binary.path}" for r in self.probes],
                sinks=self.dispatcher.sink_names(),
            )
            sd_notify("READY=1")
            self._loop()
            log.info("stopping", signal=self._stop_signal)
            sd_notify("STOPPING=1")
        finally:
            # Whatever ended the loop, even a bug: detach, drain, deliver, close.
            self._shutdown()
        return True

    def _close_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    def _attach(self, the_plan: Plan) -> bool:
        """Every planned target's probes, attached through the file that was read."""
        try:
            for planned in the_plan.targets:
                target = planned.target
                self.probes.start(target, planned.definitions)
                self.watcher.watch(
                    target.index, the_plan.config.target[target.index], target.file.identity
                )
        except ProbeLoadError as error:
            log.error("probe_failed", error=str(error))
            return False
        except Exception as error:  # a third-party source may raise anything
            log.exception("probe_failed", error=f"{type(error).__name__}: {error}")
            return False
        finally:
            the_plan.close()
        for index in the_plan.pending:
            target_config = the_plan.config.target[index]
            self.watcher.watch(index, target_config, None)
            log.warning(
                "target_waiting",
                target=target_name(target_config, index),
                binary=target_config.binary,
                action=f"attaching when the file appears (checked every {WATCH_INTERVAL_S:g} s)",
            )
        return True

    def _resolve(self, target: TargetConfig, index: int) -> tuple[Target, list[ProbeDefinition]]:
        """A target resolved as now configured: what "auto" picks follows the live threshold."""
        return resolve_with_probes(target, index, self.plugins, self.config.daemon)

    def _loop(self) -> None:
        stats_interval = self.config.daemon.stats_interval_s
        next_health = time.monotonic() + stats_interval
        while self._stop_signal is None:
            self._wake.wait(min(LOSS_CHECK_INTERVAL_S, stats_interval, WATCH_INTERVAL_S))
            self._wake.clear()
            if self._reload_requested:
                self._reload_requested = False
                self.reload()
            self.watcher.poll()
            self.probes.tick(self.health.retire)
            if self._switch_waiting and not any(r.handing_over for r in self.probes):
                if switched := self._switch_automatic():
                    log.info("probes_switched", probes=switched)
            self.health.report_losses()
            if time.monotonic() >= next_health:
                log.info("health", **self.health.health())
                next_health = time.monotonic() + stats_interval

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

    def reload(self) -> None:
        """SIGHUP: apply what can change live, say what waits for a restart."""
        sd_notify("RELOADING=1")
        try:
            new = load_config(self.config_path)
        except UserError as error:
            log.error("reload_failed", error=str(error), action="keeping the running configuration")
            sd_notify("READY=1")
            return
        configure_logging(new.daemon.log_level)
        self.probes.set_threshold_ns(new.threshold_ns)
        self.dispatcher.reopen()
        if waiting := needs_restart(self.config, new):
            log.warning("reload_needs_restart", changed=waiting)
        # Remember what is really in effect, so the next reload compares honestly.
        self.config = merge_live(self.config, new)
        if self._metrics_sources is not None:
            self._metrics_sources.config = self.config  # the live threshold
        switched = self._switch_automatic()
        log.info("reloaded", threshold_ms=new.daemon.threshold_ms, probes_switched=switched)
        sd_notify("READY=1")

    def _switch_automatic(self) -> list[str]:
        """Where "auto" now picks other definitions (the threshold crossed a floor, such
        as sampled's), switch them live: ProbeSet.switch loses nothing in between."""
        switched = []
        self._switch_waiting = False
        running = {r.target.index: r.target for r in self.probes if not r.handing_over}
        handing_over = {r.target.index for r in self.probes if r.handing_over}
        for index, target_config in enumerate(self.config.target):
            if AUTO not in target_config.probes or index not in running:
                continue
            if index in handing_over:
                # A switch is still under way there: decided again once it is done.
                self._switch_waiting = True
                continue
            name = target_name(target_config, index)
            active = {
                r.definition for r in self.probes if r.target.index == index and not r.handing_over
            }
            try:
                # Decided on the binary already read: a reload (logrotate sends one a
                # day) re-reads the file only when the choice changes.
                wanted = select_probes(
                    target_config.probes,
                    self.plugins.probe_definitions,
                    running[index].binary,
                    running[index].label,
                    self.config.daemon,
                )
                if set(wanted) == active:
                    continue
                target, definitions = self._resolve(target_config, index)
            except UserError as error:
                log.error("probe_switch_failed", target=name, error=str(error))
                continue
            with target.file:
                if target.file.identity != running[index].file.identity:
                    continue  # the binary was replaced: the watcher attaches to the new one
                try:
                    started = self.probes.switch(target, definitions, self.health.retire)
                except Exception as error:  # ProbeLoadError, or a third-party source's
                    log.error("probe_switch_failed", target=name, error=str(error))
                    continue
            switched += [f"{definition}@{name}" for definition in started]
        return switched

    def _shutdown(self) -> None:
        final = self.probes.stop_all(self.health.retire)
        stopped = self.health.stopped(final)
        sink_stats = self.dispatcher.close()
        log.info(
            "stopped",
            **stopped,
            sinks={name: asdict(stats) for name, stats in sink_stats.items()},
        )

"""`pgslowlog run`: the supervisor. Starts the pipeline, keeps it going, stops it.

source (probe in the kernel, or a sampler) -> collector (decoder, enrichment) ->
dispatcher -> sinks. The parts live in their own modules: planner (what to attach
where), probe_set (each source with its collector; "auto" followed live),
target_watch (re-attach after an upgrade), health (losses and the health line),
metrics (/metrics). This module starts them in order and keeps the main loop, the
signals and the reload: SIGHUP re-reads the config (the threshold changes through
the sources, sinks reopen their files, nothing is detached); SIGTERM/SIGINT detach,
drain the sources and the sink queues, exit 0.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import asdict
from types import FrameType
from typing import TYPE_CHECKING

from pgslowlog.config import Config, TargetConfig, load_config
from pgslowlog.containers import ContainerServer
from pgslowlog.dispatcher import Dispatcher, start_sinks
from pgslowlog.errors import UserError
from pgslowlog.explain.start import explainer_for
from pgslowlog.health import HealthReporter
from pgslowlog.live_config import merge_live, needs_restart
from pgslowlog.log import configure_logging, get_logger
from pgslowlog.machine import require_machine
from pgslowlog.metrics import Metrics
from pgslowlog.planner import Plan, Planner
from pgslowlog.plugin_manager import Plugins
from pgslowlog.probe_set import ProbeSet
from pgslowlog.probes import ProbeDefinition
from pgslowlog.sources import ProbeLoadError
from pgslowlog.systemd import sd_notify
from pgslowlog.target_watch import TargetWatcher
from pgslowlog.targets import Target

if TYPE_CHECKING:
    from pgslowlog.explain.explainer import Explainer

log = get_logger(__name__)
LOSS_CHECK_INTERVAL_S = 10.0  # loss counters are checked at least this often


def run(config_path: str) -> int:
    """The daemon's whole life: check, plan, listen, start, serve, stop. Its exit status."""
    config = load_config(config_path)
    require_machine()  # privileges, bcc, headers...: one line naming what is missing
    start_explainer = explainer_for(config)  # psycopg, if [explain] wants it
    configure_logging(config.daemon.log_level)
    planner = Planner(Plugins.load())
    the_plan = planner.plan(config, config_path)
    metrics = None
    try:
        # Listening first: a taken port is refused before anything starts.
        metrics = Metrics(config) if config.metrics is not None else None
        dispatcher = start_sinks(
            the_plan.sink_options, planner.plugins.sink_types, config.daemon.sink_queue_size
        )
    except BaseException:
        the_plan.close()
        if metrics is not None:
            metrics.close()
        raise
    explainer = start_explainer(dispatcher) if start_explainer is not None else None
    try:
        return Daemon(config_path, config, planner, dispatcher, metrics, explainer).run(the_plan)
    finally:
        if metrics is not None:
            metrics.close()


class Daemon:
    """A planned pipeline, given its dispatcher and metrics; its probe set, health and
    watcher made here; started by run(plan): the main loop, signals, reload."""

    def __init__(
        self,
        config_path: str,
        config: Config,
        planner: Planner,
        dispatcher: Dispatcher,
        metrics: Metrics | None = None,
        explainer: Explainer | None = None,
    ) -> None:
        self.config_path = config_path
        self.config = config  # what is in effect: a reload changes only the live keys
        self.planner = planner
        self.dispatcher = dispatcher
        self.explainer = explainer  # with [explain], events pass it on their way to the sinks
        self.probes = ProbeSet(explainer or dispatcher, config.daemon, self._fail)
        self.health = HealthReporter(self.probes, dispatcher, getattr(explainer, "stats", None))
        self.probes.add_listener(self.health)
        self.watcher = TargetWatcher(self._resolve, self.probes)
        if metrics is not None:
            metrics.connect(self.probes, self.health, dispatcher)
        self._wake = threading.Event()
        self._reload_requested = False
        self._stop_signal: str | None = None
        self._failure: str | None = None

    def run(self, the_plan: Plan) -> int:
        """Attach what the plan says, serve until a signal, stop; the exit status."""
        self.dispatcher.start()
        self._install_signal_handlers()
        try:
            if not self._attach(the_plan):
                return 1
            self.watcher.watch_containers(
                self.config.target, self._resolve, self._wake.set, self.health.fold_container
            )
            log.info(
                "ready",
                threshold_ms=self.config.daemon.threshold_ms,
                probes=[running.name for running in self.probes],
                sinks=self.dispatcher.sink_names(),
            )
            sd_notify("READY=1")
            self._loop()
            log.info("stopping", signal=self._stop_signal)
            sd_notify("STOPPING=1")
        finally:
            # Whatever ended the loop, even a bug: detach, drain, deliver, close.
            self._shutdown()
        if self._failure is not None:
            log.error("exiting_after_failure", reason=self._failure)
            return 1
        return 0

    def _attach(self, the_plan: Plan) -> bool:
        """Every planned target's probes, attached through the file that was read.
        False when one could not attach."""
        try:
            for planned in the_plan.targets:
                target = planned.target
                self.probes.start(target, planned.definitions)
                self.watcher.watch(
                    target.index, the_plan.config.target[target.index], target.file.identity
                )
            self.probes.settle()  # looking already; "ready" once the rest has attached too
        except ProbeLoadError as error:
            log.error("probe_failed", error=str(error))
            return False
        except Exception as error:  # a third-party source may raise anything
            log.exception("probe_failed", error=f"{type(error).__name__}: {error}")
            return False
        finally:
            the_plan.close()
        for index in the_plan.pending:  # the watcher says they wait, and attaches later
            self.watcher.watch(index, the_plan.config.target[index], None)
        return True

    def _resolve(
        self, target: TargetConfig, index: int, server: ContainerServer | None = None
    ) -> tuple[Target, list[ProbeDefinition]]:
        """A target (a container's `server`, for containers = true) resolved as now
        configured: what "auto" picks follows the live threshold."""
        return self.planner.resolve(target, index, self.config.daemon, server)

    def _loop(self) -> None:
        stats_interval = self.config.daemon.stats_interval_s
        next_health = time.monotonic() + stats_interval
        while self._stop_signal is None:
            self._wake.wait(min(LOSS_CHECK_INTERVAL_S, stats_interval, self.watcher.due_in()))
            self._wake.clear()
            if self._reload_requested:
                self._reload_requested = False
                self.reload()
            self.watcher.poll()
            self.probes.tick()
            if self.probes.auto_pending and not self.probes.handing_over:
                if switched := self.probes.follow_auto(self.config, self.planner):
                    log.info("probes_switched", probes=switched)
            self.health.report_losses()
            if time.monotonic() >= next_health:
                log.info("health", **self.health.health(), **self.watcher.health())
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
        switched = self.probes.follow_auto(self.config, self.planner)
        log.info("reloaded", threshold_ms=new.daemon.threshold_ms, probes_switched=switched)
        sd_notify("READY=1")

    def _shutdown(self) -> None:
        self.watcher.close()
        stopped = self.health.stopped(self.probes.stop_all())
        if self.explainer is not None:  # events waiting for their plan go on first
            stopped["explain"] = self.explainer.close()
        sinks = {name: asdict(stats) for name, stats in self.dispatcher.close().items()}
        log.info("stopped", **stopped, sinks=sinks)

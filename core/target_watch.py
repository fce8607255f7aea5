"""Binary targets are watched: an upgrade replaces the file, an install creates it later.

A uprobe sits on an inode. A package upgrade writes the new postgres to a new inode
and renames it over the old path: backends still running the old binary stay
probed, but a server restarted after the upgrade runs the new inode and would go
unseen. So the daemon looks at each binary target's path every few seconds and,
when the file there is a different one, attaches to it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from pgslowlog.config import TargetConfig
from pgslowlog.container_finder import RESCAN_EVERY_S, servers_now
from pgslowlog.container_watch import ContainerWatcher, ResolveServer
from pgslowlog.elf import FileIdentity, file_identity
from pgslowlog.errors import UserError
from pgslowlog.log import get_logger
from pgslowlog.probe_set import ProbeSet
from pgslowlog.probes import ProbeDefinition
from pgslowlog.sources import start_failure
from pgslowlog.targets import Target, target_name

log = get_logger(__name__)
WATCH_INTERVAL_S = 2.0

Resolve = Callable[[TargetConfig, int], tuple[Target, list[ProbeDefinition]]]


@dataclass
class WatchedTarget:
    """One [[target]] with `binary =`, and which file its probes are on."""

    index: int
    config: TargetConfig
    attached: FileIdentity | None = None  # the file the probes are attached to
    refused: FileIdentity | None = None  # a file that could not be used: wait for the next
    missing_logged: bool = False

    @property
    def path(self) -> str:
        assert self.config.binary is not None
        return self.config.binary

    @property
    def name(self) -> str:
        return target_name(self.config, self.index)

    def change(self) -> FileIdentity | None:
        """The new file to attach to, if the path now holds one we have not tried."""
        current = file_identity(self.path)
        if current is None or current in (self.attached, self.refused):
            return None
        return current


class TargetWatcher:
    """Attaches to a binary that appeared, or that replaced the one the probes are on;
    and with containers = true targets, to the servers that run in containers."""

    def __init__(self, resolve: Resolve, probes: ProbeSet) -> None:
        self._resolve = resolve
        self._probes = probes
        self.watched: list[WatchedTarget] = []
        self.containers: ContainerWatcher | None = None
        self._untraced: set[tuple[str, int]] = set()  # servers in containers, not traced
        self._next_untraced_check = float("inf")  # from watch_containers on

    def watch_containers(
        self,
        targets: list[TargetConfig],
        resolve: ResolveServer,
        wake: Callable[[], None],
        gone: Callable[[str, str], None],
    ) -> None:
        """Find the containerised servers of every containers = true target, now and
        as they come and go (`wake` the main loop when an exec is noticed; `gone`
        (target, container) once a server went and its instance stopped)."""
        wanted = [(index, config) for index, config in enumerate(targets) if config.containers]
        if wanted:
            self.containers = ContainerWatcher(wanted, resolve, self._probes, wake, gone)
            self.containers.poll()
        else:
            self._say_untraced()

    def _say_untraced(self) -> None:
        """Without a containers = true target, servers in containers are not traced:
        named at start and, every RESCAN_EVERY_S, each one new (one /proc scan)."""
        self._next_untraced_check = time.monotonic() + RESCAN_EVERY_S
        servers = {(s.name, s.host_pid) for s in servers_now()}
        if new := sorted(servers - self._untraced):
            log.warning(
                "containers_not_traced",
                servers=[f"{name} (postmaster {pid})" for name, pid in new],
                action="add a [[target]] with containers = true to trace them",
            )
        self._untraced = servers

    def health(self) -> dict[str, object]:
        """For the health line: each containers = true target's instances, and what
        finding them cost."""
        if self.containers is None:
            return {}
        finder = self.containers.finder.figures
        return {
            "containers": self.containers.instances(),
            "container_finding": {**finder, "cpu_ms": round(finder["cpu_ms"], 1)},
        }

    def due_in(self) -> float:
        """Seconds until the next poll is needed."""
        containers = self.containers.due_in() if self.containers is not None else WATCH_INTERVAL_S
        return min(WATCH_INTERVAL_S, containers)

    def close(self) -> None:
        if self.containers is not None:
            self.containers.close()

    def watch(self, index: int, config: TargetConfig, attached: FileIdentity | None) -> None:
        """Watch a binary target; `attached` is the identity of the file read and attached
        to (Target.file.identity), None while the file is not there yet."""
        if config.binary is not None and not config.containers:
            self.watched.append(WatchedTarget(index, config, attached))
            if attached is None:
                log.warning(
                    "target_waiting",
                    target=target_name(config, index),
                    binary=config.binary,
                    action="attaching when the file appears "
                    f"(checked every {WATCH_INTERVAL_S:g} s)",
                )

    def poll(self) -> None:
        if self.containers is not None:
            self.containers.poll()
        elif time.monotonic() >= self._next_untraced_check:
            self._say_untraced()
        for watched in self.watched:
            new_file = watched.change()
            if new_file is None:
                self._say_if_missing(watched)
                continue
            watched.missing_logged = False
            self._attach_new_file(watched, new_file)

    def _say_if_missing(self, watched: WatchedTarget) -> None:
        gone = watched.attached is not None and file_identity(watched.path) is None
        if gone and not watched.missing_logged:
            watched.missing_logged = True
            log.error(
                "target_binary_missing",
                target=watched.name,
                binary=watched.path,
                action="probes stay on the old file for processes still running it; "
                "other targets are served; attaching again when a binary appears",
            )

    def _attach_new_file(self, watched: WatchedTarget, new_file: FileIdentity) -> None:
        try:
            target, definitions = self._resolve(watched.config, watched.index)
        except UserError as error:
            watched.refused = new_file
            log.error("target_unusable", target=watched.name, binary=watched.path, error=str(error))
            return
        # The file read may already be newer than the one stat saw: remember the one read.
        read = target.file.identity
        replaced = watched.attached is not None
        with target.file:
            self._probes.stop_target(watched.index)
            try:
                self._probes.start(target, definitions)
            except Exception as error:  # ProbeLoadError, or anything a third-party source raises
                watched.refused = read
                watched.attached = None
                log.error("target_attach_failed", target=watched.name, error=start_failure(error))
                return
        watched.attached = read
        log.warning(
            "target_reattached" if replaced else "target_attached",
            target=watched.name,
            binary=watched.path,
            postgres_version=target.binary.version,
            reason="the binary was replaced" if replaced else "the binary appeared",
        )

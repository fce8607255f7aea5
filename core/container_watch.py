"""A `containers = true` target: one instance per containerised server, kept current.

The ServerFinder (container_finder.py) says which postmasters run in other pid
namespaces. Each one a target takes becomes an instance of that target: its binary
read through the container's root, its definitions started on the container's pid
namespace (probe_set, keyed by target and container), its events and metrics saying
which container. A server that goes (its container stopped or restarted) is stopped
with its instance; a restarted container's new postmaster gets a new instance under
the same container name. A server a target cannot trace (a major it does not know, a
musl or foreign build, a probe the kernel refuses) is said once, with why.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pgslowlog.config import TargetConfig
from pgslowlog.container_finder import ServerFinder
from pgslowlog.containers import ContainerServer
from pgslowlog.errors import UserError
from pgslowlog.log import get_logger
from pgslowlog.probe_set import ProbeSet
from pgslowlog.probes import ProbeDefinition
from pgslowlog.sources import start_failure
from pgslowlog.targets import Target, target_name

log = get_logger(__name__)

ResolveServer = Callable[[TargetConfig, int, ContainerServer], tuple[Target, list[ProbeDefinition]]]


def takes(config: TargetConfig, server: ContainerServer) -> bool:
    """Whether a containers = true target takes the server: any, or the `binary` named."""
    return config.binary is None or server.exe == config.binary


def assign(
    servers: Iterable[ContainerServer], targets: list[tuple[int, TargetConfig]]
) -> dict[int, list[ContainerServer]]:
    """Target index -> the servers it traces: each goes to the first target, in the
    file's order, that takes it. What run does, and check and probes say."""
    assigned: dict[int, list[ContainerServer]] = {index: [] for index, _ in targets}
    for server in sorted(servers, key=lambda server: server.host_pid):
        for index, config in targets:
            if takes(config, server):
                assigned[index].append(server)
                break
    return assigned


@dataclass
class _Instances:
    index: int
    config: TargetConfig
    running: dict[str, int] = field(default_factory=dict)  # container -> its postmaster
    said: set[tuple[str, int]] = field(default_factory=set)  # refused, or a second server

    @property
    def name(self) -> str:
        return target_name(self.config, self.index)


class ContainerWatcher:
    """The instances of every containers = true target, polled from the main loop."""

    def __init__(
        self,
        targets: list[tuple[int, TargetConfig]],
        resolve: ResolveServer,
        probes: ProbeSet,
        wake: Callable[[], None],
        gone: Callable[[str, str], None],
    ) -> None:
        self._targets = [_Instances(index, config) for index, config in targets]
        self._resolve = resolve
        self._probes = probes
        self._gone = gone  # (target, container): its counts join the target's gone ones
        self.finder = ServerFinder(wake)
        self.seen: set[str] = set()  # containers traced at some time: a return is a restart
        self._untaken: set[tuple[str, int]] = set()  # servers no target takes, said once

    def due_in(self) -> float:
        return self.finder.due_in()

    def poll(self) -> None:
        servers = self.finder.poll()
        present = {(server.name, pid) for pid, server in servers.items()}
        assigned = assign(servers.values(), [(i.index, i.config) for i in self._targets])
        for instances in self._targets:
            instances.said &= present  # what was said of servers gone is forgotten
            for container, postmaster in list(instances.running.items()):
                if postmaster not in servers:
                    self._stop(instances, container)
            for server in assigned[instances.index]:
                self._start(instances, server)
        taken = {server.host_pid for mine in assigned.values() for server in mine}
        untaken = {(s.name, pid) for pid, s in servers.items() if pid not in taken}
        for name, pid in sorted(untaken - self._untaken):
            log.warning(
                "container_server_not_taken",
                container=name,
                postmaster=pid,
                binary=servers[pid].exe,
                action="no containers = true target takes its binary: add one, or "
                "drop the binary key of one",
            )
        self._untaken = untaken

    def _start(self, instances: _Instances, server: ContainerServer) -> None:
        running = instances.running.get(server.name)
        if running == server.host_pid or (server.name, server.host_pid) in instances.said:
            return
        if running is not None:
            instances.said.add((server.name, server.host_pid))
            log.warning(
                "container_second_server",
                target=instances.name,
                container=server.name,
                postmaster=server.host_pid,
                traced=running,
                action="one instance per container: it traces the container's servers "
                "that run the first one's binary; this one, once the first is gone",
            )
            return
        try:
            target, definitions = self._resolve(instances.config, instances.index, server)
        except UserError as error:
            self._refuse(instances, server, str(error))
            return
        except Exception as error:  # a container's binary is its tenant's: any parse error
            self._refuse(instances, server, f"{type(error).__name__}: {error}")
            return
        with target.file:
            try:
                self._probes.start(target, definitions)
            except Exception as error:  # ProbeLoadError, or anything a third party raises
                self._refuse(instances, server, start_failure(error))
                return
        instances.running[server.name] = server.host_pid
        restarted = server.name in self.seen
        self.seen.add(server.name)
        log.info(
            "container_server_restarted" if restarted else "container_server_found",
            target=instances.name,
            container=server.name,
            pod_uid=server.container.pod_uid,
            container_hostname=server.hostname,
            postmaster=server.host_pid,
            binary=server.exe,
            postgres_version=target.binary.version,
            probes=[d.name for d in definitions],
        )

    def _refuse(self, instances: _Instances, server: ContainerServer, why: str) -> None:
        instances.said.add((server.name, server.host_pid))  # said once per server
        log.error(
            "container_server_refused",
            target=instances.name,
            container=server.name,
            postmaster=server.host_pid,
            error=why,
        )

    def _stop(self, instances: _Instances, container: str) -> None:
        """Its server is gone: the instance goes too."""
        del instances.running[container]
        # A second server of the container, said and passed over while this one ran,
        # is taken up at the next poll.
        instances.said = {(name, pid) for name, pid in instances.said if name != container}
        self._probes.stop_target(instances.index, container)
        self._gone(instances.name, container)
        log.info(
            "container_server_gone",
            target=instances.name,
            container=container,
            reason="its server is gone",
        )

    def instances(self) -> dict[str, list[str]]:
        """Per target, the containers traced now: for the health line."""
        return {i.name: sorted(i.running) for i in self._targets}

    def close(self) -> None:
        self.finder.close()

"""What the config asks for, resolved against the installed plugins and binaries.

Shared by `run` and `check`: each [[target]]'s binary is opened and read once, the
probe definitions that fit it are chosen, and every sink's options are parsed and
checked, so both commands refuse the same mistakes with the same words.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pgslowlog.config import Config, DaemonConfig, TargetConfig
from pgslowlog.containers import ContainerServer, in_initial_pid_namespace
from pgslowlog.elf import PostgresBinary, file_identity
from pgslowlog.errors import UserError
from pgslowlog.plugin_manager import Plugins
from pgslowlog.probes import ProbeDefinition, select_probes, wanted_symbols
from pgslowlog.sinks import CommonSinkOptions
from pgslowlog.targets import Target, resolve_target


@dataclass
class PlannedTarget:
    target: Target  # its binary open: attach through it, then close it
    definitions: list[ProbeDefinition]


@dataclass
class Plan:
    config: Config
    targets: list[PlannedTarget]
    # binary targets whose file is not there yet (PostgreSQL installed after the daemon)
    pending: list[int] = field(default_factory=list)
    sink_options: dict[str, tuple[CommonSinkOptions, object]] = field(default_factory=dict)

    def close(self) -> None:
        """Close the targets' binaries (after attaching, or when nothing will attach)."""
        for planned in self.targets:
            planned.target.file.close()


def require_host_pid_namespace(index: int) -> None:
    """containers = true sees other pid namespaces from above: the kernel's pids, which
    are the daemon's only in the host's pid namespace."""
    if not in_initial_pid_namespace():
        raise UserError(
            f"target[{index}] has containers = true but the daemon runs in a pid namespace "
            "of its own, where it cannot see the host's containers",
            "run it in the host's pid namespace (--pid=host for docker run, hostPID: true "
            "in Kubernetes), or name its own server with binary = or pid =",
        )


class Planner:
    """Decides with the installed plugins: which definitions attach where."""

    def __init__(self, plugins: Plugins) -> None:
        self.plugins = plugins

    def choose(
        self,
        target_config: TargetConfig,
        binary: PostgresBinary,
        label: str,
        daemon: DaemonConfig | None = None,
    ) -> list[ProbeDefinition]:
        """The definitions a target's `probes` list names for `binary`, already read
        (what "auto" picks depends on `daemon`'s threshold)."""
        return select_probes(
            target_config.probes, self.plugins.probe_definitions, binary, label, daemon
        )

    def resolve(
        self,
        target_config: TargetConfig,
        index: int,
        daemon: DaemonConfig | None = None,
        server: ContainerServer | None = None,
    ) -> tuple[Target, list[ProbeDefinition]]:
        """One [[target]] (one container's `server`, for containers = true): its binary
        opened and read, and the definitions that attach to it. The caller closes
        `target.file`."""
        target = resolve_target(
            target_config, index, wanted_symbols(self.plugins.probe_definitions.values()), server
        )
        try:
            definitions = self.choose(target_config, target.binary, target.label, daemon)
        except BaseException:
            target.file.close()
            raise
        return target, definitions

    def plan(self, config: Config, config_path: str) -> Plan:
        """The plan, or a UserError naming the first thing that cannot be done."""
        the_plan = Plan(config=config, targets=[])
        try:
            for index, target_config in enumerate(config.target):
                if target_config.containers:
                    require_host_pid_namespace(index)
                    continue  # its servers are found while running (container_watch)
                if target_config.binary is not None and file_identity(target_config.binary) is None:
                    the_plan.pending.append(index)
                    continue
                target, definitions = self.resolve(target_config, index, config.daemon)
                the_plan.targets.append(PlannedTarget(target, definitions))
            the_plan.sink_options = self.parse_sinks(config, config_path)
        except BaseException:
            the_plan.close()
            raise
        return the_plan

    def parse_sinks(
        self, config: Config, config_path: str
    ) -> dict[str, tuple[CommonSinkOptions, object]]:
        """Each [sinks.NAME] table validated by its plugin's schema and check."""
        sink_types = self.plugins.sink_types
        sink_options: dict[str, tuple[CommonSinkOptions, object]] = {}
        for name, raw in config.sinks.items():
            sink_type = sink_types.get(name)
            if sink_type is None:
                installed = ", ".join(sorted(sink_types)) or "none"
                raise UserError(
                    f"config {config_path}: no sink plugin named {name!r} (installed: {installed})",
                    "correct the [sinks.NAME] table or install the plugin",
                )
            sink_options[name] = sink_type.parse_options(raw, config_path)
            if sink_type.check is not None:
                try:
                    sink_type.check(sink_options[name][1])
                except ValueError as error:
                    raise UserError(
                        f"config {config_path}: sinks.{name}.{error}",
                        "fix that option, or the file or variable it names",
                    ) from None
        return sink_options

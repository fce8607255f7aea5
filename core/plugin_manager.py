"""Loads plugins one by one and collects what they register.

The rest of pgslowlog never calls ``pm.hook.*``: it asks this class. Entry points
are loaded individually and each hook implementation is called on its own, so a
broken third-party plugin is reported by name and the others still load (pluggy's
own loader aborts on the first import error, and a hook call stops at the first
implementation that raises).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Any

import pluggy

from pgslowlog import hookspecs
from pgslowlog.compat import entry_points
from pgslowlog.log import get_logger
from pgslowlog.probes import ProbeDefinition
from pgslowlog.sinks import SinkType

ENTRY_POINT_GROUP = "pgslowlog"
log = get_logger(__name__)


class Plugins:
    def __init__(self) -> None:
        self.manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.manager.add_hookspecs(hookspecs)
        self.sink_types: dict[str, SinkType] = {}
        self.probe_definitions: dict[str, ProbeDefinition] = {}
        self.failures: list[str] = []

    @classmethod
    def load(cls) -> Plugins:
        plugins = cls()
        for entry_point in entry_points(ENTRY_POINT_GROUP):
            plugins._load_entry_point(entry_point)
        plugins._collect()
        return plugins

    def register(self, plugin: object, name: str) -> None:
        """Register one plugin object (used for entry points, and by tests)."""
        try:
            self.manager.register(plugin, name=name)
            self.manager.check_pending()
        except Exception as error:
            self._fail(f"plugin {name} was rejected: {error}")
            if self.manager.is_registered(plugin):
                self.manager.unregister(plugin)

    def _load_entry_point(self, entry_point: importlib.metadata.EntryPoint) -> None:
        try:
            plugin = entry_point.load()
        except Exception as error:
            self._fail(f"plugin {entry_point.name} ({entry_point.value}) failed to import: {error}")
            return
        self.register(plugin, entry_point.name)

    def _collect(self) -> None:
        self._call_each("pgslowlog_register_sinks", self.sink_types)
        self._call_each("pgslowlog_register_probes", self.probe_definitions)

    def _call_each(self, hook_name: str, into: dict[str, Any]) -> None:
        hook = getattr(self.manager.hook, hook_name)
        for implementation in hook.get_hookimpls():
            plugin_name = implementation.plugin_name

            def register(item: Any, plugin_name: str = plugin_name) -> None:
                if item.name in into:
                    self._fail(
                        f"plugin {plugin_name} registers {item.name!r}, which already exists"
                    )
                    return
                into[item.name] = item

            try:
                implementation.function(register=register)
            except Exception as error:
                self._fail(f"plugin {plugin_name} failed in {hook_name}: {error}")

    def _fail(self, message: str) -> None:
        self.failures.append(message)
        log.error("plugin_failed", message=message)


RegisterSink = Callable[[SinkType], None]
RegisterProbe = Callable[[ProbeDefinition], None]

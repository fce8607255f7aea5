"""The plugin hooks of pgslowlog.

Plugins are modules (or objects) listed in the ``pgslowlog`` entry-point group and
decorated with :data:`hookimpl`. The shipped file sink and probe definitions use
exactly these hooks. Hooks only *register* things; pgslowlog owns what was
registered and delivers events itself (see dispatcher.py), so one failing plugin
cannot stop another.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

from pgslowlog.probes import ProbeDefinition
from pgslowlog.sinks import SinkType

PROJECT = "pgslowlog"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def pgslowlog_register_sinks(register: Callable[[SinkType], None]) -> None:
    """Register sink types.

    :param register: call it once per :class:`pgslowlog.sinks.SinkType`. The type's
        ``name`` is the key users write under ``[sinks]``; its ``options`` struct
        validates that table; its ``create(options)`` returns an open
        :class:`pgslowlog.sinks.Sink`.
    """


@hookspec
def pgslowlog_register_probes(register: Callable[[ProbeDefinition], None]) -> None:
    """Register probe definitions.

    :param register: call it once per :class:`pgslowlog.ProbeDefinition`. Its
        ``name`` is what users write in a target's ``probes`` list; its ``open`` makes
        the :class:`pgslowlog.StatementSource` for one target: a
        :class:`pgslowlog.BpfProgram` (whose C file is compiled after the shared
        ``slow_query.h``, so it can call ``statement_begin`` / ``statement_end``), or a
        factory of the author's own.
    """

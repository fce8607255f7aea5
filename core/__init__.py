"""pgslowlog: a slow-query log for PostgreSQL built on eBPF.

What plugin authors import: ``hookimpl``, ``SinkType``/``Sink``/``BaseSink``, ``ProbeDefinition``/
``Uprobe`` and the ``SlowQuery`` event.
"""

from pgslowlog.event import SlowQuery
from pgslowlog.hookspecs import hookimpl
from pgslowlog.plugin_manager import RegisterProbe, RegisterSink
from pgslowlog.probes import ProbeDefinition, Uprobe
from pgslowlog.sinks import BaseSink, Sink, SinkType

__version__ = "0.1.0"  # the one place it is written: pyproject.toml reads it from here
__all__ = [
    "BaseSink",
    "ProbeDefinition",
    "RegisterProbe",
    "RegisterSink",
    "Sink",
    "SinkType",
    "SlowQuery",
    "Uprobe",
    "__version__",
    "hookimpl",
]

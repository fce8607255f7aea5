"""pgslowlog: a slow-query log for PostgreSQL built on eBPF.

What plugin authors import: ``hookimpl``, ``SinkType``/``Sink``, ``ProbeDefinition``/
``Uprobe`` and the ``SlowQuery`` event.
"""

from pgslowlog.event import SlowQuery
from pgslowlog.hookspecs import hookimpl
from pgslowlog.probes import ProbeDefinition, Uprobe
from pgslowlog.sinks import Sink, SinkType

__version__ = "0.1.0"
__all__ = ["ProbeDefinition", "Sink", "SinkType", "SlowQuery", "Uprobe", "__version__", "hookimpl"]

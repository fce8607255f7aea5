"""pgslowlog: a slow-query log for PostgreSQL built on eBPF and a sampler.

What plugin authors import (docs/plugins.md): the hook marker and the register
callbacks; for sinks, SinkType, Sink, BaseSink and the SlowQuery event; for probe
definitions, ProbeDefinition and its factory protocols, the source protocols a factory's
source implements, the records a source yields, and BpfProgram with its attachments for
a definition that is a BPF program.
"""

from pgslowlog.bpf.attachments import Uprobe, Usdt, WireProtocol
from pgslowlog.bpf.program import BpfProgram
from pgslowlog.config import DaemonConfig
from pgslowlog.elf import PostgresBinary
from pgslowlog.event import SlowQuery
from pgslowlog.hookspecs import hookimpl
from pgslowlog.plugin_manager import RegisterProbe, RegisterSink
from pgslowlog.probes import ChecksBinary, OpenSource, ProbeDefinition
from pgslowlog.records import BackendNotice, BoundParameter, NoticeKind, RawStatement, Record
from pgslowlog.sinks import BaseSink, Sink, SinkType
from pgslowlog.sources import (
    COUNTERS,
    DecodeError,
    ExplainsLosses,
    HandsOver,
    LossCause,
    ProbeLoadError,
    RecordReader,
    StatementSource,
)
from pgslowlog.targets import Target

__version__ = "0.1.0"  # the one place it is written: pyproject.toml reads it from here
__all__ = [
    "COUNTERS",
    "BackendNotice",
    "BaseSink",
    "BoundParameter",
    "BpfProgram",
    "ChecksBinary",
    "DaemonConfig",
    "DecodeError",
    "ExplainsLosses",
    "HandsOver",
    "LossCause",
    "NoticeKind",
    "OpenSource",
    "PostgresBinary",
    "ProbeDefinition",
    "ProbeLoadError",
    "RawStatement",
    "Record",
    "RecordReader",
    "RegisterProbe",
    "RegisterSink",
    "Sink",
    "SinkType",
    "SlowQuery",
    "StatementSource",
    "Target",
    "Uprobe",
    "Usdt",
    "WireProtocol",
    "__version__",
    "hookimpl",
]

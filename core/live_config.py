"""What a SIGHUP can change in a running daemon, and what needs a restart.

The threshold lives in a map and the log level in the logger: both change at
once. Everything else shapes maps, programs, attachments, sinks or the metrics
server, so a reload reports it as waiting for a restart and keeps the running
value, and the next reload compares against what really is in effect.
"""

from __future__ import annotations

import msgspec

from pgslowlog.config import Config

# [daemon] keys applied on SIGHUP.
LIVE = ("threshold_ms", "log_level")


def needs_restart(running: Config, new: Config) -> list[str]:
    """The keys (as written in the file) that differ and cannot change live."""
    changed = [
        f"daemon.{key}"
        for key in running.daemon.__struct_fields__
        if key not in LIVE and getattr(running.daemon, key) != getattr(new.daemon, key)
    ]
    if new.target != running.target:
        changed.append("target")
    if new.sinks != running.sinks:
        changed.append("sinks")
    if new.metrics != running.metrics:
        changed.append("metrics")
    if new.explain != running.explain:
        changed.append("explain")
    return changed


def merge_live(running: Config, new: Config) -> Config:
    """The config in effect after a reload: live keys from `new`, the rest as running."""
    daemon = msgspec.structs.replace(
        running.daemon, **{key: getattr(new.daemon, key) for key in LIVE}
    )
    return msgspec.structs.replace(running, daemon=daemon)

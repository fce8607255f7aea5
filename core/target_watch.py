"""Binary targets are watched: an upgrade replaces the file, an install creates it later.

A uprobe sits on an inode. A package upgrade writes the new postgres to a new inode
and renames it over the old path: backends still running the old binary stay
probed, but a server restarted after the upgrade runs the new inode and would go
unseen. So the daemon looks at each binary target's path every few seconds and,
when the file there is a different one, attaches to it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pgslowlog.config import TargetConfig
from pgslowlog.elf import FileIdentity, file_identity

WATCH_INTERVAL_S = 2.0


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

    def change(self) -> FileIdentity | None:
        """The new file to attach to, if the path now holds one we have not tried."""
        current = file_identity(self.path)
        if current is None or current in (self.attached, self.refused):
            return None
        return current

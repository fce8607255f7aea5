"""What differs between the Pythons pgslowlog runs on: each Debian release's own python3.

Debian 11 has 3.9, Debian 12 3.11, Debian 13 3.13; the daemon runs on the system
interpreter because bcc (python3-bpfcc) is only installed there.
"""

from __future__ import annotations

import importlib.metadata
import sys
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # tomli is the parser tomllib was made from: same API, same errors
    import tomli as tomllib

# dataclass(slots=True) came in 3.10. On 3.9 these classes keep a __dict__: a little
# more memory per object and slower attribute access, nothing else changes.
SLOTS: dict[str, Any] = {"slots": True} if sys.version_info >= (3, 10) else {}


def entry_points(group: str) -> list[importlib.metadata.EntryPoint]:
    """The entry points of one group, each once."""
    if sys.version_info >= (3, 10):
        return list(importlib.metadata.entry_points(group=group))
    # 3.9 takes no group= and returns every group; a distribution found twice on
    # sys.path (a venv with --system-site-packages) gives its entry points twice.
    first: dict[tuple[str, str], importlib.metadata.EntryPoint] = {}
    for point in importlib.metadata.entry_points().get(group, ()):
        first.setdefault((point.name, point.value), point)
    return list(first.values())


__all__ = ["SLOTS", "entry_points", "tomllib"]

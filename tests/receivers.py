"""Real receivers started by the tests: rsyslogd on loopback ports and a Unix socket."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgslowlog.cluster import free_port

RAW_FORMAT = "%app-name%|%procid%|%msgid%|%syslogfacility-text%|%syslogseverity-text%|%msg%\\n"


@dataclass
class Rsyslog:
    process: subprocess.Popen[bytes]
    udp_port: int
    tcp_port: int
    socket_path: Path
    output: Path

    def messages(self) -> list[dict[str, Any]]:
        """Each line as header fields plus the JSON event that was the message."""
        if not self.output.exists():
            return []
        messages = []
        for line in self.output.read_text().splitlines():
            app, procid, msgid, facility, severity, message = line.split("|", 5)
            messages.append(
                {
                    "app": app,
                    "procid": procid,
                    "msgid": msgid,
                    "facility": facility,
                    "severity": severity,
                    "event": json.loads(message),
                }
            )
        return messages

    def wait_for(self, marker: str, count: int, timeout: float = 10) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            found = [m for m in self.messages() if marker in m["event"]["query"]]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def start_rsyslog(directory: Path) -> Rsyslog:
    udp_port, tcp_port = free_port(), free_port()
    socket_path, output = directory / "log.sock", directory / "messages"
    config = directory / "rsyslog.conf"
    config.write_text(
        f"""
global(workDirectory="{directory}" maxMessageSize="64k")
module(load="imudp")
input(type="imudp" address="127.0.0.1" port="{udp_port}")
module(load="imtcp")
input(type="imtcp" address="127.0.0.1" port="{tcp_port}")
module(load="imuxsock" SysSock.Use="off")
input(type="imuxsock" Socket="{socket_path}" UseSpecialParser="off" ParseHostname="on")
template(name="raw" type="string" string="{RAW_FORMAT}")
*.* action(type="omfile" file="{output}" template="raw")
"""
    )
    process = subprocess.Popen(
        ["rsyslogd", "-n", "-f", str(config), "-i", str(directory / "rsyslogd.pid")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 15
    while not (socket_path.exists() and _listening(tcp_port)):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"rsyslogd did not start (exit {process.poll()})")
        time.sleep(0.05)
    return Rsyslog(process, udp_port, tcp_port, socket_path, output)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0

"""Real receivers started by the tests: rsyslogd on loopback ports and a Unix socket."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from waiting import wait_for_count, wait_until

from pgslowlog.testing.cluster import free_port

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
        # rsyslogd writes through a buffer that can end mid-line: only whole lines count.
        for line in self.output.read_text().split("\n")[:-1]:
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
        """At least `count` messages whose query holds `marker`; AssertionError if not in time."""
        return wait_for_count(
            lambda: [m for m in self.messages() if marker in m["event"]["query"]],
            count,
            f"rsyslog messages with {marker!r}",
            timeout,
        )

    def wait_for_sender(self, pid: int, count: int, timeout: float = 10) -> list[dict[str, Any]]:
        """Every message process `pid` sent, once there are at least `count` (rsyslogd
        may share a module: its procid tells one daemon's messages from another's)."""
        return wait_for_count(
            lambda: [m for m in self.messages() if m["procid"] == str(pid)],
            count,
            f"rsyslog messages from pid {pid}",
            timeout,
        )

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
    try:
        wait_until(
            lambda: process.poll() is not None or (socket_path.exists() and _listening(tcp_port)),
            timeout=15,
            what="rsyslogd listening on its socket and its TCP port",
        )
        if process.poll() is not None:
            raise RuntimeError(f"rsyslogd exited with {process.returncode} before it listened")
    except BaseException:
        process.kill()  # one that never got ready is not left running
        process.wait()
        raise
    return Rsyslog(process, udp_port, tcp_port, socket_path, output)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


class WebhookReceiver:
    """An HTTP server on loopback that records JSON arrays and plays scripted faults.

    `faults` is consumed one per request: "500", "429" (with Retry-After: 1), "hang"
    (answers nothing for `hang_s`), or None for 200. Only answered-200 bodies count.
    """

    def __init__(self, hang_s: float = 3.0, port: int = 0) -> None:
        import http.server
        import threading

        self.faults: list[str | None] = []
        self.events: list[dict[str, Any]] = []
        self.batches: list[int] = []
        self.requests: list[tuple[float, str, dict[str, str]]] = []  # (time, answer, headers)
        self.hang_s = hang_s
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                fault = receiver.faults.pop(0) if receiver.faults else None
                receiver.requests.append((time.monotonic(), fault or "200", dict(self.headers)))
                if fault == "hang":
                    time.sleep(receiver.hang_s)
                    return
                if fault == "500":
                    self.send_response(500)
                elif fault == "429":
                    self.send_response(429)
                    self.send_header("Retry-After", "1")
                else:
                    batch = json.loads(body)
                    receiver.events.extend(batch)
                    receiver.batches.append(len(batch))
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        # A given port lets a test bring a receiver back where the old one was.
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.port}/slow"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, marker: str, count: int, timeout: float = 20) -> list[dict[str, Any]]:
        """At least `count` events whose query holds `marker` (answered 200); AssertionError
        if not in time."""
        return wait_for_count(
            lambda: [event for event in list(self.events) if marker in event["query"]],
            count,
            f"webhook events with {marker!r}",
            timeout,
        )

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

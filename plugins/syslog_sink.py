"""The syslog sink: RFC 5424 messages, the event as JSON in MSG.

Transports: a local Unix datagram socket (/dev/log by default), UDP (RFC 5426), or
TCP with octet-counting framing (RFC 6587), which keeps a message containing
newlines in one piece. A message over max_message_bytes is made to fit by
shortening the query inside the event (and marking it truncated), so what arrives
is always one whole, valid JSON object.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Annotated, Optional
from urllib.parse import urlsplit

import msgspec

from pgslowlog.event import SlowQuery
from pgslowlog.hookspecs import hookimpl
from pgslowlog.plugin_manager import RegisterSink
from pgslowlog.sinks import BaseSink, SinkType

FACILITIES = {
    name: code
    for code, name in enumerate(
        "kern user mail daemon auth syslog lpr news uucp cron authpriv ftp ntp audit alert "
        "clock local0 local1 local2 local3 local4 local5 local6 local7".split()
    )
}
SEVERITIES = {
    name: code for code, name in enumerate("emerg alert crit err warning notice info debug".split())
}
SCHEMES = ("unix", "udp", "tcp")
# RFC 5426: receivers must accept 480 bytes; UDP cannot carry more than 65507.
MIN_MESSAGE_BYTES, MAX_MESSAGE_BYTES = 480, 65000
MSGID = "slowquery"


class SyslogOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    address: str = "unix:///dev/log"
    facility: str = "local0"
    severity: str = "notice"
    app_name: str = "pgslowlog"
    hostname: Optional[str] = None  # default: this machine's name
    max_message_bytes: Annotated[int, msgspec.Meta(ge=MIN_MESSAGE_BYTES, le=MAX_MESSAGE_BYTES)] = (
        8192  # rsyslog's default maxMessageSize
    )

    def __post_init__(self) -> None:
        parse_address(self.address)
        if self.facility not in FACILITIES:
            raise ValueError(
                f"unknown facility {self.facility!r}; use one of {', '.join(FACILITIES)}"
            )
        if self.severity not in SEVERITIES:
            raise ValueError(
                f"unknown severity {self.severity!r}; use one of {', '.join(SEVERITIES)}"
            )
        for name, value in (("app_name", self.app_name), ("hostname", self.hostname)):
            if value is not None and not _is_printable_ascii(value):
                raise ValueError(f"{name} must be printable ASCII without spaces")


def _is_printable_ascii(value: str) -> bool:
    return bool(value) and all(33 <= ord(char) <= 126 for char in value)


def parse_address(address: str) -> tuple[str, str, int]:
    """("unix", path, 0) or ("udp"|"tcp", host, port)."""
    parts = urlsplit(address)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"address {address!r} must start with unix://, udp:// or tcp://")
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"address {address!r} names no socket path")
        return "unix", parts.path, 0
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise ValueError(
            f"address {address!r} needs a host and a port, as {parts.scheme}://host:514"
        )
    return parts.scheme, parts.hostname, port


class SyslogSink(BaseSink):
    def __init__(self, options: SyslogOptions) -> None:
        self.options = options
        self.transport, self.host, self.port = parse_address(options.address)
        priority = FACILITIES[options.facility] * 8 + SEVERITIES[options.severity]
        hostname = options.hostname or socket.gethostname() or "-"
        # Everything before the timestamp and after it but before MSG is fixed.
        self._priority = f"<{priority}>1 ".encode()
        self._fields = f" {hostname} {options.app_name} {os.getpid()} {MSGID} - ".encode()
        self._socket: socket.socket | None = None
        self.retried = 0  # messages sent again after a reconnect (the dispatcher reads it)

    def format(self, event: SlowQuery, now: datetime | None = None) -> bytes:
        timestamp = (now or datetime.now(timezone.utc)).isoformat(timespec="microseconds")
        header = self._priority + timestamp.replace("+00:00", "Z").encode() + self._fields
        return header + fit_event(event, self.options.max_message_bytes - len(header))

    def write(self, events: Sequence[SlowQuery]) -> None:
        for event in events:
            self._send(self.format(event))

    def _connect(self) -> socket.socket:
        if self.transport == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.connect(self.host)
            return sock
        kind = socket.SOCK_DGRAM if self.transport == "udp" else socket.SOCK_STREAM
        family, _, _, _, address = socket.getaddrinfo(self.host, self.port, type=kind)[0]
        sock = socket.socket(family, kind)
        sock.settimeout(10)
        sock.connect(address)
        return sock

    def _send(self, message: bytes) -> None:
        if self.transport == "tcp":
            message = f"{len(message)} ".encode() + message  # RFC 6587 octet counting
        for attempt in (1, 2):
            try:
                if self._socket is None:
                    self._socket = self._connect()
                self._socket.sendall(message)
                return
            except OSError:
                self.close()  # reconnect once: the receiver may have restarted
                if attempt == 2:
                    raise
                self.retried += 1

    def reopen(self) -> None:
        self.close()

    def interrupt(self) -> None:
        self.close()

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def fit_event(event: SlowQuery, limit: int) -> bytes:
    """The event as JSON in at most `limit` bytes, shortening only the query text
    (and leaving out a plan that would not fit even without it).

    JSON escaping makes the encoded size of a prefix hard to predict (a quote or a
    newline takes two bytes, a control character six), so search for the longest
    prefix, in characters, that fits: never half a character, never broken JSON.
    """
    encoded = event.to_json()
    if len(encoded) <= limit:
        return encoded
    if event.plan is not None:
        # A plan ([explain]) can be far longer than any text: if the event does not fit
        # even with no text, the plan is left out and plan_error says why.
        if len(msgspec.structs.replace(event, query="").to_json()) > limit:
            event = msgspec.structs.replace(
                event, plan=None, plan_error="plan left out: over max_message_bytes"
            )
            encoded = event.to_json()
            if len(encoded) <= limit:
                return encoded

    def encode(length: int) -> bytes:
        shorter = msgspec.structs.replace(event, query=event.query[:length], query_truncated=True)
        return shorter.to_json()

    best = encode(0)  # if even this is too long, nothing shorter exists to send
    low, high = 0, len(event.query) - 1
    while low < high:
        middle = (low + high + 1) // 2
        candidate = encode(middle)
        if len(candidate) <= limit:
            low, best = middle, candidate
        else:
            high = middle - 1
    return best  # always encode(low)


@hookimpl
def pgslowlog_register_sinks(register: RegisterSink) -> None:
    register(
        SinkType(
            name="syslog",
            description="RFC 5424 to /dev/log, or over UDP or TCP (octet counting)",
            options=SyslogOptions,
            create=SyslogSink,
        )
    )

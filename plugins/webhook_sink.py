"""The webhook sink: HTTP(S) POST of events as a JSON array, batched, with retries.

Retries (connection errors, timeouts, 408/425/429/5xx) back off exponentially with
jitter and honour Retry-After. Other 4xx answers are not retried: the batch is
counted as failed. Header values that are secrets come from an environment
variable or a file and are never logged: logs name the URL (without credentials)
and status codes only.
"""

from __future__ import annotations

import os
import ssl
import threading
import time
from collections.abc import Sequence
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Annotated, Optional
from urllib.parse import urlsplit, urlunsplit

import httpx
import msgspec

from pgslowlog.event import SlowQuery
from pgslowlog.hookspecs import hookimpl
from pgslowlog.log import get_logger
from pgslowlog.plugin_manager import RegisterSink
from pgslowlog.sinks import BaseSink, SinkType, backoff_s

log = get_logger(__name__)
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
RETRY_AFTER_CAP_S = 300.0  # a receiver asking for an hour would stall the queue


class WebhookOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    url: str
    max_batch: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 100
    max_delay_ms: Annotated[int, msgspec.Meta(ge=0, le=600_000)] = 1000
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 10.0
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 8
    backoff_initial_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 0.5
    backoff_max_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    verify_tls: bool = True
    ca_file: Optional[str] = None
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    # header name -> environment variable / file holding its value (for secrets)
    headers_from_env: dict[str, str] = msgspec.field(default_factory=dict)
    headers_from_file: dict[str, str] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be http://host/... or https://host/..., not {self.url!r}")


def redact(url: str) -> str:
    """The URL without user:password@, for logs."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def resolve_headers(options: WebhookOptions) -> dict[str, str]:
    headers = {"Content-Type": "application/json", **options.headers}
    for name, variable in options.headers_from_env.items():
        value = os.environ.get(variable)
        if not value:
            raise ValueError(
                f"headers_from_env.{name}: environment variable {variable} is not set "
                "(under systemd, set it with Environment= or EnvironmentFile=)"
            )
        headers[name] = value
    for name, path in options.headers_from_file.items():
        try:
            headers[name] = Path(path).read_text().strip()
        except OSError as error:
            raise ValueError(
                f"headers_from_file.{name}: cannot read {path}: {error.strerror}"
            ) from None
    return headers


def check_options(options: WebhookOptions) -> None:
    """Secrets and the CA file must be there before the daemon starts (and for `check`)."""
    resolve_headers(options)
    if options.ca_file is not None and not os.access(options.ca_file, os.R_OK):
        raise ValueError(f"ca_file: cannot read {options.ca_file}")


def retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), RETRY_AFTER_CAP_S)


class WebhookError(Exception):
    pass


class WebhookSink(BaseSink):
    def __init__(self, options: WebhookOptions) -> None:
        self.options = options
        self.max_batch = options.max_batch  # read by the dispatcher
        self.max_delay_s = options.max_delay_ms / 1000
        self.retried = 0
        self.url = options.url
        self._shown_url = redact(options.url)
        self._interrupted = threading.Event()
        if not options.verify_tls:
            verify: ssl.SSLContext | bool = False
            log.warning(
                "webhook_tls_verification_off",
                url=self._shown_url,
                hint="events go to an endpoint whose identity is not checked; "
                "set verify_tls = true (and ca_file for a private CA)",
            )
        else:
            verify = ssl.create_default_context(cafile=options.ca_file)
        self._client = httpx.Client(
            headers=resolve_headers(options), timeout=options.timeout_s, verify=verify
        )

    def backoff_s(self, attempt: int) -> float:
        return backoff_s(attempt, self.options.backoff_initial_s, self.options.backoff_max_s)

    def write(self, events: Sequence[SlowQuery]) -> None:
        body = b"[" + b",".join(event.to_json() for event in events) + b"]"
        for attempt in range(1, self.options.max_attempts + 1):
            wait: float | None = None
            try:
                response = self._client.post(self.url, content=body)
            except httpx.TransportError as error:
                reason = f"{type(error).__name__}"
            else:
                if response.is_success:
                    return
                reason = f"HTTP {response.status_code}"
                if response.status_code not in RETRYABLE_STATUS:
                    raise WebhookError(f"{self._shown_url} answered {reason}; not retried")
                wait = retry_after_s(response)
            if attempt == self.options.max_attempts:
                break
            delay = wait if wait is not None else self.backoff_s(attempt)
            self.retried += len(events)
            log.warning(
                "webhook_retry", url=self._shown_url, reason=reason, attempt=attempt, delay_s=delay
            )
            if self._interrupted.wait(delay):
                raise WebhookError(f"shutting down while retrying {self._shown_url} ({reason})")
        raise WebhookError(
            f"{self._shown_url}: gave up after {self.options.max_attempts} attempts ({reason})"
        )

    def interrupt(self) -> None:
        self._interrupted.set()

    def close(self) -> None:
        self._client.close()


@hookimpl
def pgslowlog_register_sinks(register: RegisterSink) -> None:
    register(
        SinkType(
            name="webhook",
            description="HTTP(S) POST of JSON arrays, batched, with retries",
            options=WebhookOptions,
            create=WebhookSink,
            check=check_options,
        )
    )

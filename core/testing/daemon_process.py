"""`pgslowlog run` as a child process, watched through its JSON log: demo and tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any


class DaemonExited(RuntimeError):
    pass


class RunningDaemon:
    def __init__(
        self,
        config_path: Path,
        env: dict[str, str] | None = None,
        wrapper: list[str] | None = None,  # for example setpriv with fewer capabilities
    ) -> None:
        self.config_path = config_path
        self.logs: list[dict[str, Any]] = []
        self.stderr = ""
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            [*(wrapper or []), sys.executable, "-m", "pgslowlog", "run", "-c", str(config_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                entry = {"event": "unparsed", "line": line}
            with self._changed:
                self.logs.append(entry)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        self.stderr = self.process.stderr.read()

    def wait_for_log(self, event: str, count: int = 1, timeout: float = 60) -> dict[str, Any]:
        """The `count`-th log entry named `event`; DaemonExited if the daemon died first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                matches = [entry for entry in self.logs if entry.get("event") == event]
                if len(matches) >= count:
                    return matches[count - 1]
                if self.process.poll() is not None:
                    time.sleep(0.1)  # let stderr be read
                    raise DaemonExited(
                        f"daemon exited with {self.process.returncode} before {event!r}: "
                        f"{self.stderr.strip()} {self.logs[-5:]}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"no {event!r} log entry within {timeout}s: {self.logs[-5:]}"
                    )
                self._changed.wait(min(remaining, 0.5))

    def reload(self) -> None:
        self.process.send_signal(signal.SIGHUP)

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

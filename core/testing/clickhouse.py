"""Throwaway ClickHouse servers on this machine: a cluster of shards for the sink's tests.

Debian 12's `clickhouse-server` (18.16.1), run as root with no systemd: each server is
a child process with a config file of its own, listening on free ports of 127.0.0.1,
with its data, temporary files and logs under one temporary directory, removed on
stop. Every server's `remote_servers` names the same cluster: one shard per server, one
replica each, by TCP port, so a `Distributed(<cluster>, ...)` table on any of them
spreads rows over all. The users file is generated: `default` without a password (the
shards reach each other as it) and one user with a password, for the tests of
authentication.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from xml.sax.saxutils import escape

import httpx

from pgslowlog.testing.cluster import free_ports

CLICKHOUSE_SERVER = Path("/usr/sbin/clickhouse-server")
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0  # SIGTERM, then SIGKILL
_CODE = re.compile(r"^Code: (\d+)")


class ClickHouseError(RuntimeError):
    """A statement the server refused: its HTTP status, ClickHouse's error code (the
    `Code: N` its text starts with, when it does) and the text."""

    def __init__(self, status: int, text: str, sql: str) -> None:
        self.status = status
        self.text = text.strip()
        match = _CODE.match(self.text)
        self.code = int(match.group(1)) if match else None
        super().__init__(f"HTTP {status} for {sql[:200]!r}: {self.text}")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class ClickHouseShard:
    """One server of the cluster: its ports, files and (while it runs) process."""

    def __init__(self, index: int, http_port: int, tcp_port: int) -> None:
        self.index = index
        self.http_port = http_port
        self.tcp_port = tcp_port
        self.directory: Path | None = None  # set by ClickHouseCluster.start
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def config(self) -> Path:
        assert self.directory is not None, "not started"
        return self.directory / "config.xml"

    @property
    def log(self) -> Path:
        assert self.directory is not None, "not started"
        return self.directory / "server.log"

    def log_tail(self, lines: int = 40) -> str:
        """The end of what the server wrote: its console (config errors) and its log."""
        if self.directory is None:
            return ""
        parts = [
            f"--- {path.name}:\n{text}"
            for path in (self.directory / "console.log", self.log)
            if (text := _tail(path, lines))
        ]
        return "\n".join(parts)


class ClickHouseCluster:
    """`shards` clickhouse-server processes, a cluster named `cluster_name` of them all.

    start() waits until every server answers `SELECT 1` over HTTP; stop() ends them all
    and removes their files, and is safe to call twice or after a failed start (a failed
    start has already stopped everything). stop_server()/start_server() take one shard
    (or all) down and up again on the same ports and data. As a context manager it
    starts on entry and stops on exit.
    """

    def __init__(
        self,
        shards: int = 2,
        cluster_name: str = "fleet",
        user: str = "pgslowlog",
        password: str = "pgslowlog-secret",
        binary: Path = CLICKHOUSE_SERVER,
        workdir: Path | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
        tls: bool = False,
    ) -> None:
        """With `tls`, each server also serves HTTPS (https_url), with a certificate for
        127.0.0.1 signed by a CA of the cluster's own (ca_file, made by openssl)."""
        if shards < 1:
            raise ValueError(f"a cluster needs at least one shard, not {shards}")
        if user == "default":
            raise ValueError("the user with a password must not be `default`")
        self.binary = Path(binary)
        self.cluster_name = cluster_name
        self.user = user
        self.password = password
        self.workdir = workdir
        self.start_timeout_s = start_timeout_s
        ports = free_ports(3 * shards)
        self.shards = [
            ClickHouseShard(index, http_port=ports[3 * index], tcp_port=ports[3 * index + 1])
            for index in range(shards)
        ]
        self.tls = tls
        self._https_ports = [ports[3 * index + 2] for index in range(shards)]
        self.ca_file: Path | None = None  # with tls, once started
        self.base: Path | None = None  # the temporary directory, while there is one

    # --- lifecycle

    def start(self) -> ClickHouseCluster:
        if self.base is not None:
            raise RuntimeError(f"already started in {self.base}")
        if not self.binary.is_file():
            raise RuntimeError(f"no {self.binary}: apt-get install clickhouse-server")
        self.base = Path(tempfile.mkdtemp(prefix="pgslowlog-clickhouse-", dir=self.workdir))
        try:
            (self.base / "users.xml").write_text(self._users_xml())
            if self.tls:
                self._make_certificates(self.base / "tls")
            for shard in self.shards:
                shard.directory = self.base / f"shard{shard.index}"
                (shard.directory / "tmp").mkdir(parents=True)
                shard.config.write_text(self._config_xml(shard))
            self._start(self.shards)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Terminate every server, wait for each, remove the files. Idempotent."""
        try:
            self._stop(self.shards)
        finally:
            if self.base is not None:
                shutil.rmtree(self.base, ignore_errors=True)
                self.base = None
            for shard in self.shards:
                shard.directory = None

    def stop_server(self, index: int | None = None) -> None:
        """Terminate shard `index` (all when None) and wait; its data stays."""
        self._stop(self._chosen(index))

    def start_server(self, index: int | None = None) -> None:
        """Start shard `index` (all stopped ones when None) again, on the same ports and
        data, and wait until it answers. A shard that already runs is left alone."""
        if self.base is None:
            raise RuntimeError("the cluster is not started (or already stopped)")
        self._start([shard for shard in self._chosen(index) if not self.running(shard.index)])

    def running(self, index: int = 0) -> bool:
        process = self.shards[index].process
        return process is not None and process.poll() is None

    def __enter__(self) -> ClickHouseCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _chosen(self, index: int | None) -> list[ClickHouseShard]:
        return list(self.shards) if index is None else [self.shards[index]]

    def _start(self, shards: list[ClickHouseShard]) -> None:
        try:
            for shard in shards:  # all at once, then wait for each
                assert shard.directory is not None
                with open(shard.directory / "console.log", "ab") as console:
                    shard.process = subprocess.Popen(
                        [str(self.binary), f"--config-file={shard.config}"],
                        stdin=subprocess.DEVNULL,
                        stdout=console,
                        stderr=subprocess.STDOUT,
                        cwd=shard.directory,
                    )
            for shard in shards:
                self._wait_ready(shard)
        except BaseException:
            self._stop(shards)
            raise

    def _wait_ready(self, shard: ClickHouseShard) -> None:
        assert shard.process is not None
        deadline = time.monotonic() + self.start_timeout_s
        last = ""
        while True:
            if shard.process.poll() is not None:
                raise RuntimeError(
                    f"clickhouse-server of shard {shard.index} exited with "
                    f"{shard.process.returncode} before it answered:\n{shard.log_tail()}"
                )
            try:
                if self.query("SELECT 1", shard.index, timeout_s=2).strip() == "1":
                    return
            except (httpx.HTTPError, ClickHouseError) as error:
                last = f"{type(error).__name__}: {error}"
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"clickhouse-server of shard {shard.index} (http {shard.http_port}) did "
                    f"not answer SELECT 1 within {self.start_timeout_s} s; last: {last}\n"
                    f"{shard.log_tail()}"
                )
            time.sleep(0.05)

    @staticmethod
    def _stop(shards: list[ClickHouseShard]) -> None:
        for shard in shards:  # all told first, so they shut down side by side
            if shard.process is not None and shard.process.poll() is None:
                shard.process.send_signal(signal.SIGTERM)
        for shard in shards:
            if shard.process is None:
                continue
            try:
                shard.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                shard.process.kill()
                shard.process.wait()
            shard.process = None

    # --- files

    def _users_xml(self) -> str:
        local = "<networks><ip>127.0.0.1</ip><ip>::1</ip></networks>"
        common = f"{local}<profile>default</profile><quota>default</quota>"
        return f"""<?xml version="1.0"?>
<yandex>
    <profiles><default></default></profiles>
    <users>
        <default><password></password>{common}</default>
        <{self.user}><password>{escape(self.password)}</password>{common}</{self.user}>
    </users>
    <quotas><default><interval>
        <duration>3600</duration><queries>0</queries><errors>0</errors>
        <result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time>
    </interval></default></quotas>
</yandex>
"""

    def _config_xml(self, shard: ClickHouseShard) -> str:
        assert shard.directory is not None and self.base is not None
        replicas = "\n".join(
            f"<shard><replica><host>127.0.0.1</host><port>{other.tcp_port}</port></replica></shard>"
            for other in self.shards
        )
        return f"""<?xml version="1.0"?>
<yandex>
    <logger>
        <level>information</level>
        <log>{shard.directory}/server.log</log>
        <errorlog>{shard.directory}/server.err.log</errorlog>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>{shard.http_port}</http_port>
    <tcp_port>{shard.tcp_port}</tcp_port>
    <path>{shard.directory}/data/</path>
    <tmp_path>{shard.directory}/tmp/</tmp_path>
    <users_config>{self.base}/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>{self._tls_xml(shard)}
    <!-- 18.16 refuses to start without it (Not found: mark_cache_size); used on demand -->
    <mark_cache_size>268435456</mark_cache_size>
    <remote_servers>
        <{self.cluster_name}>
{replicas}
        </{self.cluster_name}>
    </remote_servers>
</yandex>
"""

    def _make_certificates(self, directory: Path) -> None:
        """A CA, and a certificate for 127.0.0.1 it signed (the servers share it)."""
        directory.mkdir()

        def openssl(*arguments: str) -> None:
            subprocess.run(["openssl", *arguments], cwd=directory, check=True, capture_output=True)

        openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=pgslowlog test CA",
        )
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        )
        (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        openssl(
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        )
        self.ca_file = directory / "ca.pem"

    def _tls_xml(self, shard: ClickHouseShard) -> str:
        if not self.tls:
            return ""
        assert self.base is not None
        tls = self.base / "tls"
        return f"""
    <https_port>{self._https_ports[shard.index]}</https_port>
    <openSSL><server>
        <certificateFile>{tls}/server.pem</certificateFile>
        <privateKeyFile>{tls}/server.key</privateKeyFile>
        <verificationMode>none</verificationMode>
        <loadDefaultCAFile>false</loadDefaultCAFile>
    </server></openSSL>"""

    # --- clients

    def http_url(self, shard: int = 0) -> str:
        return f"http://127.0.0.1:{self.shards[shard].http_port}/"

    def https_url(self, shard: int = 0) -> str:
        if not self.tls:
            raise RuntimeError("started without tls")
        return f"https://127.0.0.1:{self._https_ports[shard]}/"

    def query(
        self,
        sql: str,
        shard: int = 0,
        *,
        data: str | bytes | None = None,
        settings: Mapping[str, str | int] | None = None,
        user: str | None = None,
        password: str = "",
        timeout_s: float = 30,
    ) -> str:
        """Run `sql` on `shard` over HTTP and return the response body.

        Without `data`, `sql` is the POST body; with it, `sql` goes in the URL (`query=`)
        and `data` is the body (`INSERT INTO t FORMAT JSONEachRow` and its rows).
        `settings` become URL parameters (`insert_distributed_sync=1`). `user` and
        `password` go as HTTP basic auth; without a user the request is `default`'s.
        ClickHouseError on any status but 200.
        """
        params: dict[str, str | int] = dict(settings or {})
        if data is None:
            body: str | bytes = sql
        else:
            params["query"] = sql
            body = data
        auth = (user, password) if user is not None else None
        response = httpx.post(
            self.http_url(shard), params=params, content=body, auth=auth, timeout=timeout_s
        )
        if response.status_code != 200:
            raise ClickHouseError(response.status_code, response.text, sql)
        return response.text

    def pids(self) -> list[int]:
        """The processes of the servers that run now."""
        return [
            shard.process.pid
            for shard in self.shards
            if shard.process is not None and shard.process.poll() is None
        ]


def clickhouse_processes(base: Path) -> list[int]:
    """Every clickhouse-server on this machine whose config lies under `base`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            command = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(part.startswith(f"--config-file={base}/".encode()) for part in command):
            found.append(int(entry))
    return found

"""Generated configs thrown at the loader: a config or a one-line UserError, never a traceback."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgslowlog.compat import tomllib
from pgslowlog.config import Config, load_config, parse_config
from pgslowlog.errors import UserError
from pgslowlog.planner import Planner
from pgslowlog.plugin_manager import Plugins

PG15 = "/usr/lib/postgresql/15/bin/postgres"
# Real keys, so that generated configs get past the first check and reach deeper ones.
KEYS = [
    "daemon", "target", "sinks", "threshold_ms", "query_max_bytes", "max_backends",
    "ring_buffer_mib", "sink_queue_size", "stats_interval_s", "log_level", "capture_params",
    "params_max_length", "include_background", "binary", "pid", "name", "probes", "file",
    "syslog", "webhook", "console", "path", "address", "url", "queue_size",
    "shutdown_timeout_s", "verify_tls", "headers_from_file", "facility", "max_batch",
]  # fmt: skip
SCALARS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=20),
    st.sampled_from([PG15, "/bin/ls", "/nonexistent", "auto", "activity", "udp://x:1", "-1"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), children, max_size=5
        ),
    ),
    max_leaves=20,
)
CONFIGS = st.dictionaries(st.sampled_from(KEYS[:3]), VALUES, max_size=3)
PLUGINS = Plugins.load()  # the installed ones, as `run` sees them


def assert_one_line(error: UserError) -> None:
    message = str(error)
    assert message and "\n" not in message, message
    assert error.fix, message


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(CONFIGS)
def test_generated_configs_load_or_fail_in_one_line(data: dict[str, Any]) -> None:
    try:
        config = parse_config(data, "fuzz.toml")
    except UserError as error:
        assert_one_line(error)
        return
    assert isinstance(config, Config)
    try:
        # targets and sink options, as `run` resolves them
        Planner(PLUGINS).plan(config, "fuzz.toml").close()
    except UserError as error:
        assert_one_line(error)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_generated_files_load_or_fail_in_one_line(tmp_path_factory, content: bytes) -> None:
    path = Path(tmp_path_factory.mktemp("fuzz")) / "pgslowlog.toml"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    try:
        load_config(path)
    except UserError as error:
        assert_one_line(error)
        try:
            tomllib.loads(content.decode())
        except (UnicodeDecodeError, tomllib.TOMLDecodeError):
            assert "TOML" in str(error) or "UTF-8" in str(error), str(error)

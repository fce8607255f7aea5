"""Generated configs thrown at the loader: a config holding exactly what was given, or a
one-line UserError naming what is wrong; never a traceback."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgslowlog.compat import tomllib
from pgslowlog.config import LOG_LEVELS, DaemonConfig, load_config, parse_config
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


# No example database: nothing is written into the tree, whoever runs the tests.
@settings(
    max_examples=400,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(CONFIGS)
def test_generated_configs_are_refused_in_one_line(data: dict[str, Any]) -> None:
    # Random structures hardly ever make a whole config (no [[target]], no sink): this
    # throws them at the loader's refusals; the test below makes ones that load.
    try:
        parse_config(data, "fuzz.toml")
    except UserError as error:
        assert_one_line(error)
        assert str(error).startswith("config fuzz.toml: "), str(error)


DAEMON_KEYS = sorted(field.name for field in msgspec.structs.fields(DaemonConfig))
# Values about each key's bounds, and of the other kinds: some tables load, some do not.
DAEMON_VALUES = st.one_of(
    st.integers(min_value=-1, max_value=20_000),
    st.floats(min_value=-1.0, max_value=100_000.0),
    st.booleans(),
    st.sampled_from([*LOG_LEVELS, "loud", ""]),
)
TARGET_BINARIES = ["/nonexistent/bin/postgres", "/bin/ls"]  # pending, or not PostgreSQL
FILE_FORMATS = ["json", "jsonlog", "pgbadger"]
WHOLE_CONFIGS = st.fixed_dictionaries(
    {
        "daemon": st.dictionaries(st.sampled_from(DAEMON_KEYS), DAEMON_VALUES, max_size=4),
        "target": st.lists(st.sampled_from(TARGET_BINARIES), min_size=1, max_size=2).map(
            lambda binaries: [{"binary": binary} for binary in binaries]
        ),
        "sinks": st.sampled_from(FILE_FORMATS).map(
            # Well-formed for any user: a directory under /tmp, made by the sink.
            lambda form: {"file": {"path": "/tmp/pgslowlog-fuzz/slow.jsonl", "format": form}}
        ),
    }
)


def same(kept: Any, given: Any) -> bool:
    """Equal and of the same kind; an integer given for a float is kept as that float."""
    if isinstance(given, int) and not isinstance(given, bool) and type(kept) is float:
        return kept == given
    return type(kept) is type(given) and kept == given


@settings(max_examples=300, deadline=None, database=None)
@given(WHOLE_CONFIGS)
def test_a_config_holds_the_values_given_or_is_refused_naming_one(data: dict[str, Any]) -> None:
    given = data["daemon"]
    try:
        config = parse_config(data, "fuzz.toml")
    except UserError as error:
        assert_one_line(error)
        # Targets and sinks are well-formed here: a daemon key given is what is wrong.
        assert any(str(error).startswith(f"config fuzz.toml: daemon.{key}") for key in given), str(
            error
        )
        return
    for key in DAEMON_KEYS:
        kept = getattr(config.daemon, key)
        expected = given.get(key, getattr(DaemonConfig(), key))  # not given: the default
        assert same(kept, expected), (key, kept, expected)
    assert [(t.binary, t.pid, t.probes) for t in config.target] == [
        (t["binary"], None, ["auto"]) for t in data["target"]
    ]
    assert config.sinks == data["sinks"]
    try:
        # targets and sink options, as `run` resolves them
        Planner(PLUGINS).plan(config, "fuzz.toml").close()
    except UserError as error:
        assert_one_line(error)
        cause = str(error)
        if "/bin/ls" in [t["binary"] for t in data["target"]]:
            assert "binary /bin/ls is not a PostgreSQL server binary" in cause, cause
        else:
            assert data["sinks"]["file"]["format"] == "pgbadger", cause
            assert "sinks.file: format = 'pgbadger' is not a format" in cause, cause
    else:
        assert "/bin/ls" not in [t["binary"] for t in data["target"]]
        assert data["sinks"]["file"]["format"] != "pgbadger"


@settings(max_examples=200, deadline=None, database=None)
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

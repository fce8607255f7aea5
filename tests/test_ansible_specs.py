"""The role's meta/argument_specs.yml against the daemon's own schema.

pgslowlog_targets and pgslowlog_sinks are described key by key, from the msgspec
Structs the daemon reads them into: a field added to one of them fails here until the
spec has it. Then ansible-playbook shows what the spec refuses (a misspelt key, named)
and that a config with every key passes it and renders into a file the daemon reads
back unchanged: no sub-option has a default that could reach the file as `key = null`
or as a key nobody set.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Annotated, Any, Optional, Union, get_args, get_origin

import msgspec
import pytest
import yaml

from pgslowlog.compat import tomllib
from pgslowlog.config import TargetConfig, load_config
from pgslowlog.plugin_manager import Plugins
from pgslowlog.plugins.console_sink import ConsoleOptions
from pgslowlog.plugins.file_sink import ENCODERS, FileSinkOptions
from pgslowlog.plugins.syslog_sink import FACILITIES, SEVERITIES, SyslogOptions
from pgslowlog.plugins.webhook_sink import WebhookOptions
from pgslowlog.sinks import CommonSinkOptions

ROOT = Path(__file__).parent.parent
ROLE = ROOT / "ansible" / "roles" / "pgslowlog"
SPECS = ROLE / "meta" / "argument_specs.yml"
BIN = Path(sys.executable).parent

# The sinks pgslowlog_sinks describes: every shipped one but clickhouse, which has
# variables of its own (pgslowlog_clickhouse_*) and is refused in pgslowlog_sinks.
SINK_OPTIONS: dict[str, type[msgspec.Struct]] = {
    "file": FileSinkOptions,
    "syslog": SyslogOptions,
    "webhook": WebhookOptions,
    "console": ConsoleOptions,
}
NOT_IN_SINKS = {"clickhouse"}
# Keys whose values the daemon takes from a fixed set: the spec's choices.
CHOICES: dict[tuple[str, str], list[str]] = {
    ("file", "format"): list(ENCODERS),
    ("syslog", "facility"): list(FACILITIES),
    ("syslog", "severity"): list(SEVERITIES),
}
SCALARS = {str: "str", int: "int", float: "float", bool: "bool"}
# Union[X, None] and, from 3.10 on, X | None.
UNIONS: tuple[Any, ...] = (Union, getattr(types, "UnionType", Union))


def options() -> dict[str, Any]:
    specs: dict[str, Any] = yaml.safe_load(SPECS.read_text())
    main: dict[str, Any] = specs["argument_specs"]["main"]["options"]
    return main


def ansible_type(annotation: Any) -> tuple[str, Optional[str]]:
    """(type, elements) of the Ansible option that takes a value of this Python type:
    Annotated[X, Meta] and Optional[X] are X, list[X] is a list of X's type."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return ansible_type(get_args(annotation)[0])
    if origin in UNIONS:
        others = [arg for arg in get_args(annotation) if arg is not type(None)]
        assert len(others) == 1, f"no Ansible type for the union {annotation}"
        return ansible_type(others[0])
    if origin is list:
        (element,) = get_args(annotation)
        element_type, _ = ansible_type(element)
        return "list", element_type
    if origin is dict or annotation is dict:
        return "dict", None
    assert annotation in SCALARS, f"no Ansible type for {annotation}"
    return SCALARS[annotation], None


def assert_describes(
    where: str, spec: dict[str, Any], structs: tuple[type[msgspec.Struct], ...]
) -> None:
    """The spec's options are exactly the structs' fields, typed alike, with no default."""
    fields = [field for struct in structs for field in msgspec.structs.fields(struct)]
    assert sorted(spec) == sorted(field.name for field in fields), where
    for field in fields:
        option = spec[field.name]
        key = f"{where}.{field.name}"
        wanted, elements = ansible_type(field.type)
        assert option.get("type") == wanted, key
        assert option.get("elements") == elements, key
        # A default here is a key the template would write for every entry: the
        # daemon's default is in the description instead.
        assert "default" not in option, f"{key}: no default in a sub-option"
        assert option.get("required", False) == field.required, key
        assert option.get("description"), key


def test_targets_spec_has_exactly_the_fields_of_a_target() -> None:
    targets = options()["pgslowlog_targets"]
    assert (targets["type"], targets["elements"]) == ("list", "dict")
    assert_describes("pgslowlog_targets", targets["options"], (TargetConfig,))


def test_sinks_spec_has_each_shipped_sink_but_clickhouse_with_exactly_its_fields() -> None:
    sinks = options()["pgslowlog_sinks"]
    assert sinks["type"] == "dict"
    # What the daemon itself registers, from pgslowlog's own plugins: a new shipped
    # sink is a sink the spec must describe (or leave out, as clickhouse, on purpose).
    shipped = {
        name: sink_type.options
        for name, sink_type in Plugins.load().sink_types.items()
        if sink_type.options.__module__.startswith("pgslowlog.plugins.")
    }
    assert NOT_IN_SINKS <= set(shipped)
    assert {name: shipped[name] for name in set(shipped) - NOT_IN_SINKS} == SINK_OPTIONS
    assert sorted(sinks["options"]) == sorted(SINK_OPTIONS)
    for name, struct in SINK_OPTIONS.items():
        sink = sinks["options"][name]
        assert sink["type"] == "dict" and "default" not in sink, name
        assert_describes(f"pgslowlog_sinks.{name}", sink["options"], (struct, CommonSinkOptions))
    for (name, key), choices in CHOICES.items():
        assert sinks["options"][name]["options"][key]["choices"] == choices, (name, key)
    # What the daemon reads when no pgslowlog_sinks is given: the file sink alone.
    assert sinks["default"] == {"file": {"path": "/var/log/pgslowlog/slow.jsonl"}}


def test_no_option_at_any_depth_below_the_variables_has_a_default() -> None:
    def below(spec: dict[str, Any], where: str) -> list[str]:
        found = []
        for name, option in spec.items():
            if "default" in option:
                found.append(f"{where}.{name}")
            found += below(option.get("options", {}), f"{where}.{name}")
        return found

    assert [
        key for name, option in options().items() for key in below(option.get("options", {}), name)
    ] == []


# Every key of every target and sink set at least once, none to its default.
EVERY_KEY: dict[str, Any] = {
    "pgslowlog_targets": [
        {"name": "main", "binary": "/usr/lib/postgresql/17/bin/postgres", "probes": ["sampled"]},
        {"name": "old", "pid": 4242, "probes": ["activity", "extended"]},
        {"name": "pods", "containers": True, "binary": "/usr/lib/postgresql/17/bin/postgres"},
    ],
    "pgslowlog_sinks": {
        "file": {
            "path": "/var/log/pgslowlog/slow.log",
            "format": "jsonlog",
            "queue_size": 5000,
            "shutdown_timeout_s": 2.5,
        },
        "syslog": {
            "address": "tcp://logs.example:601",
            "facility": "local3",
            "severity": "warning",
            "app_name": "pgslowlog-db1",
            "hostname": "db1",
            "max_message_bytes": 16384,
        },
        "webhook": {
            "url": "https://collector.example/slow",
            "max_batch": 50,
            "max_delay_ms": 250,
            "timeout_s": 3.0,
            "max_attempts": 3,
            "backoff_initial_s": 0.25,
            "backoff_max_s": 10.0,
            "verify_tls": False,
            "ca_file": "/etc/pgslowlog/collector-ca.pem",
            "headers": {"X-Source": 'db "one"'},
            "headers_from_env": {"Authorization": "PGSLOWLOG_WEBHOOK_TOKEN"},
            "headers_from_file": {"X-Api-Key": "/etc/pgslowlog/webhook-key"},
        },
        "console": {"queue_size": 10},
    },
}


def test_the_config_with_every_key_sets_every_key() -> None:
    # So that the playbook below checks each key of the spec, not some of them.
    targets = options()["pgslowlog_targets"]["options"]
    assert set(targets) == {key for target in EVERY_KEY["pgslowlog_targets"] for key in target}
    sinks = options()["pgslowlog_sinks"]["options"]
    for name, keys in EVERY_KEY["pgslowlog_sinks"].items():
        own = set(sinks[name]["options"]) - set(CommonSinkOptions.__struct_fields__)
        assert own <= set(keys), name
    assert {key for sink in EVERY_KEY["pgslowlog_sinks"].values() for key in sink} >= set(
        CommonSinkOptions.__struct_fields__
    )


def validate_and_render(tmp_path: Path, variables: dict[str, Any]) -> tuple[str, Path]:
    """The spec's validation of the role's defaults with `variables` over them (as role
    parameters), then the role's config template with the same variables: ansible's
    output, and the path the template was rendered to."""
    given = tmp_path / "variables.yml"
    given.write_text(yaml.safe_dump(variables))
    rendered = tmp_path / "pgslowlog.toml"
    spec_names = set(options())
    play = [
        {
            "name": "The role's argument specs, then its config template",
            "hosts": "localhost",
            "gather_facts": False,
            # Later files win: the role's defaults and vars, then the test's variables.
            "vars_files": [
                str(path)
                for path in (ROLE / "defaults" / "main.yml", ROLE / "vars" / "main.yml", given)
                if path.exists()
            ],
            "vars": {"ansible_python_interpreter": sys.executable},
            "tasks": [
                {
                    "name": "Validate the variables against the role's argument specs",
                    "ansible.builtin.validate_argument_spec": {
                        "argument_spec": (
                            f"{{{{ (lookup('file', '{SPECS}') | from_yaml)"
                            ".argument_specs.main.options }}"
                        ),
                        "provided_arguments": {
                            name: value for name, value in variables.items() if name in spec_names
                        },
                    },
                },
                {
                    "name": "Render the role's config template",
                    "ansible.builtin.template": {
                        "src": str(ROLE / "templates" / "pgslowlog.toml.j2"),
                        "dest": str(rendered),
                        "mode": "0600",
                    },
                },
            ],
        }
    ]
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play))
    result = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local", "play.yml"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        # Its temporary files in the test's directory, not below a home directory the
        # user running the tests may not have.
        env={**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_REMOTE_TMP": str(tmp_path / "tmp")},
    )
    output = result.stdout + result.stderr
    assert (result.returncode == 0) == rendered.exists(), output
    return output, rendered


@pytest.mark.parametrize(
    ("variables", "says"),
    [
        ({"pgslowlog_sinks": {"file": {"paht": "/var/log/x.jsonl"}}}, "pgslowlog_sinks.file.paht"),
        (
            {"pgslowlog_sinks": {"file": {"paht": "/var/log/x.jsonl"}}},
            "missing required arguments: path found in pgslowlog_sinks -> file",
        ),
        (
            {"pgslowlog_sinks": {"webhook": {"url": "https://c.example", "header": {}}}},
            "pgslowlog_sinks.webhook.header",
        ),
        ({"pgslowlog_sinks": {"files": {"path": "/var/log/x.jsonl"}}}, "pgslowlog_sinks.files"),
        (
            {"pgslowlog_sinks": {"clickhouse": {"url": "http://ch1:8123"}}},
            "pgslowlog_sinks.clickhouse",
        ),
        (
            {
                "pgslowlog_targets": [
                    {"name": "main", "binray": "/usr/lib/postgresql/17/bin/postgres"}
                ]
            },
            "pgslowlog_targets.binray",
        ),
        (
            {"pgslowlog_sinks": {"file": {"path": "/var/log/x.jsonl", "format": "csv"}}},
            "value of format must be one of: json, jsonlog, got: csv",
        ),
        (
            {"pgslowlog_sinks": {"syslog": {"facility": "local9"}}},
            "value of facility must be one of",
        ),
        (
            {"pgslowlog_targets": [{"pid": "the postmaster"}]},
            # ansible-core 2.16 names the type <class '...AnsibleUnicode'>, 2.19 str.
            "found in 'pgslowlog_targets'. and we were unable to convert to int",
        ),
    ],
)
def test_the_spec_refuses_a_misspelt_or_wrong_key_naming_it(
    tmp_path: Path, variables: dict[str, Any], says: str
) -> None:
    output, rendered = validate_and_render(tmp_path, variables)
    assert "Validation of arguments failed" in output, output
    assert says in output, output
    assert not rendered.exists()


def test_every_key_passes_the_spec_and_reaches_the_file_as_given(tmp_path: Path) -> None:
    output, rendered = validate_and_render(tmp_path, EVERY_KEY)
    assert rendered.exists(), output
    # The TOML as written: each target and sink with exactly the keys given (a default
    # applied by the validation would show here as a key more, or as invalid TOML).
    written = tomllib.loads(rendered.read_text())
    assert written["target"] == EVERY_KEY["pgslowlog_targets"]
    assert written["sinks"] == EVERY_KEY["pgslowlog_sinks"]
    config = load_config(rendered)
    assert [msgspec.structs.asdict(target) for target in config.target] == [
        msgspec.structs.asdict(TargetConfig(**target)) for target in EVERY_KEY["pgslowlog_targets"]
    ]
    # Each sink's table as the daemon parses it (its checks of files and addresses aside).
    sink_types = Plugins.load().sink_types
    for name, raw in config.sinks.items():
        sink_types[name].parse_options(raw, str(rendered))


def test_the_defaults_pass_the_spec_and_render_the_file_sink_alone(tmp_path: Path) -> None:
    # What the role finds when pgslowlog_targets is empty.
    output, rendered = validate_and_render(
        tmp_path, {"_pgslowlog_found_targets": [{"name": "main", "pid": 1}]}
    )
    assert rendered.exists(), output
    config = load_config(rendered)
    assert config.sinks == {"file": {"path": "/var/log/pgslowlog/slow.jsonl"}}
    assert [(target.name, target.pid, target.binary) for target in config.target] == [
        ("main", 1, None)
    ]

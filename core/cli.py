"""The `pgslowlog` command: run, check, probes, schema, demo."""

from __future__ import annotations

import argparse
import sys

from pgslowlog import __version__
from pgslowlog.errors import UserError
from pgslowlog.log import configure_logging

DEFAULT_CONFIG = "/etc/pgslowlog/pgslowlog.toml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgslowlog", description="Log slow PostgreSQL statements with eBPF."
    )
    parser.add_argument("--version", action="version", version=f"pgslowlog {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="TOML config file")
    check = commands.add_parser("check", help="validate the config and the machine")
    check.add_argument(
        "-c", "--config", default=DEFAULT_CONFIG, help="TOML config file (- for standard input)"
    )
    probes = commands.add_parser(
        "probes", help="list the probe definitions and which can attach to a binary"
    )
    which = probes.add_mutually_exclusive_group(required=True)
    which.add_argument("--binary", help="a postgres server binary")
    which.add_argument("-c", "--config", help="describe every target of this config")
    schema = commands.add_parser(
        "schema", help="print the CREATE statements of a store's tables (run them yourself)"
    )
    schema.add_argument("store", choices=["clickhouse"])
    schema.add_argument(
        "--cluster", help="a remote_servers cluster: a local table per shard and a Distributed one"
    )
    schema.add_argument(
        "--table", default=None, help="DATABASE.NAME (default pgslowlog.slow_queries)"
    )
    schema.add_argument(
        "--modern",
        action="store_true",
        help="DateTime64, Map, JSON and a TTL, for ClickHouse 23.x and later (not 18.16)",
    )
    demo = commands.add_parser(
        "demo", help="start an embedded PostgreSQL, log a few slow queries, print them"
    )
    demo.add_argument("--threshold-ms", type=float, default=200.0)
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    configure_logging()
    try:
        if arguments.command == "run":
            from pgslowlog import daemon
            from pgslowlog.config import STDIN

            if arguments.config == STDIN:  # SIGHUP reads the file again
                raise UserError("run reads its config again on SIGHUP", "give it a file with -c")

            return daemon.run(arguments.config)
        if arguments.command == "probes":
            from pgslowlog import preflight

            if arguments.binary:
                print("\n".join(preflight.describe_probes(arguments.binary)))
                return 0
            from pgslowlog.config import load_config
            from pgslowlog.targets import resolve_binary_path, target_name

            config = load_config(arguments.config)
            containers = [(i, t) for i, t in enumerate(config.target) if t.containers]
            if containers:
                from pgslowlog.container_finder import servers_now
                from pgslowlog.container_watch import assign

                assigned = assign(servers_now(), containers)
            for index, target in enumerate(config.target):
                name = f"target[{index}] ({target_name(target, index)})"
                if target.containers:  # each server found in a container now, as run takes it
                    paths = [(f" in {s.name}", f"/proc/{s.host_pid}/exe") for s in assigned[index]]
                    if not paths:
                        print(f"{name}: no server in a container now")
                else:
                    paths = [("", resolve_binary_path(target, index))]
                for where, path in paths:
                    print(f"{name}{where}:")
                    try:
                        print("\n".join(preflight.describe_probes(path)))
                    except UserError as error:
                        if not where:
                            raise
                        print(f"  {error}")  # that container's server, gone meanwhile
            return 0
        if arguments.command == "check":
            from pgslowlog import preflight

            return preflight.main(arguments.config)
        if arguments.command == "schema":
            from pgslowlog.plugins.clickhouse_schema import DEFAULT_TABLE, ddl, valid_name

            table = arguments.table or DEFAULT_TABLE
            for name, value in (("--table", table), ("--cluster", arguments.cluster)):
                if value is not None and not valid_name(value, dotted=name == "--table"):
                    raise UserError(
                        f"{name} {value!r} is not a ClickHouse name",
                        "use letters, digits and _ (and DATABASE.NAME for --table)",
                    )
            print(ddl(table, arguments.cluster, arguments.modern), end="")
            return 0
        from pgslowlog import demo

        return demo.main(arguments.threshold_ms)
    except UserError as error:
        print(f"pgslowlog: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

"""The `pgslowlog` command: run, check, demo."""

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
    check.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="TOML config file")
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
            from pgslowlog.daemon import Daemon

            return Daemon(arguments.config).run()
        if arguments.command == "check":
            from pgslowlog import preflight

            return preflight.main(arguments.config)
        from pgslowlog import demo

        return demo.main(arguments.threshold_ms)
    except UserError as error:
        print(f"pgslowlog: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

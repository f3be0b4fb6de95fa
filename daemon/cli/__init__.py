"""The ``runrelay`` command: a thin layer over ``daemon.service`` (exit codes in docs/cli.md).

One module per command (``deliver``: daemon and sync), each with its parser, its handler
and its rendering; the errors a user can fix are handled here, once.
"""

from __future__ import annotations

import argparse
import sys

from runrelay.daemon.cli import deliver, demo, dlq, journal, status
from runrelay.daemon.cli.options import EXITS_DELIVER, delivery_options, journal_options
from runrelay.daemon.config import ConfigError
from runrelay.daemon.errors import EXIT_USAGE, UserError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as error:
        for problem in error.problems:
            print(f"runrelay: config: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except UserError as error:
        print(f"runrelay: {error}", file=sys.stderr)
        return EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runrelay",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Crash-safe recording of ML experiments: replay the local journal into your sinks.",
        epilog="example:\n  runrelay demo                      # see it work, no server needed\n"
               "  runrelay daemon --sink sqlite:////var/lib/runrelay/runs.sqlite\n\n" + EXITS_DELIVER,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = delivery_options()
    deliver.add_commands(commands, common)
    status.add_commands(commands, common)
    dlq.add_commands(commands, common)
    demo.add_commands(commands)
    journal.add_commands(commands, journal_options())
    return parser

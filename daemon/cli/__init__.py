"""The ``runrelay`` command: a thin layer over ``daemon.service`` (exit codes in docs/cli.md).

One module per command (``deliver``: daemon and sync), each with its parser, its handler
and its rendering; the errors a user can fix are handled here, once.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from runrelay import __version__
from runrelay.daemon.cli import deliver, demo, dlq, exec, journal, status, watchdog
from runrelay.daemon.cli.options import EXITS_DELIVER, delivery_options, help_when_bare, journal_options
from runrelay.daemon.config import ConfigError
from runrelay.daemon.errors import EXIT_SIGNALLED, EXIT_USAGE, UserError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
            return args.func(args)
        finally:
            sys.stdout.flush()  # so that a closed pipe shows here, not at the interpreter's exit
    except ConfigError as error:
        for problem in error.problems:
            print(f"runrelay: config: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except UserError as error:
        print(f"runrelay: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `runrelay journal ls | head -1`: stop quietly, as `yes | head -1` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return EXIT_SIGNALLED + signal.SIGPIPE
    except KeyboardInterrupt:  # e.g. `journal cat --follow`; daemon and sync handle SIGINT themselves
        return EXIT_SIGNALLED + signal.SIGINT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runrelay",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Crash-safe recording of ML experiments: replay the local journal into your sinks.",
        epilog="example:\n  runrelay demo                      # see it work, no server needed\n"
               "  runrelay daemon --sink sqlite:////var/lib/runrelay/runs.sqlite\n\n" + EXITS_DELIVER,
    )
    parser.add_argument("--version", action="version", version=f"runrelay {__version__}")
    commands = help_when_bare(parser, "command")
    common = delivery_options()
    deliver.add_commands(commands, common)
    status.add_commands(commands, common)
    watchdog.add_commands(commands, common)
    dlq.add_commands(commands, common)
    demo.add_commands(commands)
    journal.add_commands(commands, journal_options())
    exec.add_commands(commands)
    return parser

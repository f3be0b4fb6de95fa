"""What the commands share: their options, the layout of their help, reading the configuration."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from pathlib import Path

from runrelay.daemon.config import Config, load
from runrelay.daemon.errors import EXIT_USAGE

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Libraries' loggers and the lowest level they may log at: at DEBUG watchdog logs every
# inotify event; psycopg warns "error ignored terminating <Copy>" when a server dies
# mid-batch, which the sink's own error (and the daemon's outage lines) already says.
LIBRARY_LOG_FLOORS = {"watchdog": logging.INFO, "psycopg": logging.ERROR}
HELP_WIDTH = 79

EXITS_DELIVER = """\
exit codes:
  0  done: everything delivered (daemon: stopped cleanly)
  1  something is left undelivered (a sink unreachable past the retry budget,
     events in the dead-letter queue, a corrupt run), or a loop crashed
  2  usage or configuration error; nothing was done"""
EXITS_INSPECT = """\
exit codes:
  0  shown
  2  usage or configuration error"""


def journal_options() -> argparse.ArgumentParser:
    """Where the journal is: every command that reads it takes these, and finds it by one rule."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, metavar="FILE",
                        help="TOML config file (default: $RUNRELAY_CONFIG, else runrelay.toml in $RUNRELAY_HOME "
                             "or ~/.config/runrelay, if present)")
    common.add_argument("--journal", type=Path, metavar="DIR", help="journal directory (env RUNRELAY_JOURNAL)")
    return common


def delivery_options() -> argparse.ArgumentParser:
    """The options of the commands that deliver or look at what was delivered."""
    common = argparse.ArgumentParser(add_help=False, parents=[journal_options()])
    common.add_argument("--state", type=Path, metavar="DIR", help="state directory (env RUNRELAY_STATE)")
    common.add_argument("--sink", dest="sinks", action="append", metavar="URL|NAME",
                        help="a sink URL (NAME=URL names it); repeat for several; replaces the configured sinks "
                             "(env RUNRELAY_SINKS, comma-separated). Or the name of a configured sink, to pick it")
    common.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level on stderr (env RUNRELAY_LOG_LEVEL; default INFO)")
    return common


def help_when_bare(parser: argparse.ArgumentParser, dest: str, metavar: str = "COMMAND"):
    """The parser's sub-commands; given none, the parser prints its help on stderr and exits 2."""

    def show_help(args) -> int:
        parser.print_help(sys.stderr)
        return EXIT_USAGE

    parser.set_defaults(func=show_help)
    return parser.add_subparsers(metavar=metavar, dest=dest)


def add_command(commands, name: str, parents: list[argparse.ArgumentParser], help: str, description: str,
                example: str, exits: str = EXITS_DELIVER) -> argparse.ArgumentParser:
    """A command whose help has a filled description, then an example and its exit codes."""
    return commands.add_parser(name, parents=parents, help=help,
                               description=textwrap.fill(description, HELP_WIDTH),
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog=f"example:\n  {example}\n\n{exits}")


def config_from(args: argparse.Namespace) -> Config:
    """The configuration from every layer, the command line last; logging set up from it."""
    overrides = {key: getattr(args, key, None) for key in ("journal", "state", "sinks", "log_level")}
    config = load(args.config, overrides)
    logging.basicConfig(level=config.log_level, format=LOG_FORMAT, stream=sys.stderr, force=True)
    for library, floor in LIBRARY_LOG_FLOORS.items():
        logging.getLogger(library).setLevel(max(floor, logging.getLogger().level))
    return config

"""``runrelay exec``: run any command as a run (docs/exec.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from runrelay.daemon.cli.options import add_command
from runrelay.daemon.errors import UserError
from runrelay.eventlog import command
from runrelay.eventlog.location import default_journal_dir

EXITS_EXEC = """\
exit codes:
  N        the command's own exit status (a failed run when N is not 0)
  128+N    the command was ended by signal N (an interrupted or failed run)
  126/127  the command could not be run / was not found
  2        usage error (bad --config or --config-file); nothing was run"""


def add_commands(commands) -> None:
    parser = add_command(commands, "exec", [], help="run any command as a run", description=(
        "Run COMMAND as a run: its config, host, start and end, its stdout and stderr (passed "
        "through unchanged and recorded), and its exit status (0 completed, non-zero failed with "
        "stderr's tail as the trace, a stop signal interrupted). The command reports metrics, "
        "artifacts, info and its result with Recorder (Python) or with lines on the file "
        "descriptor $RUNRELAY_FD (docs/exec.md). SIGTERM, SIGINT and SIGHUP are passed on; "
        "the command gets --kill-after seconds, then SIGKILL. If the journal cannot be written, "
        "the command still runs."),
        example="runrelay exec --config lr=0.01 --config seed=3 --artifact 'out/*.pt' -- python train.py",
        exits=EXITS_EXEC)
    parser.add_argument("--name", help="the experiment's name (default: the command's base name)")
    parser.add_argument("--config", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="one config value (VALUE as JSON, else a string; KEY may be dotted); repeatable")
    parser.add_argument("--config-file", dest="config_files", action="append", default=[], type=Path,
                        metavar="FILE", help="config from a JSON file (TOML if it ends in .toml); repeatable, "
                                             "applied before --config")
    parser.add_argument("--artifact", dest="artifacts", action="append", default=[], metavar="GLOB",
                        help="files to keep as artifacts when the command exits (** matches directories); "
                             "repeatable")
    parser.add_argument("--journal", type=Path, metavar="DIR",
                        help="journal directory (env RUNRELAY_JOURNAL, else $RUNRELAY_HOME/journal)")
    parser.add_argument("--heartbeat", type=_seconds, default=command.DEFAULT_HEARTBEAT_SECONDS,
                        metavar="SECONDS", help="seconds between heartbeats (default %(default)g)")
    parser.add_argument("--kill-after", type=_seconds, default=command.DEFAULT_KILL_AFTER_SECONDS,
                        metavar="SECONDS", help="after a stop signal, seconds before SIGKILL (default %(default)g)")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG ...]")
    parser.set_defaults(func=_exec)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _exec(args) -> int:
    argv = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not argv:
        raise UserError("exec: give the command after --, e.g. runrelay exec -- python train.py")
    try:
        config = command.build_config(args.config_files, args.assignments)
    except command.ConfigProblem as error:
        raise UserError(f"exec: {error}") from None
    return command.run_command(command.ExecOptions(
        command=argv, journal_dir=args.journal or default_journal_dir(), config=config, name=args.name,
        artifacts=tuple(args.artifacts), heartbeat_seconds=args.heartbeat, kill_after_seconds=args.kill_after))

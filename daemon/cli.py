"""The ``runrelay`` command: a thin layer over ``daemon.service`` (exit codes in docs/cli.md)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
from pathlib import Path

from runrelay.daemon import service
from runrelay.daemon.config import ConfigError, load
from runrelay.daemon.demo import run_demo
from runrelay.daemon.journal_cli import add_journal_commands
from runrelay.daemon.errors import EXIT_OK, EXIT_UNDELIVERED, EXIT_USAGE, UserError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_EXIT_CODES = """\
exit codes:
  0  done: everything delivered (daemon: stopped cleanly)
  1  something is left undelivered (a sink unreachable past the retry budget,
     events in the dead-letter queue, a corrupt run), or a loop crashed
  2  usage or configuration error; nothing was done"""
_EXIT_INSPECT = """\
exit codes:
  0  shown
  2  usage or configuration error"""


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
               "  runrelay daemon --sink sqlite:////var/lib/runrelay/runs.sqlite\n\n" + _EXIT_CODES,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common_options()

    daemon = _command(commands, "daemon", common, help="deliver continuously (the service)", description=(
        "Run in the foreground, delivering every journaled run to every sink as it is written. "
        "Logs go to stderr. SIGTERM or SIGINT: finish the batch in flight, save cursors, exit 0 "
        "(within shutdown_seconds); a second signal aborts. Speaks systemd's notify protocol "
        "when NOTIFY_SOCKET is set."),
        example="runrelay daemon --journal ~/journal --state ~/state --sink sqlite:///$HOME/runs.sqlite")
    daemon.set_defaults(func=_daemon)

    sync = _command(commands, "sync", common, help="deliver everything pending once, then exit", description=(
        "Deliver everything pending to every sink with a progress bar on stderr, then exit. "
        "Exit 1 if anything is left undelivered."),
        example="runrelay sync --sink postgresql+psycopg://runrelay@db/runs || runrelay status")
    sync.add_argument("--no-progress", action="store_true", help="no progress bar")
    sync.set_defaults(func=_sync)

    status = _command(commands, "status", common, help="what is pending, per sink", description=(
        "Per sink: pending events and runs, age of the oldest pending event, retries, dead-letter "
        "queue size, last error, corrupt runs. Reads the journal and the state only: works with "
        "no daemon running and with a sink down."),
        example="runrelay status --json | jq '.sinks[].pending_events'", exits=_EXIT_INSPECT)
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(func=_status)

    _add_dlq_commands(commands, common)

    demo = commands.add_parser("demo", help="run three Sacred experiments and replay them into SQLite",
                               formatter_class=argparse.RawDescriptionHelpFormatter, description=textwrap.fill(
                                   "Run three small Sacred experiments journaled by runrelay (one completes, "
                                   "one fails, one is killed with SIGKILL mid-run), replay them into "
                                   "sqlite:///DIR/runs.sqlite the way `runrelay sync` does, and print the runs. "
                                   "No server and no network needed.", 79),
                               epilog="example:\n  runrelay demo --dir /tmp/runrelay-demo\n\n"
                                      "exit codes:\n  0  the demo ran\n  1  a step failed (the message says which)"
                                      "\n  2  --dir is not a new or empty directory")
    demo.add_argument("--dir", type=Path, default=Path("runrelay-demo"),
                      help="a new or empty directory for the demo (default: ./runrelay-demo)")
    demo.set_defaults(func=_demo)

    add_journal_commands(commands)
    return parser


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, metavar="FILE",
                        help="TOML config file (default: $RUNRELAY_CONFIG, else runrelay.toml in $RUNRELAY_HOME "
                             "or ~/.config/runrelay, if present)")
    common.add_argument("--journal", type=Path, metavar="DIR", help="journal directory (env RUNRELAY_JOURNAL)")
    common.add_argument("--state", type=Path, metavar="DIR", help="state directory (env RUNRELAY_STATE)")
    common.add_argument("--sink", dest="sinks", action="append", metavar="URL|NAME",
                        help="a sink URL (NAME=URL names it); repeat for several; replaces the configured sinks "
                             "(env RUNRELAY_SINKS, comma-separated). Or the name of a configured sink, to pick it")
    common.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level on stderr (env RUNRELAY_LOG_LEVEL; default INFO)")
    return common


def _command(commands, name: str, common, help: str, description: str, example: str,
             exits: str = _EXIT_CODES) -> argparse.ArgumentParser:
    return commands.add_parser(name, parents=[common], help=help, description=textwrap.fill(description, 79),
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog=f"example:\n  {example}\n\n{exits}")


def _add_dlq_commands(commands, common) -> None:
    dlq = commands.add_parser("dlq", help="list, retry or drop dead-lettered events", description=textwrap.fill(
        "Events a sink refused for good (a permanent error) wait in its dead-letter queue. "
        "List them, re-drive them once the cause is fixed, or drop them.", 79),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  runrelay dlq list\n  runrelay dlq retry --all")
    actions = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    listing = _command(actions, "list", common, help="show the dead letters", description=(
        "One line per dead letter: id, sink, run, seq, kind, attempts, when refused, why."),
        example="runrelay dlq list --json", exits=_EXIT_INSPECT)
    listing.add_argument("--json", action="store_true", help="print a JSON array (includes each event, base64)")
    listing.set_defaults(func=_dlq_list)

    for name, verb, func in (("retry", "re-drive", _dlq_retry), ("drop", "delete", _dlq_drop)):
        action = _command(actions, name, common, help=f"{verb} dead letters by id, or all", description=(
            f"{verb.capitalize()} the given dead letters (ids from `runrelay dlq list`), or --all. "
            + ("Each run's letters go to the sink again as one batch; a delivered letter leaves the "
               "queue, a refused one stays with its new reason. Exit 1 if any stays." if name == "retry" else
               "A dropped letter is gone for good.")),
            example=f"runrelay dlq {name} 3 4" if name == "retry" else "runrelay dlq drop --all",
            exits=_EXIT_CODES if name == "retry" else _EXIT_INSPECT)
        action.add_argument("ids", nargs="*", type=int, metavar="ID", help="dead letter id")
        action.add_argument("--all", action="store_true", help="every dead letter")
        action.set_defaults(func=func)


# --- commands -------------------------------------------------------------------------------


def _config(args):
    overrides = {"journal": args.journal, "state": args.state, "sinks": args.sinks, "log_level": args.log_level}
    config = load(args.config, overrides)
    logging.basicConfig(level=config.log_level, format=LOG_FORMAT, stream=sys.stderr, force=True)
    return config


def _daemon(args) -> int:
    return service.run_daemon(_config(args))


def _sync(args) -> int:
    report = service.run_sync(_config(args), progress=not args.no_progress)
    print(f"delivered {report.delivered} event(s)")
    for problem in report.problems:
        print(f"runrelay: undelivered: {problem}", file=sys.stderr)
    return report.exit_code


def _status(args) -> int:
    status = service.collect_status(_config(args))
    if args.json:
        print(json.dumps(status, indent=2))
        return EXIT_OK
    pid = status["daemon_pid"]
    print(f"journal  {status['journal']}")
    print(f"state    {status['state']}")
    print(f"daemon   {'running (pid %s)' % pid if pid else 'not running'}")
    for sink in status["sinks"]:
        oldest = sink["oldest_pending_seconds"]
        where = "" if sink["configured"] else "  (not configured now; known from the state)"
        print(f"\nsink {sink['sink']}{where}")
        if sink["identity"] and sink["identity"] != sink["sink"]:
            print(f"  target       {sink['identity']}")
        print(f"  condition    {sink['condition']}")
        print(f"  pending      {sink['pending_events']} event(s) in {sink['pending_runs']} run(s)"
              + (f", oldest {oldest:.1f} s old" if oldest is not None else ""))
        print(f"  retries      {sink['retries']}" + (f", failing since {sink['failing_since']}"
                                                     if sink["failing_since"] else ""))
        print(f"  dead letters {sink['dead_letters']}")
        print(f"  last error   {sink['last_error'] or '-'}")
        for run, reason in sink["corrupt_runs"].items():
            print(f"  CORRUPT run  {run}: {reason}")
    return EXIT_OK


def _dlq_list(args) -> int:
    letters = service.list_letters(_config(args))
    if args.json:
        print(json.dumps([letter.as_json() for letter in letters], indent=2))
        return EXIT_OK
    if not letters:
        print("no dead letters")
    for letter in letters:
        print(f"{letter.id:>5}  {letter.sink}  {letter.run} seq {letter.seq} {letter.kind}  "
              f"attempts {letter.attempts}  {letter.time}\n       {letter.reason}")
    return EXIT_OK


def _chosen(args, config):
    if bool(args.ids) == bool(args.all):
        raise UserError(f"give dead letter ids or --all (see runrelay dlq list), "
                        f"e.g. runrelay dlq {args.dlq_command} 3")
    return service.choose_letters(config, None if args.all else args.ids)


def _dlq_retry(args) -> int:
    config = _config(args)
    report = service.retry_letters(config, _chosen(args, config))
    print(f"re-delivered {report.delivered} dead letter(s)")
    for problem in report.problems:
        print(f"runrelay: {problem}", file=sys.stderr)
    return EXIT_UNDELIVERED if report.problems else EXIT_OK


def _dlq_drop(args) -> int:
    config = _config(args)
    print(f"dropped {service.drop_letters(config, _chosen(args, config))} dead letter(s)")
    return EXIT_OK


def _demo(args) -> int:
    logging.basicConfig(level="WARNING", format=LOG_FORMAT, stream=sys.stderr, force=True)
    return run_demo(args.dir)


if __name__ == "__main__":
    sys.exit(main())

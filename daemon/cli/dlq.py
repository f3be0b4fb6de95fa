"""``runrelay dlq list|retry|drop``: the events sinks refused for good."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

from runrelay.daemon import service
from runrelay.daemon.cli.options import (EXITS_DELIVER, EXITS_INSPECT, HELP_WIDTH, add_command, config_from,
                                         help_when_bare)
from runrelay.daemon.errors import EXIT_OK, EXIT_UNDELIVERED, UserError


def add_commands(commands, common) -> None:
    dlq = commands.add_parser("dlq", help="list, retry or drop dead-lettered events", description=textwrap.fill(
        "Events a sink refused for good (a permanent error) wait in its dead-letter queue. "
        "List them, re-drive them once the cause is fixed, or drop them.", HELP_WIDTH),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  runrelay dlq list\n  runrelay dlq retry --all")
    actions = help_when_bare(dlq, "dlq_command", "ACTION")
    listing = add_command(actions, "list", [common], help="show the dead letters", description=(
        "One line per dead letter: id, sink, run, seq, kind, attempts, when refused, why."),
        example="runrelay dlq list --json", exits=EXITS_INSPECT)
    listing.add_argument("--json", action="store_true", help="print a JSON array (includes each event, base64)")
    listing.set_defaults(func=_list)

    retry = add_command(actions, "retry", [common], help="re-drive dead letters by id, or all", description=(
        "Re-drive the given dead letters (ids from `runrelay dlq list`), or --all. Each run's letters "
        "go to the sink again as one batch; a delivered letter leaves the queue, a refused one stays "
        "with its new reason. Exit 1 if any stays."),
        example="runrelay dlq retry 3 4", exits=EXITS_DELIVER)
    drop = add_command(actions, "drop", [common], help="delete dead letters by id, or all", description=(
        "Delete the given dead letters (ids from `runrelay dlq list`), or --all. "
        "A dropped letter is gone for good."),
        example="runrelay dlq drop --all", exits=EXITS_INSPECT)
    for action, func in ((retry, _retry), (drop, _drop)):
        action.add_argument("ids", nargs="*", type=int, metavar="ID", help="dead letter id")
        action.add_argument("--all", action="store_true", help="every dead letter")
        action.set_defaults(func=func)


def _list(args) -> int:
    letters = service.list_letters(config_from(args))
    if args.json:
        print(json.dumps([letter.as_json() for letter in letters], indent=2))
        return EXIT_OK
    if not letters:
        print("no dead letters")
    for letter in letters:
        print(f"{letter.id:>5}  {letter.sink}  {letter.run} seq {letter.seq} {letter.kind}  "
              f"attempts {letter.attempts}  {letter.time}\n       {letter.reason}")
    return EXIT_OK


def _retry(args) -> int:
    config = config_from(args)
    report = service.retry_letters(config, _chosen(args, config))
    print(f"re-delivered {report.delivered} dead letter(s)")
    for problem in report.problems:
        print(f"runrelay: {problem}", file=sys.stderr)
    return EXIT_UNDELIVERED if report.problems else EXIT_OK


def _drop(args) -> int:
    config = config_from(args)
    print(f"dropped {service.drop_letters(config, _chosen(args, config))} dead letter(s)")
    return EXIT_OK


def _chosen(args, config):
    if bool(args.ids) == bool(args.all):
        raise UserError(f"give dead letter ids or --all (see runrelay dlq list), "
                        f"e.g. runrelay dlq {args.dlq_command} 3")
    return service.choose_letters(config, None if args.all else args.ids)

"""``runrelay journal ls|cat|verify``: look into the journal without any sink."""

from __future__ import annotations

import base64
import datetime as dt
import json
import sys

from runrelay.daemon import service
from runrelay.daemon.cli.options import add_command, config_from, help_when_bare
from runrelay.daemon.errors import EXIT_CORRUPT, EXIT_OK, UserError
from runrelay.eventlog.errors import JournalCorrupt, RunUnreadable, UnknownRun
from runrelay.eventlog.events import Event
from runrelay.eventlog.fold import MalformedEvent, RunState, fold_event, passed
from runrelay.eventlog.reader import Journal

EXITS_JOURNAL = """\
exit codes:
  0  done (verify: every record checks; a torn tail is normal, not an error)
  1  a corrupt run (the message names the segment and byte offset)
  2  usage or configuration error, no such journal or run"""


def add_commands(commands, common) -> None:
    journal = commands.add_parser(
        "journal",
        help="list, print and verify journaled runs",
        description="Read the local journal directly (no sink, no daemon needed).",
        epilog="example: runrelay journal ls && runrelay journal verify",
    )
    actions = help_when_bare(journal, "journal_command")

    ls = add_command(actions, "ls", [common], help="list runs with their status and event count",
                     description="List every run in the journal, oldest first.",
                     example="runrelay journal ls --json", exits=EXITS_JOURNAL)
    ls.add_argument("--json", action="store_true", help="one JSON object per run")
    ls.set_defaults(func=_ls)

    cat = add_command(actions, "cat", [common], help="print a run's events as JSON lines", description=(
        "Print one JSON object per event: run, seq, kind, time (ISO 8601, UTC), body. "
        "Datetimes in bodies print as ISO 8601 strings, bytes as {\"$base64\": ...}, "
        "non-finite floats as NaN / Infinity / -Infinity."),
        example="runrelay journal cat 0193b2c4 --from 10 --follow", exits=EXITS_JOURNAL)
    cat.add_argument("run", help="run uid, or a unique prefix of one")
    cat.add_argument("--from", dest="from_seq", type=int, default=0, metavar="SEQ", help="first seq to print")
    cat.add_argument("--follow", action="store_true",
                     help="keep printing as the run appends, until it ends or its process is gone")
    cat.set_defaults(func=_cat)

    verify = add_command(actions, "verify", [common], help="check every record's checksums and every blob",
                         description=(
        "Check the checksums of one run, or of every run, and each blob against its SHA-256. Exit 0 "
        "when all records and blobs check (a torn tail left by a crashed writer is normal and "
        "reported, not an error); exit 1 on corruption, naming the segment and byte offset, on a "
        "run that cannot be read, and on a blob that is damaged, missing or not a regular file."),
        example="runrelay journal verify && echo journal ok", exits=EXITS_JOURNAL)
    verify.add_argument("run", nargs="?", help="run uid or unique prefix (default: every run)")
    verify.set_defaults(func=_verify)


def _journal(args) -> Journal:
    return service.open_journal(config_from(args))


def _resolve(journal: Journal, prefix: str) -> str:
    matches = [run for run in journal.runs() if run.startswith(prefix.lower())]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise UserError(f"no run matching {prefix!r} in {journal.root} (see: runrelay journal ls)")
    raise UserError(f"{prefix!r} matches {len(matches)} runs; give more of the uid")


def _ls(args) -> int:
    journal = _journal(args)
    for run in journal.runs():
        summary = _summarize(journal, run)
        if args.json:
            print(json.dumps(summary))
        else:
            flag = {"ok": "", "torn": "  (torn tail)", "corrupt": "  CORRUPT", "unreadable": "  UNREADABLE",
                    "gone": "  (removed meanwhile)"}[summary["journal"]]
            if summary["malformed"]:
                flag += f"  ({summary['malformed']} malformed)"
            status = summary["status"] or "-"
            print(f"{run}  {status:<11} {summary['events']:>8} events{flag}")
    return EXIT_OK


def _summarize(journal: Journal, run: str) -> dict:
    """The run's status, how many events it has and how many of them are malformed, and
    whether its journal is whole."""
    state = RunState(run)
    events = malformed = 0
    health = "ok"
    try:
        for events, (event, _) in enumerate(journal.read(run), start=1):
            try:
                state = fold_event(state, event)
            except MalformedEvent:
                state = passed(state, event.seq)
                malformed += 1
        if journal.verify(run).torn:
            health = "torn"
    except RunUnreadable:
        health = "unreadable"
    except JournalCorrupt:
        health = "corrupt"
    except UnknownRun:
        health = "gone"
    return {"run": run, "status": state.status, "events": events, "malformed": malformed, "journal": health}


def _cat(args) -> int:
    journal = _journal(args)
    run = _resolve(journal, args.run)
    events = journal.follow(run, args.from_seq) if args.follow else journal.events(run, args.from_seq)
    try:
        for event in events:
            print(event_json(event), flush=args.follow)
    except JournalCorrupt as corrupt:
        print(f"runrelay: {corrupt}", file=sys.stderr)
        return EXIT_CORRUPT
    return EXIT_OK


def event_json(event: Event) -> str:
    record = {
        "run": event.run,
        "seq": event.seq,
        "kind": event.kind.value,
        "time": event.time.isoformat(),
        "body": event.body,
    }
    return json.dumps(record, default=_plain, ensure_ascii=False)


def _plain(value):
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return {"$base64": base64.b64encode(value).decode("ascii")}
    raise TypeError(f"unexpected {type(value).__name__} in a journal body")


def _verify(args) -> int:
    journal = _journal(args)
    runs = [_resolve(journal, args.run)] if args.run else journal.runs()
    corrupt = 0
    for run in runs:
        try:
            check = journal.verify(run, blobs=True)
        except UnknownRun:
            print(f"{run}  removed meanwhile")
            continue
        if not check.ok:
            corrupt += 1
        if isinstance(check.corrupt, RunUnreadable):
            print(f"{run}  UNREADABLE: {check.corrupt}")
        elif check.corrupt:
            print(f"{run}  CORRUPT after {check.records} good records: {check.corrupt.segment} "
                  f"byte {check.corrupt.offset}: {check.corrupt.reason}")
        if check.blobs:
            print(f"{run}  CORRUPT blobs: {'; '.join(check.blobs)}")
        if not check.ok:
            continue
        if check.torn:
            print(f"{run}  ok, {check.records} records, torn tail at {check.torn}")
        else:
            print(f"{run}  ok, {check.records} records")
    if corrupt:
        print(f"{corrupt} of {len(runs)} runs corrupt", file=sys.stderr)
        return EXIT_CORRUPT
    return EXIT_OK

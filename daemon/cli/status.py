"""``runrelay status``: what is pending, per sink."""

from __future__ import annotations

import json

from runrelay.daemon import service
from runrelay.daemon.cli.options import EXITS_INSPECT, add_command, config_from
from runrelay.daemon.errors import EXIT_OK


def add_commands(commands, common) -> None:
    status = add_command(commands, "status", [common], help="what is pending, per sink", description=(
        "Per sink: pending events and runs, age of the oldest pending event, retries, dead-letter "
        "queue size, last error, corrupt runs; then this host's runs that are stalled (a live "
        "process whose journal stopped growing) or dead without a verdict yet. Reads the journal "
        "and the state only: works with no daemon running and with a sink down."),
        example="runrelay status --json | jq '.sinks[].pending_events'", exits=EXITS_INSPECT)
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(func=_status)


def _status(args) -> int:
    status = service.collect_status(config_from(args))
    print(json.dumps(status, indent=2) if args.json else render(status))
    return EXIT_OK


def render(status: dict) -> str:
    pid = status["daemon_pid"]
    lines = [f"journal  {status['journal']}",
             f"state    {status['state']}",
             f"daemon   {'running (pid %s)' % pid if pid else 'not running'}"]
    for sink in status["sinks"]:
        oldest = sink["oldest_pending_seconds"]
        where = "" if sink["configured"] else "  (not configured now; known from the state)"
        lines.append(f"\nsink {sink['sink']}{where}")
        if sink["identity"] and sink["identity"] != sink["sink"]:
            lines.append(f"  target       {sink['identity']}")
        lines.append(f"  condition    {sink['condition']}")
        lines.append(f"  pending      {sink['pending_events']} event(s) in {sink['pending_runs']} run(s)"
                     + (f", oldest {oldest:.1f} s old" if oldest is not None else ""))
        lines.append(f"  retries      {sink['retries']}"
                     + (f", failing since {sink['failing_since']}" if sink["failing_since"] else ""))
        lines.append(f"  dead letters {sink['dead_letters']}")
        lines.append(f"  last error   {sink['last_error'] or '-'}")
        lines += [f"  CORRUPT run  {run}: {reason}" for run, reason in sink["corrupt_runs"].items()]
    if status["runs"]:
        lines.append("\nruns on this host")
        lines += [f"  {run['condition'].upper():8} {run['run']}: {run['reason']}" for run in status["runs"]]
    return "\n".join(lines)

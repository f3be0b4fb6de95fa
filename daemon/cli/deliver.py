"""``runrelay daemon`` and ``runrelay sync``: deliver the journal to the sinks."""

from __future__ import annotations

import sys

from runrelay.daemon import service
from runrelay.daemon.cli.options import add_command, config_from


def add_commands(commands, common) -> None:
    daemon = add_command(commands, "daemon", [common], help="deliver continuously (the service)", description=(
        "Run in the foreground, delivering every journaled run to every sink as it is written. "
        "Logs go to stderr. SIGTERM or SIGINT: finish the batch in flight, save cursors, exit 0 "
        "(within shutdown_seconds); a second signal aborts. Speaks systemd's notify protocol "
        "when NOTIFY_SOCKET is set."),
        example="runrelay daemon --journal ~/journal --state ~/state --sink sqlite:///$HOME/runs.sqlite")
    daemon.set_defaults(func=_daemon)

    sync = add_command(commands, "sync", [common], help="deliver everything pending once, then exit", description=(
        "Judge this host's runs once (a run whose process died without an ending gets a `died` "
        "verdict, as the daemon does), deliver everything pending to every sink with a progress "
        "bar on stderr, then exit. Exit 1 if anything is left undelivered."),
        example="runrelay sync --sink postgresql+psycopg://runrelay@db/runs || runrelay status")
    sync.add_argument("--no-progress", action="store_true", help="no progress bar")
    sync.set_defaults(func=_sync)


def _daemon(args) -> int:
    return service.run_daemon(config_from(args))


def _sync(args) -> int:
    report = service.run_sync(config_from(args), progress=not args.no_progress)
    print(f"delivered {report.delivered} event(s)")
    for problem in report.problems:
        print(f"runrelay: undelivered: {problem}", file=sys.stderr)
    return report.exit_code

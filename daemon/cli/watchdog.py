"""``runrelay watchdog``: central verdicts for runs whose host went silent."""

from __future__ import annotations

from runrelay.daemon import service
from runrelay.daemon.cli.options import add_command, config_from

EXITS_WATCHDOG = """\
exit codes:
  0  done (--once), or stopped by SIGTERM/SIGINT
  2  usage or configuration error, or no configured sink takes central verdicts"""


def add_commands(commands, common) -> None:
    watchdog = add_command(commands, "watchdog", [common], help="mark the runs of silent hosts dead", description=(
        "For hosts whose daemon went silent (power loss, a lost node, a partition): in every configured "
        "sink that takes central verdicts (SQL, Mongo, FileStorage), mark dead each RUNNING run whose "
        "heartbeat is older than watchdog.stale_seconds and whose host's daemon has not reported for "
        "watchdog.host_silent_seconds, with a conditional write, so several watchdogs at once write each "
        "verdict once (a FileStorage store that ignores a conditional write is named and left out). A run "
        "whose host comes back gets its real history again. Runs every watchdog.every_seconds until "
        "stopped; --once for cron."),
        example="runrelay watchdog --once --sink postgresql+psycopg://runrelay@db/runs", exits=EXITS_WATCHDOG)
    watchdog.add_argument("--once", action="store_true", help="one pass, then exit")
    watchdog.set_defaults(func=_watchdog)


def _watchdog(args) -> int:
    return service.run_watchdog(config_from(args), once=args.once)

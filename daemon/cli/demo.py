"""``runrelay demo``: three journaled Sacred runs replayed into SQLite, no server needed.

One run completes, one fails, one is killed with SIGKILL after logging its metrics (and
is judged dead). They are delivered by ``run_sync`` (the code path of ``runrelay sync``) into
``sqlite:///<dir>/runs.sqlite``, and the runs are printed from that database. The demo
marks its directory, so that running it again replaces what an earlier demo made, and
nothing else.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from runrelay.daemon.cli.options import HELP_WIDTH, LOG_FORMAT
from runrelay.daemon.config import Config, SinkConfig
from runrelay.daemon.errors import EXIT_UNDELIVERED, UserError
from runrelay.daemon.service import run_sync
from runrelay.sinks.registry import backend

EXPERIMENT_MODULE = "runrelay.daemon.demo_experiment"
MARKER = ".runrelay-demo"  # in the demo's directory: a later demo may replace that directory
READY_TIMEOUT_SECONDS = 60.0
READY_POLL_SECONDS = 0.05
RUNS = (("completes", "complete"), ("fails", "fail"), ("is killed", "hang"))

_RUNS_QUERY = """
SELECT run.run_id, runrelay_run.uid, run.status,
       (SELECT count(*) FROM metric WHERE metric.run_id = run.run_id)
FROM run JOIN runrelay_run ON runrelay_run.run_id = run.run_id
ORDER BY run.id
"""


class DemoFailed(Exception):
    pass


def add_commands(commands) -> None:
    demo = commands.add_parser("demo", help="run three Sacred experiments and replay them into SQLite",
                               formatter_class=argparse.RawDescriptionHelpFormatter, description=textwrap.fill(
                                   "Run three small Sacred experiments journaled by runrelay (one completes, "
                                   "one fails, one is killed with SIGKILL mid-run), replay them into "
                                   "sqlite:///DIR/runs.sqlite the way `runrelay sync` does, and print the runs. "
                                   "No server and no network needed.", HELP_WIDTH),
                               epilog="example:\n  runrelay demo --dir /tmp/runrelay-demo\n\n"
                                      "exit codes:\n  0  the demo ran\n  1  a step failed (the message says which)"
                                      "\n  2  --dir is not new, empty or an earlier demo's directory")
    demo.add_argument("--dir", type=Path, default=Path("runrelay-demo"),
                      help="a new or empty directory for the demo, or an earlier demo's, which is replaced "
                           "(default: ./runrelay-demo)")
    demo.set_defaults(func=_demo)


def _demo(args) -> int:
    logging.basicConfig(level="WARNING", format=LOG_FORMAT, stream=sys.stderr, force=True)
    return run_demo(args.dir)


def run_demo(directory: Path) -> int:
    directory = directory.expanduser().absolute()
    _make_fresh(directory)
    journal, logs, database = directory / "journal", directory / "logs", directory / "runs.sqlite"
    logs.mkdir()
    print(f"runrelay demo in {directory}\n")
    try:
        for what, mode in RUNS:
            print(f"  running an experiment that {what} ...", flush=True)
            _experiment(mode, journal, logs, directory)
    except DemoFailed as error:
        print(f"runrelay: demo failed: {error}", file=sys.stderr)
        return EXIT_UNDELIVERED
    url = f"sqlite:///{database}"
    config = Config(journal=journal, state=directory / "state", sinks=(SinkConfig(backend(url).identity(url), url),))
    print("\n  replaying the journal into SQLite (as `runrelay sync` does) ...", flush=True)
    report = run_sync(config, progress=True)
    for problem in report.problems:
        print(f"runrelay: undelivered: {problem}", file=sys.stderr)
    _print_runs(database, journal, report.delivered)
    return report.exit_code


def _make_fresh(directory: Path) -> None:
    """An empty, marked ``directory``: made, or emptied when an earlier demo made it; any
    other directory with something in it is refused."""
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        raise UserError(f"{directory} is not a directory: give a new one with --dir")
    if directory.exists() and any(directory.iterdir()):
        if not (directory / MARKER).is_file():
            raise UserError(f"{directory} is not empty and no earlier demo made it: give a new directory "
                            "with --dir, or remove it")
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MARKER).write_text("made by `runrelay demo`, which replaces this directory when run again\n")


def _experiment(mode: str, journal: Path, logs: Path, directory: Path) -> None:
    ready = directory / f".{mode}-ready"
    command = [sys.executable, "-m", EXPERIMENT_MODULE, "-j", str(journal), "with", f"mode={mode}",
               f"ready_file={ready}"]
    with open(logs / f"{mode}.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=directory,
                                   start_new_session=True)
        if mode != "hang":
            code = process.wait()
            if (code == 0) != (mode == "complete"):
                raise DemoFailed(f"the {mode} experiment exited {code}; see {logs / f'{mode}.log'}")
            return
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while not ready.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise DemoFailed(f"the experiment to kill never got going; see {logs / f'{mode}.log'}")
            time.sleep(READY_POLL_SECONDS)
        os.killpg(process.pid, signal.SIGKILL)  # its whole group: Sacred's output tee too
        process.wait()
        ready.unlink()


def _print_runs(database: Path, journal: Path, delivered: int) -> None:
    with sqlite3.connect(database) as db:
        rows = db.execute(_RUNS_QUERY).fetchall()
    print(f"\n  delivered {delivered} events\n")
    print(f"  {'run id':<7} {'uid':<37} {'status':<10} metric points")
    for run_id, uid, status, points in rows:
        print(f"  {run_id:<7} {uid:<37} {status:<10} {points}")
    print(f"""
  The runs are in  {database}
    (Sacred's SqlObserver tables: run, experiment, host, source, ...; metric points in `metric`)
  The journal is   {journal}

  The killed run says DIED: its writer's lock was free with no ending in the journal, so
  the replay journaled a `died` verdict first (the daemon does so within milliseconds of a
  kill). Every metric it logged before the kill was delivered all the same.

  Try: sqlite3 {database} "SELECT run_id, status, start_time, stop_time FROM run"
       runrelay journal ls --journal {journal}""")

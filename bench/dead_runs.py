"""Dead-run detection latency: on the host (`kill -9` of a real experiment to its verdict)
and centrally (a host's power cut to `runrelay watchdog`'s verdict), beside Omniboard's
120 s "PROBABLY_DEAD" and W&B's crashed after about 5 minutes.

    python bench/dead_runs.py [--part host|central|both] [--kills N] [--trials N] [--dir DIR]

host: with `runrelay daemon` running (SQLite sink), N times (default 100): a real Python
process starts a run with runrelay's Recorder, beats and logs; it is killed with SIGKILL;
the figures are the time from the kill to the `died` verdict journaled (the verdict
record's own append time, so no polling error) and to the run's row showing `DIED` in
SQLite (polled every millisecond).

central: for each setting of the thresholds (watchdog.host_silent_seconds, stale_seconds,
every_seconds, dead_runs.report_seconds; the Recorder beating every --beat seconds), N
trials (default 3): a daemon delivers a live Recorder run into SQLite and reports its host;
`runrelay watchdog` runs as a loop; the daemon and the experiment are killed with SIGKILL
at one instant (the host's power cut: no local verdict); the figure is the time from the
kill to the row showing `DIED`. Printed beside the bounds the thresholds give: at least
max(host_silent - report, stale - beat), at most max(host_silent, stale) + every (plus the
write), and those bounds for the default thresholds.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from replay import Daemon, RUNRELAY, env  # noqa: E402

from runrelay.eventlog import Journal, Kind  # noqa: E402

GOAL_P99_SECONDS = 1.0
OMNIBOARD_SECONDS = 120.0
WANDB_SECONDS = 300.0
WAIT_SECONDS = 60.0
POLL_SECONDS = 0.001
SACRED_BEAT_SECONDS = 10.0
# (host_silent, stale, every, report) in seconds: a base setting, then each threshold raised alone
CENTRAL_SETTINGS = [(2.0, 2.0, 0.5, 0.5), (4.0, 2.0, 0.5, 0.5), (2.0, 4.0, 0.5, 0.5), (2.0, 2.0, 2.0, 0.5),
                    (2.0, 2.0, 0.5, 2.0)]
DEFAULT_SETTING = (300.0, 300.0, 60.0, 10.0)  # docs/configuration.md

PRODUCER = textwrap.dedent("""
    import sys, time
    from runrelay.eventlog.recorder import Recorder
    run = Recorder.start(journal_dir=sys.argv[1], heartbeat_seconds=float(sys.argv[2]) if sys.argv[2:] else 0.2)
    for step in range(20):
        run.log_metric("loss", 1.0 / (step + 1))
    time.sleep(0.3)  # a beat or so
    print(run.uid, flush=True)
    time.sleep(600)
""")


def kill_once(journal: Journal, database: Path) -> tuple[float, float]:
    """(seconds to the verdict journaled, seconds to DIED committed in SQLite) for one kill."""
    child = subprocess.Popen([sys.executable, "-c", PRODUCER, str(journal.root)], stdout=subprocess.PIPE, text=True)
    run = child.stdout.readline().strip()
    killed = time.time()
    child.kill()
    child.wait()
    deadline = time.monotonic() + WAIT_SECONDS
    with sqlite3.connect(database) as db:
        while not db.execute("SELECT 1 FROM run JOIN runrelay_run ON runrelay_run.run_id = run.run_id "
                             "WHERE uid = ? AND status = 'DIED'", (run,)).fetchone():
            if time.monotonic() > deadline:
                raise SystemExit(f"run {run}: no DIED row {WAIT_SECONDS:.0f} s after the kill")
            time.sleep(POLL_SECONDS)
    committed = time.time()
    [died] = [event for event in journal.events(run) if event.kind is Kind.DIED]
    return died.time.timestamp() - killed, committed - killed


def quantiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return (f"p50 {statistics.median(ordered) * 1000:7.1f} ms   p99 {p99 * 1000:7.1f} ms   "
            f"max {ordered[-1] * 1000:7.1f} ms")


def central_once(root: Path, setting: tuple[float, float, float, float], beat_seconds: float) -> float:
    """Seconds from the power cut of a host (daemon and experiment killed at once) to the
    watchdog's DIED in SQLite."""
    host_silent, stale, every, report = setting
    root.mkdir()
    journal, database = Journal(root / "journal"), root / "runs.sqlite"
    journal.root.mkdir()
    url = f"sqlite:///{database}"
    daemon = Daemon(journal.root, root / "state", url, root, RUNRELAY_DEAD_RUNS_REPORT_SECONDS=str(report))
    child = watchdog = None
    try:
        daemon.wait_ready()
        child = subprocess.Popen([sys.executable, "-c", PRODUCER, str(journal.root), str(beat_seconds)],
                                 stdout=subprocess.PIPE, text=True)
        run = child.stdout.readline().strip()
        wait_for_row(database, run, "status = 'RUNNING' AND heartbeat IS NOT NULL", "delivered")
        watchdog = subprocess.Popen(
            [str(RUNRELAY), "watchdog", "--sink", url, "--log-level", "ERROR"], stdin=subprocess.DEVNULL,
            env=env(root, RUNRELAY_WATCHDOG_HOST_SILENT_SECONDS=str(host_silent),
                    RUNRELAY_WATCHDOG_STALE_SECONDS=str(stale), RUNRELAY_WATCHDOG_EVERY_SECONDS=str(every)))
        time.sleep(1.0 + random.uniform(0.0, every))  # the cut at any phase of the watchdog's passes
        cut = time.time()
        for process in (daemon.process, child):
            os.kill(process.pid, signal.SIGKILL)
        wait_for_row(database, run, "status = 'DIED'", "marked DIED by the watchdog")
        return time.time() - cut
    finally:
        for process in (child, watchdog, daemon.process):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


def wait_for_row(database: Path, run: str, condition: str, what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        try:
            with sqlite3.connect(database) as db:
                if db.execute(f"SELECT 1 FROM run JOIN runrelay_run ON runrelay_run.run_id = run.run_id "
                              f"WHERE uid = ? AND {condition}", (run,)).fetchone():
                    return
        except sqlite3.OperationalError:  # no tables yet
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"run {run}: not {what} after {WAIT_SECONDS:.0f} s")
        time.sleep(POLL_SECONDS)


def bounds(setting: tuple[float, float, float, float], beat_seconds: float) -> tuple[float, float]:
    """The latency the thresholds allow: the host's last report and the run's last beat
    came up to ``report`` and ``beat`` before the cut; the pass that sees both stale comes
    up to ``every`` after they are."""
    host_silent, stale, every, report = setting
    return max(host_silent - report, stale - beat_seconds, 0.0), max(host_silent, stale) + every


def central(root: Path, trials: int, beat_seconds: float) -> None:
    print(f"central dead-run detection (runrelay watchdog, SQLite), a host's power cut (daemon and experiment "
          f"SIGKILLed at once), {trials} trials per setting, the Recorder beating every {beat_seconds:g} s:")
    print("  host_silent  stale  every  report  |  measured: median  (min-max)  |  thresholds allow   measured/bound")
    for index, setting in enumerate(CENTRAL_SETTINGS):
        samples = [central_once(root / f"central-{index}-{trial}", setting, beat_seconds) for trial in range(trials)]
        low, high = bounds(setting, beat_seconds)
        median = statistics.median(samples)
        print(f"  {setting[0]:9.1f} s {setting[1]:4.1f} s {setting[2]:4.1f} s {setting[3]:5.1f} s  |  "
              f"{median:8.2f} s  ({min(samples):.2f}-{max(samples):.2f} s)  |  {low:5.1f}-{high:5.1f} s   "
              f"{median / high:.2f} of the upper bound")
    low, high = bounds(DEFAULT_SETTING, SACRED_BEAT_SECONDS)
    print(f"  defaults ({DEFAULT_SETTING[0]:.0f} / {DEFAULT_SETTING[1]:.0f} / {DEFAULT_SETTING[2]:.0f} / "
          f"{DEFAULT_SETTING[3]:.0f} s, Sacred beating every {SACRED_BEAT_SECONDS:.0f} s): {low:.0f}-{high:.0f} s "
          f"after the cut, beside Omniboard's 'PROBABLY_DEAD' {OMNIBOARD_SECONDS - SACRED_BEAT_SECONDS:.0f}-"
          f"{OMNIBOARD_SECONDS:.0f} s (a label, never written) and W&B's crashed after about {WANDB_SECONDS:.0f} s")


def host(root: Path, kills: int) -> None:
    journal, database = Journal(root / "journal"), root / "runs.sqlite"
    journal.root.mkdir()
    daemon = Daemon(journal.root, root / "state", f"sqlite:///{database}", root)
    daemon.wait_ready()
    journaled, committed = [], []
    try:
        for _ in range(kills):
            to_journal, to_sink = kill_once(journal, database)
            journaled.append(to_journal)
            committed.append(to_sink)
    finally:
        daemon.stop()
    p99 = sorted(journaled)[min(len(journaled) - 1, round(0.99 * (len(journaled) - 1)))]
    print(f"dead-run detection on the host, {kills} kill -9s of a Recorder run, `runrelay daemon` running:")
    print(f"  kill -> died journaled        {quantiles(journaled)}   goal p99 <= {GOAL_P99_SECONDS:.0f} s: "
          f"{'met' if p99 <= GOAL_P99_SECONDS else 'NOT met'}")
    print(f"  kill -> DIED in SQLite        {quantiles(committed)}")
    print(f"  beside: Omniboard marks a run 'probably dead' {OMNIBOARD_SECONDS:.0f} s after its last heartbeat "
          f"({OMNIBOARD_SECONDS / statistics.median(committed):,.0f}x the median here); W&B marks it crashed after "
          f"about {WANDB_SECONDS:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["host", "central", "both"], default="both")
    parser.add_argument("--kills", type=int, default=100, help="experiments to kill on the host (default 100)")
    parser.add_argument("--trials", type=int, default=3, help="power cuts per central setting (default 3)")
    parser.add_argument("--beat", type=float, default=0.5, help="the Recorder's heartbeat in the central part (s)")
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="runrelay-bench-dead-", dir=args.dir))
    if args.part in ("host", "both"):
        host(root, args.kills)
    if args.part in ("central", "both"):
        central(root, args.trials, args.beat)


if __name__ == "__main__":
    main()

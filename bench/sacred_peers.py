"""The same Sacred experiment under each observer: what journaling costs beside Sacred's own.

    python bench/sacred_peers.py [--points N ...] [--repeat R] [--timeout S]

For each N (default 100,000 and 1,000,000) one experiment logs N points with
``_run.log_scalar`` and returns, once per setup:

  none          no observer
  file          FileStorageObserver (metrics.json written at heartbeats and the end)
  sql           SqlObserver into SQLite (Sacred's SqlObserver stores no metrics at all)
  queue(sql)    QueueObserver(SqlObserver) (a background thread; noted if it hangs)
  journal       JournalObserver alone (queryable once `runrelay sync` has delivered it)
  journal+d     JournalObserver with `runrelay daemon` running into SQLite

Printed per setup: wall time of ``ex.run()``, ``log_scalar`` µs per call (p50, each call
timed, the same timer cost in every setup), time from the run's end until its points can be
queried (FileStorage: metrics.json; journal: rows in the sink's ``metric`` table), and the
experiment process's peak RSS. Each setup runs in its own process, under ``--timeout``.

Goal (issue 7): journaling adds <= 1 us to log_scalar at p50, and a journaled run's wall time
is <= the same run with FileStorageObserver, at 100k and 1M points. Printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETUPS = ("none", "file", "sql", "queue(sql)", "journal", "journal+d")
RUNRELAY = Path(sys.executable).parent / "runrelay"
POLL_SECONDS = 0.005


def child(setup: str, place: Path, points: int) -> None:
    """One experiment in this process; prints its figures as one JSON line."""
    import resource

    from sacred import Experiment
    from sacred.observers import FileStorageObserver, QueueObserver, SqlObserver

    from runrelay.eventlog.sacred import JournalObserver

    ex = Experiment("peers", save_git_info=False)
    if setup == "file":
        ex.observers.append(FileStorageObserver(str(place / "file_storage")))
    elif setup == "sql":
        ex.observers.append(SqlObserver(f"sqlite:///{place / 'sacred.db'}"))
    elif setup == "queue(sql)":
        ex.observers.append(QueueObserver(SqlObserver(f"sqlite:///{place / 'sacred.db'}")))
    elif setup.startswith("journal"):
        ex.observers.append(JournalObserver(place / "journal"))
    samples: list[int] = []

    @ex.main
    def main(_run):
        clock, log, keep = time.perf_counter_ns, _run.log_scalar, samples.append
        for step in range(points):
            start = clock()
            log("training.loss", 1.0 / (step + 1))
            keep(clock() - start)

    begin = time.perf_counter()
    ex.run(options={"--loglevel": "ERROR"})
    wall = time.perf_counter() - begin
    print(json.dumps({"wall": wall, "p50_us": statistics.median(samples) / 1000, "end": time.time(),
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


def metric_rows(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=1) as conn:
            return conn.execute("SELECT count(*) FROM metric").fetchone()[0]
    except sqlite3.Error:
        return 0


def wait_rows(db: Path, points: int, timeout: float) -> float | None:
    """When the sink holds ``points`` metric rows (time.time()), or None after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric_rows(db) >= points:
            return time.time()
        time.sleep(POLL_SECONDS)
    return None


def env(home: Path) -> dict[str, str]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("RUNRELAY_")}
    return {**clean, "RUNRELAY_HOME": str(home)}


def one(setup: str, points: int, timeout: float) -> dict | str:
    with tempfile.TemporaryDirectory(prefix="runrelay-peers-") as directory:
        place = Path(directory)
        journal, state, db = place / "journal", place / "state", place / "sink.db"
        sink = f"sqlite:///{db}"
        daemon = None
        if setup == "journal+d":
            journal.mkdir(mode=0o700)  # the daemon wants the journal to exist
            daemon = subprocess.Popen(
                [str(RUNRELAY), "daemon", "--journal", str(journal), "--state", str(state), "--sink", sink,
                 "--log-level", "WARNING"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, env=env(place))
            time.sleep(1.0)  # started before the experiment, as on a host where it always runs
        try:
            try:
                done = subprocess.run([sys.executable, __file__, "--child", setup, str(place), str(points)],
                                      capture_output=True, text=True, timeout=timeout, env=env(place))
            except subprocess.TimeoutExpired:
                return f"hung: no end within {timeout:.0f} s"
            if done.returncode != 0:
                return f"failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}"
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            if setup == "journal+d":
                at = wait_rows(db, points, timeout)
                figures["queryable_s"] = None if at is None else max(0.0, at - figures["end"])
            elif setup == "journal":
                begin = time.time()
                synced = subprocess.run([str(RUNRELAY), "sync", "--journal", str(journal), "--state", str(state),
                                         "--sink", sink, "--log-level", "WARNING"], capture_output=True,
                                        timeout=timeout, env=env(place))
                figures["queryable_s"] = time.time() - begin if synced.returncode == 0 else None
                figures["note"] = "after `runrelay sync`, started at the run's end"
            elif setup in ("sql", "queue(sql)"):
                figures["queryable_s"] = None
                figures["note"] = "SqlObserver stores no metrics"
            else:
                figures["queryable_s"] = 0.0  # written by the time ex.run() returns
            return figures
        finally:
            if daemon is not None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(30)
                except subprocess.TimeoutExpired:
                    daemon.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=SETUPS)
    parser.add_argument("--repeat", type=int, default=1, help="runs per setup; medians are printed")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a setup counts as hung")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        setup, place, points = args.child
        return child(setup, Path(place), int(points))
    for points in args.points:
        print(f"{points:,} points, log_scalar in one loop; median of {args.repeat} run(s) per setup")
        print(f"  {'setup':<11} {'wall s':>8} {'vs file':>8} {'log_scalar p50':>15} {'vs none':>8} "
              f"{'queryable after':>16} {'peak RSS':>9}")
        results: dict[str, dict] = {}
        for setup in args.setups:
            runs = [one(setup, points, args.timeout) for _ in range(args.repeat)]
            good = [run for run in runs if isinstance(run, dict)]
            if not good:
                print(f"  {setup:<11} {runs[0]}")
                continue
            median = {key: statistics.median(run[key] for run in good) for key in ("wall", "p50_us", "rss_mb")}
            queryable = [run["queryable_s"] for run in good if run.get("queryable_s") is not None]
            median["queryable_s"] = statistics.median(queryable) if queryable else None
            results[setup] = median
            walls = ", ".join(f"{run['wall']:.2f}" for run in good)
            file_wall = results.get("file", {}).get("wall")
            none_p50 = results.get("none", {}).get("p50_us")
            vs_file = f"{median['wall'] / file_wall:7.2f}x" if file_wall else " " * 8
            vs_none = f"{median['p50_us'] - none_p50:+7.2f}" if none_p50 is not None else " " * 8
            when = "never" if median["queryable_s"] is None else f"{median['queryable_s']:.2f} s"
            note = good[0].get("note", "")
            print(f"  {setup:<11} {median['wall']:8.2f} {vs_file} {median['p50_us']:12.2f} us {vs_none} "
                  f"{when:>16} {median['rss_mb']:6.0f} MB  (walls {walls}){'  ' + note if note else ''}")
        journal, file, none = results.get("journal"), results.get("file"), results.get("none")
        if journal and file and none:
            print(f"  goal: log_scalar +{journal['p50_us'] - none['p50_us']:.2f} us at p50 (<= 1 us), "
                  f"journaled wall {journal['wall'] / file['wall']:.2f}x FileStorage's (<= 1x)")


if __name__ == "__main__":
    main()

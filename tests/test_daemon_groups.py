"""Several runs per sink transaction, proven by real crashes: SIGKILL `runrelay daemon` while
it delivers many small runs in groups (``Sink.apply_runs``: one SQL transaction and one
state transaction per group), then check that no cursor was ever ahead of the sink and that
a final `runrelay sync` leaves every event stored exactly once.
"""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from runrelay.eventlog.events import Kind
from runrelay.eventlog.writer import JournalWriter

RUNS_PER_ROUND = 200  # new runs before each daemon start, so that each kill finds work in flight
POINTS = 10
BATCH_EVENTS = "50"  # about five runs per group
KILLS = 4
KILL_AFTER_SECONDS = (0.0, 0.3)  # after the sink took the round's first run
WAIT_SECONDS = 120.0  # a generous bound, never asserted on
ENV = {"PATH": "/usr/bin:/bin", "RUNRELAY_DELIVERY_BATCH_EVENTS": BATCH_EVENTS}


def write_runs(journal: Path) -> dict[str, int]:
    """RUNS_PER_ROUND runs of a started event and POINTS points each; run -> last seq."""
    ends = {}
    for index in range(RUNS_PER_ROUND):
        with JournalWriter.create(journal) as writer:
            writer.append(Kind.STARTED, {"command": "main", "config": {"seed": index},
                                         "start_time": None, "ex_info": {"name": "groups"}})
            for step in range(POINTS):
                writer.append_metric("loss", step, step / POINTS, None)
            ends[writer.run] = writer.next_seq - 1
    return ends


def applied(database: Path) -> dict[str, int]:
    if not database.exists():
        return {}
    with sqlite3.connect(database) as db:
        try:
            return dict(db.execute("SELECT uid, applied_seq FROM runrelay_run"))
        except sqlite3.OperationalError:  # no tables yet
            return {}


def cursors(state: Path) -> dict[str, int]:
    path = state / "state.sqlite"
    if not path.exists():
        return {}
    with sqlite3.connect(path) as db:
        try:
            return dict(db.execute("SELECT run, seq FROM cursors"))
        except sqlite3.OperationalError:
            return {}


def command(journal: Path, state: Path, url: str, verb: str) -> list[str]:
    return [sys.executable, "-m", "runrelay.daemon.cli", verb, "--journal", str(journal), "--state", str(state),
            "--sink", url]


def test_a_kill_during_grouped_delivery_never_leaves_a_cursor_ahead_and_loses_nothing(tmp_path):
    rng = random.Random(20240501)
    journal, state, database = tmp_path / "journal", tmp_path / "state", tmp_path / "sink" / "runs.sqlite"
    url = f"sqlite:///{database}"
    ends: dict[str, int] = {}
    env = {**ENV, "RUNRELAY_HOME": str(tmp_path)}
    behind = in_flight = 0
    for _ in range(KILLS):
        ends.update(write_runs(journal))
        daemon = subprocess.Popen(command(journal, state, url, "daemon"), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + WAIT_SECONDS
        while len(applied(database)) <= len(ends) - RUNS_PER_ROUND and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(*KILL_AFTER_SECONDS))
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(WAIT_SECONDS)
        held, saved = applied(database), cursors(state)
        ahead = {run: (seq, held.get(run, -1)) for run, seq in saved.items() if seq > held.get(run, -1) + 1}
        assert not ahead, f"cursors ahead of the sink (next seq, applied): {ahead}"
        behind += sum(seq < held.get(run, -1) + 1 for run, seq in saved.items())
        in_flight += len(held) < len(ends)
    done = subprocess.run(command(journal, state, url, "sync") + ["--no-progress"], capture_output=True,
                          text=True, env=env, timeout=WAIT_SECONDS)
    assert done.returncode == 0, done.stderr
    assert applied(database) == ends
    with sqlite3.connect(database) as db:
        stored = Counter(db.execute("SELECT r.uid, m.step FROM metric m JOIN runrelay_run r USING (run_id)"))
        runs = db.execute("SELECT count(*) FROM run").fetchone()[0]
    assert runs == len(ends)
    assert stored == Counter((run, step) for run in ends for step in range(POINTS))
    assert in_flight, "every kill came after the round was delivered"
    print(f"\n{KILLS} SIGKILLs ({in_flight} in the middle of a round's groups), {behind} cursors left behind their "
          f"sink and caught up; every event once")

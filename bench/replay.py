"""Replay benchmark: the daemon's delivery rate beside a hand-written bulk insert, live lag, restart.

    python bench/replay.py [--points N] [--runs N] [--lag-seconds S] [--lag-rate R]
                           [--no-postgres] [--profile] [--dir DIR]

(a) events/s replaying a journal of N metric points (default 1,000,000 in 20 runs) into SQLite
    and PostgreSQL through `daemon.service.run_sync` (the code `runrelay sync` runs) and through
    `runrelay daemon` (process start to last commit), beside a bulk insert of the same rows into
    an equivalent table of the same database, same run;
(b) end-to-end lag, append -> committed in SQLite (the run's applied seq, written in the same
    transaction as its rows), p50/p99, while a producer appends R events/s for S seconds to a
    live run with `runrelay daemon` running (default batch wait, then batch_wait_seconds=0);
(c) restart-to-live: with the N events delivered and their cursors saved, the time from
    starting `runrelay daemon` until an event appended just after the start is committed.

PostgreSQL is a throwaway server from tests/servers.py, skipped (with the reason) if it cannot
start here. Run it with the venv's python (`runrelay` must be installed beside it). Figures are
printed with the goals beside them, never asserted. --profile adds a cProfile of a separate
SQLite replay's worker thread (the measured replays run without the profiler).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as dt
import io
import os
import pstats
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from runrelay.daemon import delivery, service  # noqa: E402
from runrelay.daemon.config import DEFAULT_BATCH_WAIT_SECONDS, load  # noqa: E402
from runrelay.eventlog import JournalWriter, Kind  # noqa: E402

RUNRELAY = Path(sys.executable).parent / "runrelay"
NAMES = ["training.loss", "accuracy", "lr", "grad.norm"]
T0 = dt.datetime(2024, 5, 1, 12, 0, 0)
BULK_ROWS_PER_TRANSACTION = 5000  # the daemon's default batch: same commits, same durability
GOAL_RATIO = 0.5
GOAL_SQLITE_RATE = 100_000
GOAL_LAG_P99_MS = 100.0
GOAL_RESTART_SECONDS = 1.0
WAIT_SECONDS = 300.0
POLL_SECONDS = 0.001

COLUMNS = "run_id, name, step, value, nonfinite, timestamp"
SQLITE_TABLE = """CREATE TABLE bench_metric (metric_id INTEGER PRIMARY KEY, run_id VARCHAR(24) NOT NULL,
    name VARCHAR(255) NOT NULL, step BIGINT, value FLOAT, nonfinite VARCHAR(4), timestamp DATETIME)"""
POSTGRES_TABLE = """CREATE TABLE bench_metric (metric_id BIGSERIAL PRIMARY KEY, run_id VARCHAR(24) NOT NULL,
    name VARCHAR(255) NOT NULL, step BIGINT, value DOUBLE PRECISION, nonfinite VARCHAR(4), timestamp TIMESTAMP)"""
INDEX = "CREATE INDEX bench_metric_run_name ON bench_metric (run_id, name)"


def env(home: Path, **settings: str) -> dict[str, str]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("RUNRELAY_")}
    return {**clean, "RUNRELAY_HOME": str(home), **settings}


def config(journal: Path, state: Path, url: str):
    return load(None, {"journal": journal, "state": state, "sinks": [url], "log_level": "WARNING"},
                environ={"RUNRELAY_HOME": str(journal.parent)})


def ok(met: bool) -> str:
    return "ok" if met else "BELOW GOAL"


# --- the journal --------------------------------------------------------------------------------


def metric(step: int) -> dict:
    return {"name": NAMES[step % len(NAMES)], "step": step // len(NAMES), "value": 1.0 / (step + 1),
            "timestamp": T0 + dt.timedelta(microseconds=step * 1000)}


def write_journal(journal: Path, runs: int, points: int) -> dict[str, int]:
    """``runs`` RUNNING runs (long trainings: no ending yet), ``points`` metric points in all;
    returns each run's last seq."""
    ends = {}
    for index in range(runs):
        with JournalWriter.create(journal) as writer:
            writer.append(Kind.STARTED, {"command": "main", "config": {"seed": index}, "start_time": T0,
                                         "ex_info": {"name": "bench"}, "host_info": {"hostname": "bench"}})
            for step in range(points // runs):
                writer.append(Kind.METRICS, metric(step))
            ends[writer.run] = writer.next_seq - 1
    return ends


# --- (a) replay beside a bulk insert ------------------------------------------------------------


def replay(journal: Path, state: Path, url: str, profile: bool) -> tuple[int, float, pstats.Stats | None]:
    """Deliver everything with run_sync; (events, seconds, profile of the worker thread)."""
    profiles: list[cProfile.Profile] = []
    original = delivery.SinkWorker.run
    if profile:
        def profiled(worker, stop):
            profiler = cProfile.Profile()
            profiler.enable()
            try:
                return original(worker, stop)
            finally:
                profiler.disable()
                profiles.append(profiler)
        delivery.SinkWorker.run = profiled
    try:
        begin = time.perf_counter()
        report = service.run_sync(config(journal, state, url), progress=False)
        seconds = time.perf_counter() - begin
    finally:
        delivery.SinkWorker.run = original
    if report.problems:
        raise SystemExit(f"replay into {url} left something undelivered: {report.problems}")
    stats = pstats.Stats(profiles[0], stream=io.StringIO()) if profiles else None
    return report.delivered, seconds, stats


def sqlite_bulk(path: Path) -> tuple[int, float]:
    """The same rows, read back from the sink's metric table, inserted with executemany."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")  # as the sink: a commit survives power loss
    rows = db.execute(f"SELECT {COLUMNS} FROM metric ORDER BY metric_id").fetchall()
    db.execute("DROP TABLE IF EXISTS bench_metric")
    db.execute(SQLITE_TABLE)
    db.execute(INDEX)
    begin = time.perf_counter()
    for start in range(0, len(rows), BULK_ROWS_PER_TRANSACTION):
        db.execute("BEGIN IMMEDIATE")
        db.executemany(f"INSERT INTO bench_metric ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                       rows[start:start + BULK_ROWS_PER_TRANSACTION])
        db.execute("COMMIT")
    seconds = time.perf_counter() - begin
    db.close()
    return len(rows), seconds


def postgres_bulk(conninfo: str) -> dict[str, tuple[int, float]]:
    """The same rows into an equivalent table: executemany, and COPY."""
    import psycopg

    results = {}
    with psycopg.connect(conninfo) as db:
        rows = db.execute(f"SELECT {COLUMNS} FROM metric ORDER BY metric_id").fetchall()
        db.commit()
        for method in ("executemany", "COPY"):
            db.execute("DROP TABLE IF EXISTS bench_metric")
            db.execute(POSTGRES_TABLE)
            db.execute(INDEX)
            db.commit()
            begin = time.perf_counter()
            for start in range(0, len(rows), BULK_ROWS_PER_TRANSACTION):
                chunk = rows[start:start + BULK_ROWS_PER_TRANSACTION]
                with db.cursor() as cursor:
                    if method == "COPY":
                        with cursor.copy(f"COPY bench_metric ({COLUMNS}) FROM STDIN") as copy:
                            for row in chunk:
                                copy.write_row(row)
                    else:
                        cursor.executemany(f"INSERT INTO bench_metric ({COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s)",
                                           chunk)
                db.commit()
            results[method] = (len(rows), time.perf_counter() - begin)
        db.execute("DROP TABLE bench_metric")
        db.commit()
    return results


# Where a worker's time goes: (label, file suffix, function), cumulative time of each.
AREAS = [
    ("journal: read + decode a batch", "daemon/delivery.py", "_read_batch"),
    ("apply_isolating: fold + SqlSink.apply", "daemon/delivery.py", "apply_isolating"),
    ("  SqlSink.apply", "sinks/sql.py", "apply"),
    ("    _metric_row (event -> row dict)", "sinks/sql.py", "_metric_row"),
    ("    SQLAlchemy: compile + bind params", "sqlalchemy/engine/default.py", "_init_compiled"),
    ("    driver: sqlite3 executemany", "~", "<method 'executemany' of 'sqlite3.Cursor' objects>"),
    ("    _plan (columns per event)", "sinks/sql.py", "_plan"),
    ("    _state (fold a first batch again)", "sinks/sql.py", "_state"),
    ("cursor + state snapshot save", "daemon/state.py", "save_cursor"),
    ("state snapshot encode", "daemon/delivery.py", "_snapshot"),
]


def print_profile(stats: pstats.Stats) -> None:
    total = max(ct for (_cc, _nc, _tt, ct, _callers) in stats.stats.values())
    print(f"\n  cProfile of the SQLite worker thread ({total:.1f} s under the profiler; cumulative time):")
    for label, where, name in AREAS:
        spent = sum(ct for (path, _line, function), (_cc, _nc, _tt, ct, _callers) in stats.stats.items()
                    if function == name and path.endswith(where))
        print(f"    {label:<40} {spent:7.2f} s  {spent / total:6.1%}")
    out = io.StringIO()
    stats.stream = out
    stats.sort_stats("tottime").print_stats(15)
    print("  top functions by own time:")
    for line in out.getvalue().splitlines()[5:]:
        if line.strip():
            print("   ", line[:150])


def daemon_replay(journal: Path, state: Path, url: str, ends: dict[str, int], applied) -> float:
    """Start `runrelay daemon` on the journal; seconds from its start until every run's last
    event is committed (``applied()`` gives {run: applied seq})."""
    daemon = Daemon(journal, state, url, state.parent)
    deadline = daemon.started + WAIT_SECONDS
    while True:
        seqs = applied()
        if all(seqs.get(run, -1) >= last for run, last in ends.items()):
            break
        if time.monotonic() > deadline or daemon.process.poll() is not None:
            raise SystemExit(f"`runrelay daemon` did not deliver everything to {url}")
        time.sleep(0.02)
    seconds = time.monotonic() - daemon.started
    daemon.stop()
    return seconds


def sqlite_applied(path: Path):
    def applied() -> dict[str, int]:
        try:
            with contextlib.closing(sqlite3.connect(path)) as db:
                return dict(db.execute("SELECT uid, applied_seq FROM runrelay_run").fetchall())
        except sqlite3.OperationalError:  # no tables yet
            return {}
    return applied


def postgres_applied(conninfo: str):
    import psycopg

    def applied() -> dict[str, int]:
        try:
            with psycopg.connect(conninfo) as db:
                return dict(db.execute("SELECT uid, applied_seq FROM runrelay_run").fetchall())
        except psycopg.Error:  # no tables yet
            return {}
    return applied


def bench_replay(root: Path, journal: Path, ends: dict[str, int], profile: bool, use_postgres: bool) -> None:
    total = sum(ends.values()) + len(ends)
    print(f"\n(a) replay {total:,} journaled events (default batch: 5000 events) beside a bulk insert of the "
          f"same rows into an equivalent table, {BULK_ROWS_PER_TRANSACTION} rows per transaction")
    database = root / "sqlite" / "runs.sqlite"
    events, seconds, _ = replay(journal, root / "state-sqlite", f"sqlite:///{database}", False)
    rate = events / seconds
    daemon_db = root / "sqlite" / "daemon.sqlite"
    daemon_rate = total / daemon_replay(journal, root / "state-sqlite-daemon", f"sqlite:///{daemon_db}", ends,
                                        sqlite_applied(daemon_db))
    rows, bulk_seconds = sqlite_bulk(database)
    bulk = rows / bulk_seconds
    print(f"  SQLite      run_sync (runrelay sync)        {events:>10,} events {seconds:7.2f} s "
          f"{rate:>9,.0f} events/s  {rate / bulk:.2f} of bulk")
    print(f"  SQLite      runrelay daemon, from its start {total:>10,} events {total / daemon_rate:7.2f} s "
          f"{daemon_rate:>9,.0f} events/s  {daemon_rate / bulk:.2f} of bulk")
    print(f"  SQLite      bulk: sqlite3 executemany       {rows:>10,} rows   {bulk_seconds:7.2f} s {bulk:>9,.0f} rows/s")
    best = max(rate, daemon_rate)
    print(f"  SQLite      goals: >= {GOAL_SQLITE_RATE:,} events/s {ok(best >= GOAL_SQLITE_RATE)}; "
          f">= {GOAL_RATIO} of bulk {ok(best / bulk >= GOAL_RATIO)}")
    if profile:  # a separate replay: the profiler slows the worker down several times
        _, _, stats = replay(journal, root / "state-profile", f"sqlite:///{root / 'sqlite' / 'profile.sqlite'}", True)
        print_profile(stats)

    if not use_postgres:
        print("  PostgreSQL  skipped (--no-postgres)")
        return
    try:
        from servers import PostgresServer, ServerUnavailable  # tests/servers.py: needs psycopg, pytest
    except ImportError as error:
        print(f"  PostgreSQL  skipped: {error} (pip install -e '.[test]')")
        return
    server = PostgresServer()
    try:
        try:
            server.start()
        except (ServerUnavailable, RuntimeError) as error:
            print(f"  PostgreSQL  skipped: {error}")
            return
        server.create_database("bench")
        server.create_database("bench_daemon")
        conninfo = f"host=127.0.0.1 port={server.port} user={server.superuser} dbname="
        events, seconds, _ = replay(journal, root / "state-postgres", server.url("bench"), False)
        rate = events / seconds
        daemon_rate = total / daemon_replay(journal, root / "state-postgres-daemon", server.url("bench_daemon"),
                                            ends, postgres_applied(conninfo + "bench_daemon"))
        timed = postgres_bulk(conninfo + "bench")
        bulks = {method: rows / bulk_seconds for method, (rows, bulk_seconds) in timed.items()}
        best_bulk = max(bulks.values())
        print(f"  PostgreSQL  run_sync (runrelay sync)        {events:>10,} events {seconds:7.2f} s "
              f"{rate:>9,.0f} events/s  {rate / best_bulk:.2f} of bulk (COPY), "
              f"{rate / bulks['executemany']:.2f} of executemany")
        print(f"  PostgreSQL  runrelay daemon, from its start {total:>10,} events {total / daemon_rate:7.2f} s "
              f"{daemon_rate:>9,.0f} events/s  {daemon_rate / best_bulk:.2f} of bulk (COPY), "
              f"{daemon_rate / bulks['executemany']:.2f} of executemany")
        for method, (rows, bulk_seconds) in timed.items():
            print(f"  PostgreSQL  bulk: psycopg {method:<19} {rows:>10,} rows   {bulk_seconds:7.2f} s "
                  f"{rows / bulk_seconds:>9,.0f} rows/s")
        best = max(rate, daemon_rate)
        print(f"  PostgreSQL  goal: >= {GOAL_RATIO} of the faster bulk insert {ok(best / best_bulk >= GOAL_RATIO)}")
    finally:
        server.cleanup()


# --- (b) live lag -------------------------------------------------------------------------------


class Daemon:
    """`runrelay daemon` as a subprocess; ``ready`` is when it told NOTIFY_SOCKET READY=1."""

    def __init__(self, journal: Path, state: Path, url: str, home: Path, **settings: str):
        self.socket_path = home / f"notify-{time.monotonic_ns()}.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.socket_path))
        self.notify.settimeout(WAIT_SECONDS)
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [str(RUNRELAY), "daemon", "--journal", str(journal), "--state", str(state), "--sink", url,
             "--log-level", "WARNING"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            env=env(home, NOTIFY_SOCKET=str(self.socket_path), **settings))
        self.ready: float | None = None
        threading.Thread(target=self._wait_ready, daemon=True).start()

    def _wait_ready(self) -> None:
        while True:
            try:
                message = self.notify.recv(4096).decode()
            except OSError:
                return
            if message.startswith("READY=1"):
                self.ready = time.monotonic()
                return

    def cpu_seconds(self) -> float:
        """User + system CPU time the daemon has used so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(WAIT_SECONDS)
        self.notify.close()
        self.socket_path.unlink(missing_ok=True)
        if self.process.returncode != 0:
            raise SystemExit(f"the daemon exited with {self.process.returncode}")


def applied_seq(db: sqlite3.Connection, run: str) -> int:
    try:
        row = db.execute("SELECT applied_seq FROM runrelay_run WHERE uid = ?", (run,)).fetchone()
    except sqlite3.OperationalError:  # the sink has not made its tables yet
        return -1
    return -1 if row is None else row[0]


def wait_applied(db: sqlite3.Connection, run: str, seq: int) -> float:
    deadline = time.monotonic() + WAIT_SECONDS
    while applied_seq(db, run) < seq:
        if time.monotonic() > deadline:
            raise SystemExit(f"run {run} seq {seq} never arrived")
        time.sleep(POLL_SECONDS)
    return time.monotonic()


def bench_lag(root: Path, seconds: float, rate: int, label: str, **settings: str) -> float:
    """Append ``rate`` events/s for ``seconds`` to a live run; returns p99 lag in ms."""
    journal, state, database = root / "journal", root / "state", root / "runs.sqlite"
    root.mkdir(parents=True, exist_ok=True)
    daemon = Daemon(journal, state, f"sqlite:///{database}", root, **settings)
    db = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
    writer = JournalWriter.create(journal)
    writer.append(Kind.STARTED, {"command": "main", "config": {}, "start_time": T0})
    wait_applied(db, writer.run, 0)
    total = int(seconds * rate)
    appended = [0.0] * (total + 1)
    visible = [0.0] * (total + 1)
    done = threading.Event()

    def poll() -> None:
        last = 0
        while last < total:
            seq = applied_seq(db, writer.run)
            now = time.monotonic()
            for event in range(last + 1, seq + 1):
                visible[event] = now
            last = max(last, seq)
            time.sleep(POLL_SECONDS)
        done.set()

    poller = threading.Thread(target=poll, daemon=True)
    cpu_before = daemon.cpu_seconds()
    poller.start()
    chunk = max(1, rate // 1000)  # every millisecond, a millisecond's worth
    begin = time.monotonic()
    for first in range(1, total + 1, chunk):
        due = begin + (first - 1) / rate
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        for seq in range(first, min(first + chunk, total + 1)):
            writer.append(Kind.METRICS, metric(seq))
            appended[seq] = time.monotonic()
    produced = time.monotonic() - begin
    if not done.wait(WAIT_SECONDS):
        raise SystemExit("the live run was never fully delivered")
    cpu = (daemon.cpu_seconds() - cpu_before) / (time.monotonic() - begin)
    writer.close()
    daemon.stop()
    db.close()
    lags = sorted((visible[seq] - appended[seq]) * 1000 for seq in range(1, total + 1))
    cuts = statistics.quantiles(lags, n=100, method="inclusive")
    print(f"  {label:<34} {total:,} events in {produced:.1f} s ({total / produced:,.0f}/s): "
          f"p50 {cuts[49]:6.1f} ms  p99 {cuts[98]:6.1f} ms  max {lags[-1]:6.1f} ms  daemon CPU {cpu:4.0%}  "
          f"goal p99 <= {GOAL_LAG_P99_MS:.0f} ms: {ok(cuts[98] <= GOAL_LAG_P99_MS)}")
    return cuts[98]


# --- (c) restart to live ------------------------------------------------------------------------


def bench_restart(root: Path, journal: Path, uids: list[str], events: int) -> None:
    """With everything delivered and the cursors saved (by (a)), start the daemon, append one
    event at once, and time until it is committed: in a new run, and in a RUNNING run."""
    database = root / "sqlite" / "runs.sqlite"
    state = root / "state-sqlite"
    print(f"\n(c) restart to live, {events:,} events already delivered, cursors saved "
          f"(goal <= {GOAL_RESTART_SECONDS:.0f} s)")
    db = sqlite3.connect(database, isolation_level=None)
    per_run = events // len(uids)
    for label, target in (("a new run", None), (f"a RUNNING run of {per_run:,} events", uids[0])):
        daemon = Daemon(journal, state, f"sqlite:///{database}", root)
        if target is None:
            writer = JournalWriter.create(journal)
            writer.append(Kind.STARTED, {"command": "main", "config": {}, "start_time": T0})
        else:
            writer = JournalWriter.resume(journal, target)
        seq = writer.append(Kind.METRICS, metric(10**9))
        writer.close()
        seen = wait_applied(db, writer.run, seq)
        total = seen - daemon.started
        ready = f"{daemon.ready - daemon.started:.2f} s" if daemon.ready else "-"
        print(f"  into {label:<33} start -> READY {ready}, start -> committed {total:5.2f} s   "
              f"{ok(total <= GOAL_RESTART_SECONDS)}")
        daemon.stop()
    db.close()


# --- main ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=1_000_000, help="metric points in the journal (a)")
    parser.add_argument("--runs", type=int, default=20, help="runs they are spread over")
    parser.add_argument("--lag-seconds", type=float, default=15.0, help="how long the producer runs (b)")
    parser.add_argument("--lag-rate", type=int, default=10_000, help="events/s the producer appends (b)")
    parser.add_argument("--no-postgres", action="store_true", help="skip PostgreSQL in (a)")
    parser.add_argument("--profile", action="store_true", help="cProfile the SQLite replay")
    parser.add_argument("--dir", type=Path, help="work directory (default: a temp dir, removed after)")
    args = parser.parse_args()

    root = Path(args.dir or tempfile.mkdtemp(prefix="runrelay-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        print(f"runrelay replay benchmark: python {sys.version.split()[0]}, {os.cpu_count()} CPUs, work dir {root}")
        journal = root / "journal"
        begin = time.perf_counter()
        ends = write_journal(journal, args.runs, args.points)
        events = sum(ends.values()) + len(ends)
        print(f"journal: {args.runs} runs, {events:,} events written in {time.perf_counter() - begin:.1f} s")
        bench_replay(root, journal, ends, args.profile, not args.no_postgres)

        print(f"\n(b) lag append -> committed in SQLite, producer at {args.lag_rate:,} events/s "
              f"for {args.lag_seconds:.0f} s, `runrelay daemon` running")
        bench_lag(root / "lag-default", args.lag_seconds, args.lag_rate, f"default (batch_wait_seconds {DEFAULT_BATCH_WAIT_SECONDS})")
        bench_lag(root / "lag-nowait", args.lag_seconds, args.lag_rate, "batch_wait_seconds 0",
                  RUNRELAY_DELIVERY_BATCH_WAIT_SECONDS="0")

        bench_restart(root, journal, list(ends), events)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

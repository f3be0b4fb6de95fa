"""Replay benchmark: delivery beside a hand-written bulk insert, live lag, restart, memory.

    python bench/replay.py [--points N] [--runs N] [--sinks sqlite,postgresql,mariadb,mongodb,file,s3,gs]
                           [--only replay,fixed,lag,restart,memory,bytes] [--fixed-runs N] [--fixed-points N]
                           [--lag-seconds S] [--lag-rates R,R]
                           [--memory-points N] [--store-points N] [--store-rate R] [--profile] [--dir DIR]

The defaults are CI-sized (about three minutes on 2 CPUs). docs/benchmarks.md has the
command for the full-size figures (1,000,000 events).

(a) replay: events/s delivering a journal of N metric points (in R RUNNING runs) to each sink
    through `daemon.service.run_sync` (the code `runrelay sync` runs) and through
    `runrelay daemon` (process start to last commit), beside a bulk insert of the very rows
    the sink wrote into an equivalent table of the same database, same process, same run;
    and how many journal records `runrelay sync` read per event it delivered (goal: once);
(a') fixed: a run's fixed cost: 1,000 runs of 100 points replayed beside as many events in R runs,
    the difference per extra run;
(b) lag, append -> committed in SQLite (the run's applied seq, written in the same
    transaction as its rows), p50/p99, and the daemon's CPU, while a producer appends R
    events/s (10k, then 50k) for S seconds to a live run with `runrelay daemon` running
    (default batch wait, then none);
(c) restart, per sink, with the N events delivered and their cursors saved: a fresh
    `runrelay sync` that finds nothing to deliver (process start to exit; and run_sync in
    this process, the workers' catch-up alone); `runrelay daemon` from its start until an
    event appended at once is committed; then two restarts that fold a run again: a cursor
    one batch behind its sink (a kill between the sink's commit and the cursor save), and a
    lost state directory;
(d) memory: the peak RSS of `runrelay daemon` delivering one live run while a producer
    appends its metric points as fast as it can, for M/10 and for M points; the ratio says
    whether it grows with the run;
(e) bytes, FileStorage stores only: bench/filestorage.py's long run replayed into each store
    with the default rewrite cadence beside Sacred's FileStorageObserver (the ratio).

PostgreSQL, MariaDB, MongoDB (SecantusDB), S3 (moto) and GCS (fake-gcs-server) are throwaway
servers from tests/servers.py,
skipped (with the reason) if they cannot start here. Run with the venv's python (`runrelay`
must be installed beside it). Figures are printed with the goals beside them, never
asserted. --profile adds a cProfile of a separate SQLite replay's worker thread (the
measured replays run without it).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as dt
import io
import json
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
sys.path.insert(0, str(REPO / "tests"))

from runrelay.daemon import delivery, service  # noqa: E402
from runrelay.daemon.config import DEFAULT_BATCH_EVENTS, DEFAULT_BATCH_WAIT_SECONDS, load  # noqa: E402
from runrelay.eventlog import JournalWriter, Kind, reader  # noqa: E402

RUNRELAY = Path(sys.executable).parent / "runrelay"
NAMES = ["training.loss", "accuracy", "lr", "grad.norm"]
T0 = dt.datetime(2024, 5, 1, 12, 0, 0)
BULK_ROWS_PER_TRANSACTION = DEFAULT_BATCH_EVENTS  # the daemon's batch: same commits, same durability
GOAL_RATIO = 0.5
GOAL_SQLITE_RATE = 100_000
GOAL_LAG_P99_MS = {10_000: 50.0, 50_000: 100.0}  # events/s -> p99 lag; other rates: the next goal up
GOAL_LAG_CPU = 0.30  # of a core, at 10k events/s
GOAL_LAG_CPU_RATE = 10_000
GOAL_RESTART_SECONDS = 1.0
GOAL_RUN_MS = 0.5  # a run's fixed cost to replay
GOAL_MEMORY_RATIO = 1.2  # "does not grow": 10x the points, at most a fifth more peak RSS
RESTART_REPEATS = 3
LAGGING_POINTS = 1000  # how far the sink is ahead of a lagging cursor (one small batch)
WAIT_SECONDS = 600.0
POLL_SECONDS = 0.001
RSS_POLL_SECONDS = 0.05
STORES = ("file", "s3", "gs")
SINKS = ("sqlite", "postgresql", "mariadb", "mongodb", *STORES)
SECTIONS = ("replay", "fixed", "lag", "restart", "memory", "bytes")

COLUMNS = "run_id, name, step, value, nonfinite, timestamp"
INDEX = "CREATE INDEX bench_metric_run_name ON bench_metric (run_id, name)"


def env(home: Path, **settings: str) -> dict[str, str]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("RUNRELAY_")}
    return {**clean, "RUNRELAY_HOME": str(home), **settings}


def config(journal: Path, state: Path, url: str):
    return load(None, {"journal": journal, "state": state, "sinks": [url], "log_level": "WARNING"},
                environ={"RUNRELAY_HOME": str(journal.parent)})


def ok(met: bool) -> str:
    return "ok" if met else "BELOW GOAL"


# --- the sinks' databases -----------------------------------------------------------------------


class Target:
    """One kind of SQL database: its sink URLs, a reader of applied seqs, the bulk baseline."""

    label: str
    table: str  # the bulk table, with the sink's metric columns and index
    marker: str  # the driver's parameter marker
    bulk_methods: tuple[str, ...] = ("executemany",)

    def url(self, database: str) -> str:
        raise NotImplementedError

    def connect(self, database: str):
        """A DB-API connection that sees every commit (autocommit); raises if none yet."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def applied(self, database: str) -> "Applied":
        return Applied(self, database)

    def rows(self, database: str) -> list[tuple]:
        """The rows the sink wrote to its metric table, in order."""
        with contextlib.closing(self.connect(database)) as db:
            cursor = db.cursor()
            cursor.execute(f"SELECT {COLUMNS} FROM metric ORDER BY metric_id")
            return cursor.fetchall()

    def bulk(self, database: str) -> dict[str, tuple[int, float]]:
        """{method: (rows, seconds)}: the sink's own rows inserted again into an equivalent
        table of the same database, BULK_ROWS_PER_TRANSACTION rows per transaction."""
        rows = self.rows(database)
        results = {}
        with contextlib.closing(self.connect(database)) as db:
            self._bulk_session(db)
            for method in self.bulk_methods:
                cursor = db.cursor()
                cursor.execute("DROP TABLE IF EXISTS bench_metric")
                cursor.execute(self.table)
                cursor.execute(INDEX)
                begin = time.perf_counter()
                for start in range(0, len(rows), BULK_ROWS_PER_TRANSACTION):
                    self._insert(db, method, rows[start:start + BULK_ROWS_PER_TRANSACTION])
                results[method] = (len(rows), time.perf_counter() - begin)
                cursor.execute("DROP TABLE bench_metric")
        return results

    def _bulk_session(self, db) -> None:
        pass

    def _insert(self, db, method: str, chunk: list[tuple]) -> None:
        """One transaction of rows."""
        raise NotImplementedError

    def _executemany(self, cursor, chunk: list[tuple]) -> None:
        markers = ", ".join([self.marker] * len(chunk[0]))
        cursor.executemany(f"INSERT INTO bench_metric ({COLUMNS}) VALUES ({markers})", chunk)


class Applied:
    """Reads the sink's applied seq per run over one autocommit connection (opened when the
    sink has made its tables)."""

    def __init__(self, target: Target, database: str):
        self.target, self.database = target, database
        self._db = None

    def __call__(self) -> dict[str, int]:
        try:
            if self._db is None:
                self._db = self.target.connect(self.database)
            cursor = self._db.cursor()
            cursor.execute("SELECT uid, applied_seq FROM runrelay_run")
            return dict(cursor.fetchall())
        except Exception:  # noqa: BLE001 - no database or no tables yet, whatever the driver
            self.close()
            return {}

    def seq(self, run: str) -> int:
        return self().get(run, -1)

    def close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(Exception):
                self._db.close()
            self._db = None


class SQLiteTarget(Target):
    label = "SQLite"
    table = """CREATE TABLE bench_metric (metric_id INTEGER PRIMARY KEY, run_id VARCHAR(24) NOT NULL,
        name VARCHAR(255) NOT NULL, step BIGINT, value FLOAT, nonfinite VARCHAR(4), timestamp DATETIME)"""
    marker = "?"

    def __init__(self, root: Path):
        self.root = root / "sqlite"

    def url(self, database: str) -> str:
        return f"sqlite:///{self.root / database}.sqlite"

    def connect(self, database: str):
        path = self.root / f"{database}.sqlite"
        return sqlite3.connect(f"file:{path}?mode=rw", uri=True, isolation_level=None, check_same_thread=False)

    def _bulk_session(self, db) -> None:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # as the sink: a commit survives power loss

    def _insert(self, db, method: str, chunk: list[tuple]) -> None:
        db.execute("BEGIN IMMEDIATE")
        self._executemany(db.cursor(), chunk)
        db.execute("COMMIT")


class ServerTarget(Target):
    """A throwaway server from tests/servers.py; databases are created on first use."""

    def __init__(self, server):
        self.server = server
        self._made: set[str] = set()

    def url(self, database: str) -> str:
        if database not in self._made:
            self.server.create_database(database)
            self._made.add(database)
        return self.server.url(database)

    def close(self) -> None:
        self.server.cleanup()


class PostgresTarget(ServerTarget):
    label = "PostgreSQL"
    table = """CREATE TABLE bench_metric (metric_id BIGSERIAL PRIMARY KEY, run_id VARCHAR(24) NOT NULL,
        name VARCHAR(255) NOT NULL, step BIGINT, value DOUBLE PRECISION, nonfinite VARCHAR(4), timestamp TIMESTAMP)"""
    marker = "%s"
    bulk_methods = ("executemany", "COPY")

    def connect(self, database: str):
        import psycopg

        return psycopg.connect(f"host=127.0.0.1 port={self.server.port} user={self.server.superuser} "
                               f"dbname={database} connect_timeout=5", autocommit=True)

    def _insert(self, db, method: str, chunk: list[tuple]) -> None:
        with db.transaction(), db.cursor() as cursor:
            if method == "COPY":
                with cursor.copy(f"COPY bench_metric ({COLUMNS}) FROM STDIN") as copy:
                    for row in chunk:
                        copy.write_row(row)
            else:
                self._executemany(cursor, chunk)


class MariaDBTarget(ServerTarget):
    label = "MariaDB"
    table = """CREATE TABLE bench_metric (metric_id BIGINT AUTO_INCREMENT PRIMARY KEY, run_id VARCHAR(24) NOT NULL,
        name VARCHAR(255) NOT NULL, step BIGINT, value DOUBLE, nonfinite VARCHAR(4), timestamp DATETIME(6))
        ENGINE=InnoDB CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"""
    marker = "%s"  # PyMySQL's executemany sends multi-row INSERTs, as it does for the sink

    def connect(self, database: str):
        import pymysql

        return pymysql.connect(host="127.0.0.1", port=self.server.port, user="root", database=database,
                               charset="utf8mb4", autocommit=True, connect_timeout=5)

    def _insert(self, db, method: str, chunk: list[tuple]) -> None:
        db.begin()
        self._executemany(db.cursor(), chunk)
        db.commit()


class MongoTarget(Target):
    """MongoDB (SecantusDB from tests/servers.py, or $RUNRELAY_TEST_MONGO_URL). The baselines
    write the sink's metric points again into a collection of the same database, indexed as
    the sink's, with insert_many: one document per point, BULK_ROWS_PER_TRANSACTION per
    call; each run's points cut in batches of that many, a batch's points of one name one
    new document (steps, values, timestamps), one insert_many per batch; and the sink's
    layout by hand: the same batches `$push`ed (`$each`) into one document per (run, name),
    one ordered bulk_write per batch (what the sink sends for a batch's points, without its
    conditions and the run document's update; each push rewrites a growing document)."""

    label = "MongoDB"
    bulk_methods = ("insert_many, a document per point", "insert_many, a document per name and batch",
                    "$push by hand, a document per name")

    class Applied(Applied):
        def __call__(self) -> dict[str, int]:
            try:
                if self._db is None:
                    self._db = self.target.client(self.database)
                found = self._db[self.database].runs.find({"runrelay.uid": {"$exists": True}}, {"runrelay": 1})
                return {document["runrelay"]["uid"]: document["runrelay"]["applied"] for document in found}
            except Exception:  # noqa: BLE001 - no server or no database yet, whatever the driver says
                self.close()
                return {}

    def __init__(self, server):
        self.server = server

    @classmethod
    def start(cls) -> list["MongoTarget"]:
        """The target, its server started; none (said why) if it cannot run here."""
        from servers import MongoServer, ServerUnavailable  # tests/servers.py

        server = MongoServer(os.environ.get("RUNRELAY_TEST_MONGO_URL") or None)
        try:
            server.start()
        except (ServerUnavailable, RuntimeError) as error:
            print(f"  {server.name}: skipped: {error}")
            server.cleanup()
            return []
        print(f"  {server.name} server started on {server.url('')}")
        return [cls(server)]

    def url(self, database: str) -> str:
        return self.server.url(database)

    def client(self, database: str):
        import pymongo

        return pymongo.MongoClient(self.server.url(database), serverSelectionTimeoutMS=5000, timeoutMS=60_000)

    def applied(self, database: str) -> "MongoTarget.Applied":
        return self.Applied(self, database)

    def close(self) -> None:
        self.server.cleanup()

    def bulk(self, database: str) -> dict[str, tuple[int, float]]:
        with contextlib.closing(self.client(database)) as client:
            db = client[database]
            points: dict[int, list[dict]] = {}
            for document in db.metrics.find({}).sort("_id", 1):
                points.setdefault(document["run_id"], []).extend(
                    {"run_id": document["run_id"], "name": document["name"], "step": step, "value": value,
                     "timestamp": timestamp}
                    for step, value, timestamp in zip(document["steps"], document["values"], document["timestamps"]))
            per_point, per_batch = [], []
            for run_points in points.values():
                run_points.sort(key=lambda point: point["timestamp"])  # the journal's order
                for start in range(0, len(run_points), BULK_ROWS_PER_TRANSACTION):
                    batch = run_points[start:start + BULK_ROWS_PER_TRANSACTION]
                    per_point.append(batch)
                    by_name: dict[str, dict] = {}
                    for point in batch:
                        series = by_name.setdefault(point["name"], {"run_id": point["run_id"], "name": point["name"],
                                                                    "steps": [], "values": [], "timestamps": []})
                        series["steps"].append(point["step"])
                        series["values"].append(point["value"])
                        series["timestamps"].append(point["timestamp"])
                    per_batch.append(list(by_name.values()))
            rows = sum(len(batch) for batch in per_point)
            results = {}
            for number, (method, batches) in enumerate(zip(self.bulk_methods, (per_point, per_batch, per_batch))):
                collection = db[f"bench_metric_{number}"]  # fresh, never dropped: a drop is slow in SecantusDB
                collection.create_index([("run_id", 1), ("name", 1)])
                begin = time.perf_counter()
                for batch in batches:
                    if method.startswith("$push"):
                        collection.bulk_write([self._push(series) for series in batch], ordered=True)
                    else:
                        collection.insert_many(batch, ordered=True)
                results[method] = (rows, time.perf_counter() - begin)
        return results

    @staticmethod
    def _push(series: dict):
        from pymongo import UpdateOne

        return UpdateOne({"run_id": series["run_id"], "name": series["name"]},
                         {"$push": {key: {"$each": series[key]} for key in ("steps", "values", "timestamps")}},
                         upsert=True)


class StoreTarget(Target):
    """A FileStorage store (file://, s3:// on moto, gs:// on fake-gcs-server from
    tests/servers.py): each database is a base under it. The baseline puts the very objects
    the sink wrote under that base (read back) again under another, through the same store
    (``sinks/filestorage*.py``'s ``put``), one call per object: what the sink writes, without
    its reads, its claims and its rewrites of run.json and metrics.json."""

    bulk_methods = ("put of the same objects",)

    class Applied(Applied):
        def __call__(self) -> dict[str, int]:
            try:
                if self._db is None:
                    self._db = self.target.sink(self.database)
                store = self._db.store
                books = [json.loads(store.get(f"{run_id}/run.json") or "{}").get("runrelay") for run_id in store.run_ids()]
                return {book["uid"]: book["applied"] for book in books if book}
            except Exception:  # noqa: BLE001 - no base or run.json yet, whatever the store says
                self.close()
                return {}

    def __init__(self, scheme: str, base: str, servers: list):
        self.label, self.base, self.servers = scheme, base, servers  # labels name work directories too

    @classmethod
    def start(cls, root: Path, scheme: str) -> list["StoreTarget"]:
        """The target, its server started; none (said why) if it cannot run here."""
        import filestorage  # bench/filestorage.py

        if scheme == "file":
            return [cls(scheme, f"file://{root / 'stores'}", [])]
        servers: list = []
        base, reason = filestorage.bucket_url(scheme, servers)  # sets the client's environment
        if base is None:
            print(f"  {scheme}://: skipped: {reason}")
            for server in servers:
                server.cleanup()
            return []
        print(f"  {servers[0].name} server started on {servers[0].endpoint}")
        return [cls(scheme, base, servers)]

    def url(self, database: str) -> str:
        return f"{self.base}/{database}"

    def sink(self, database: str):
        from runrelay.sinks.registry import sink_for

        sink = sink_for("bench", self.url(database), {}, None)
        sink.open()
        return sink

    def applied(self, database: str) -> "StoreTarget.Applied":
        return self.Applied(self, database)

    def close(self) -> None:
        for server in self.servers:
            server.cleanup()

    def bulk(self, database: str) -> dict[str, tuple[int, float]]:
        source, copy = self.sink(database), self.sink(f"{database}-bulk")
        try:
            keys = [f"{run_id}/{name}" for run_id in source.store.run_ids()
                    for name in ("run.json", "config.json", "info.json", "cout.txt", "metrics.json")]
            objects = [(key, data) for key in keys if (data := source.store.get(key)) is not None]
            points = sum(len(series["steps"]) for key, data in objects if key.endswith("metrics.json")
                         for series in json.loads(data).values())
            begin = time.perf_counter()
            for key, data in objects:
                copy.store.put(key, data)
            return {self.bulk_methods[0]: (points, time.perf_counter() - begin)}
        finally:
            source.close()
            copy.close()


def start_targets(root: Path, wanted: list[str]) -> list[Target]:
    """The targets asked for that can run here; a server that cannot start is said and skipped."""
    targets: list[Target] = []
    for name in wanted:
        if name == "sqlite":
            targets.append(SQLiteTarget(root))
            continue
        if name == "mongodb":
            targets += MongoTarget.start()
            continue
        if name in STORES:
            targets += StoreTarget.start(root, name)
            continue
        try:
            from servers import MariaDBServer, PostgresServer, ServerUnavailable  # tests/servers.py
        except ImportError as error:
            print(f"  {name}: skipped: {error} (pip install -e '.[test]')")
            continue
        server = PostgresServer() if name == "postgresql" else MariaDBServer()
        try:
            server.start()
        except (ServerUnavailable, RuntimeError) as error:
            print(f"  {server.name}: skipped: {error}")
            server.cleanup()
            continue
        targets.append(PostgresTarget(server) if name == "postgresql" else MariaDBTarget(server))
        print(f"  {server.name} server started on 127.0.0.1:{server.port}")
    return targets


# --- the journal --------------------------------------------------------------------------------


def metric(step: int) -> dict:
    return {"name": NAMES[step % len(NAMES)], "step": step // len(NAMES), "value": 1.0 / (step + 1),
            "timestamp": T0 + dt.timedelta(microseconds=step * 1000)}


STARTED = {"command": "main", "config": {"seed": 0}, "start_time": T0, "ex_info": {"name": "bench"},
           "host_info": {"hostname": "bench"}}


def write_journal(journal: Path, runs: int, points: int) -> dict[str, int]:
    """``runs`` RUNNING runs (long trainings: no ending yet), ``points`` metric points in all;
    returns each run's last seq."""
    ends = {}
    for index in range(runs):
        with JournalWriter.create(journal) as writer:
            writer.append(Kind.STARTED, {**STARTED, "config": {"seed": index}})
            for step in range(points // runs):
                writer.append_metric(**metric(step))
            ends[writer.run] = writer.next_seq - 1
    return ends


def append_points(journal: Path, run: str, count: int) -> int:
    """Append ``count`` metric points to a run whose writer is gone; returns the last seq."""
    with JournalWriter.resume(journal, run) as writer:
        for step in range(count):
            seq = writer.append_metric(**metric(10**9 + step))
    return seq


# --- processes ----------------------------------------------------------------------------------


class Daemon:
    """`runrelay daemon` as a subprocess; ``ready`` is when it told NOTIFY_SOCKET READY=1."""

    def __init__(self, journal: Path, state: Path, url: str, home: Path, **settings: str):
        self.socket_path = home / f"notify-{time.monotonic_ns()}.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.socket_path))
        self.notify.settimeout(WAIT_SECONDS)
        self.got_ready = threading.Event()
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
                self.got_ready.set()
                return

    def wait_ready(self) -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        while not self.got_ready.wait(0.05):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"`runrelay daemon` never said READY=1 (exit code {self.process.poll()})")

    def cpu_seconds(self) -> float:
        """User + system CPU time the daemon has used so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def memory(self) -> dict[str, int]:
        """The daemon's /proc status memory lines, in bytes: VmHWM (peak RSS), VmRSS, RssAnon, RssFile."""
        sizes = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                sizes[key] = int(value.split()[0]) * 1024
        return sizes

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(WAIT_SECONDS)
        self.notify.close()
        self.socket_path.unlink(missing_ok=True)
        if self.process.returncode != 0:
            raise SystemExit(f"the daemon exited with {self.process.returncode}")


def sync_process(journal: Path, state: Path, url: str) -> float:
    """Seconds from starting `runrelay sync` until it exits (0: everything delivered)."""
    begin = time.perf_counter()
    done = subprocess.run([str(RUNRELAY), "sync", "--journal", str(journal), "--state", str(state), "--sink", url,
                           "--no-progress", "--log-level", "WARNING"], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, env=env(state.parent))
    seconds = time.perf_counter() - begin
    if done.returncode != 0:
        raise SystemExit(f"`runrelay sync` into {url} exited {done.returncode}: {done.stderr.strip()}")
    return seconds


def wait_applied(applied: Applied, run: str, seq: int, daemon: Daemon | None = None) -> float:
    deadline = time.monotonic() + WAIT_SECONDS
    while applied.seq(run) < seq:
        if time.monotonic() > deadline or (daemon is not None and daemon.process.poll() is not None):
            raise SystemExit(f"run {run} seq {seq} never arrived")
        time.sleep(POLL_SECONDS)
    return time.monotonic()


# --- (a) replay beside a bulk insert ------------------------------------------------------------


def replay(journal: Path, state: Path, url: str, profile: bool = False) -> tuple[int, float, pstats.Stats | None]:
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


def daemon_replay(journal: Path, state: Path, url: str, ends: dict[str, int], applied: Applied) -> float:
    """Start `runrelay daemon` on the journal; seconds from its start until every run's last
    event is committed."""
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
    applied.close()
    daemon.stop()
    return seconds


# Where a worker's time goes: (label, file suffix, function), cumulative time of each.
AREAS = [
    ("journal: Journal.read_batch (read, decode)", "eventlog/reader.py", "read_batch"),
    ("  codec.decode (MessagePack)", "eventlog/codec.py", "decode"),
    ("  scan_segment (CRCs)", "eventlog/format.py", "scan_segment"),
    ("apply_isolating (fold + apply)", "daemon/delivery.py", "apply_isolating"),
    ("  Stretch.batch (fold)", "daemon/delivery.py", "batch"),
    ("  SqlSink.apply", "sinks/sql.py", "apply"),
    ("    _metric_rows (points -> rows)", "sinks/sql.py", "_metric_rows"),
    ("    driver: sqlite3 executemany", "~", "<method 'executemany' of 'sqlite3.Cursor' objects>"),
    ("cursor + state snapshot save", "daemon/state.py", "save_cursors"),
    ("state snapshot encode", "daemon/delivery.py", "_snapshot"),
]


def print_profile(stats: pstats.Stats) -> None:
    total = max(ct for (_cc, _nc, _tt, ct, _callers) in stats.stats.values())
    print(f"\n  cProfile of the SQLite worker thread ({total:.1f} s under the profiler; cumulative time):")
    for label, where, name in AREAS:
        spent = sum(ct for (path, _line, function), (_cc, _nc, _tt, ct, _callers) in stats.stats.items()
                    if function == name and path.endswith(where))
        print(f"    {label:<44} {spent:7.2f} s  {spent / total:6.1%}")
    out = io.StringIO()
    stats.stream = out
    stats.sort_stats("tottime").print_stats(15)
    print("  top functions by own time:")
    for line in out.getvalue().splitlines()[5:]:
        if line.strip():
            print("   ", line[:150])


def bench_replay(root: Path, journal: Path, ends: dict[str, int], target: Target, show: bool,
                 profile: bool) -> None:
    """Deliver the journal into the target's "sync" database (kept for (c)); with ``show``,
    also through the daemon and beside the bulk insert, and print it all."""
    label = target.label
    events, seconds, _ = replay(journal, root / f"state-{label}", target.url("sync"))
    if not show:
        print(f"  {label:<11} delivered {events:,} events for (c) in {seconds:.2f} s")
        return
    total = sum(ends.values()) + len(ends)
    rate = events / seconds
    daemon_rate = total / daemon_replay(journal, root / f"state-{label}-daemon", target.url("daemon"), ends,
                                        target.applied("daemon"))
    timed = target.bulk("sync")
    bulks = {method: rows / bulk_seconds for method, (rows, bulk_seconds) in timed.items()}
    best_method = max(bulks, key=bulks.get)
    best_bulk = bulks[best_method]

    def shares(value: float) -> str:
        text = f"{value / best_bulk:.2f} of bulk ({best_method})"
        others = [f"{value / bulks[method]:.2f} of {method}" for method in bulks if method != best_method]
        return ", ".join([text, *others])

    print(f"  {label:<11} run_sync (runrelay sync)        {events:>10,} events {seconds:7.2f} s "
          f"{rate:>9,.0f} events/s  {shares(rate)}")
    print(f"  {label:<11} runrelay daemon, from its start {total:>10,} events {total / daemon_rate:7.2f} s "
          f"{daemon_rate:>9,.0f} events/s  {shares(daemon_rate)}")
    for method, (rows, bulk_seconds) in timed.items():
        print(f"  {label:<11} bulk: {method:<25} {rows:>10,} rows   {bulk_seconds:7.2f} s "
              f"{rows / bulk_seconds:>9,.0f} rows/s")
    best = max(rate, daemon_rate)
    goals = f">= {GOAL_RATIO} of the fastest bulk insert {ok(best / best_bulk >= GOAL_RATIO)}"
    if isinstance(target, SQLiteTarget):
        goals = f">= {GOAL_SQLITE_RATE:,} events/s {ok(best >= GOAL_SQLITE_RATE)}; " + goals
    print(f"  {label:<11} goals: {goals}")
    if profile and isinstance(target, SQLiteTarget):  # a separate replay: the profiler slows it several times
        _, _, stats = replay(journal, root / "state-profile", target.url("profile"), True)
        print_profile(stats)


def bench_fixed_cost(root: Path, many: Path, many_ends: dict[str, int], journal: Path, ends: dict[str, int],
                     target: Target) -> None:
    """A run's fixed cost: ``many`` holds as many events as ``journal`` in many more runs;
    the difference of their replay times, per extra run."""
    label = target.label
    times = {}
    for name, where, runs in (("few", journal, ends), ("many", many, many_ends)):
        events, seconds, _ = replay(where, root / f"state-{label}-{name}", target.url(name))
        times[name] = (len(runs), events, seconds)
    (few_runs, few_events, few_seconds), (many_runs, many_events, many_seconds) = times["few"], times["many"]
    per_run = (many_seconds - few_seconds * many_events / few_events) / (many_runs - few_runs)
    print(f"  {label:<11} {many_runs:,} runs, {many_events:,} events: {many_seconds:5.2f} s "
          f"({many_seconds / many_events * 1e6:.1f} µs/event); {few_runs} runs, {few_events:,} events: "
          f"{few_seconds:5.2f} s; a run's fixed cost {per_run * 1000:.2f} ms  "
          f"goal <= {GOAL_RUN_MS} ms: {ok(per_run * 1000 <= GOAL_RUN_MS)}")


def journal_reads(journal: Path, state: Path, url: str) -> tuple[int, int]:
    """(records read from the journal, events delivered) by one run_sync: every record a
    segment scan yields is counted, whatever read it (delivery, sizing the backlog, status)."""
    scanned = [0]
    original = reader.scan_segment

    def counting(*args, **kwargs):
        for record in original(*args, **kwargs):
            scanned[0] += 1
            yield record

    reader.scan_segment = counting
    try:
        delivered, _, _ = replay(journal, state, url)
    finally:
        reader.scan_segment = original
    return scanned[0], delivered


# --- (b) live lag -------------------------------------------------------------------------------


def bench_lag(root: Path, seconds: float, rate: int, label: str, **settings: str) -> float:
    """Append ``rate`` events/s for ``seconds`` to a live run; returns p99 lag in ms."""
    journal, state = root / "journal", root / "state"
    target = SQLiteTarget(root)
    root.mkdir(parents=True, exist_ok=True)
    daemon = Daemon(journal, state, target.url("runs"), root, **settings)
    applied = target.applied("runs")
    writer = JournalWriter.create(journal)
    writer.append(Kind.STARTED, {"command": "main", "config": {}, "start_time": T0})
    wait_applied(applied, writer.run, 0, daemon)
    total = int(seconds * rate)
    appended = [0.0] * (total + 1)
    visible = [0.0] * (total + 1)
    done = threading.Event()

    def poll() -> None:
        last = 0
        while last < total:
            seq = applied.seq(writer.run)
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
            writer.append_metric(**metric(seq))
            appended[seq] = time.monotonic()
    produced = time.monotonic() - begin
    if not done.wait(WAIT_SECONDS):
        raise SystemExit("the live run was never fully delivered")
    cpu = (daemon.cpu_seconds() - cpu_before) / (time.monotonic() - begin)
    writer.close()
    daemon.stop()
    applied.close()
    lags = sorted((visible[seq] - appended[seq]) * 1000 for seq in range(1, total + 1))
    cuts = statistics.quantiles(lags, n=100, method="inclusive")
    goal = next((ms for limit, ms in sorted(GOAL_LAG_P99_MS.items()) if rate <= limit), max(GOAL_LAG_P99_MS.values()))
    goals = f"goal p99 <= {goal:.0f} ms: {ok(cuts[98] <= goal)}"
    if rate <= GOAL_LAG_CPU_RATE:
        goals += f", CPU <= {GOAL_LAG_CPU:.0%}: {ok(cpu <= GOAL_LAG_CPU)}"
    print(f"  {label:<34} {total:,} events in {produced:.1f} s ({total / produced:,.0f}/s): "
          f"p50 {cuts[49]:6.1f} ms  p99 {cuts[98]:6.1f} ms  max {lags[-1]:6.1f} ms  daemon CPU {cpu:4.0%}  {goals}")
    return cuts[98]


# --- (c) restart --------------------------------------------------------------------------------


def spread(samples: list[float]) -> str:
    return f"{min(samples):5.2f} s (max {max(samples):.2f} of {len(samples)})"


def bench_restart(root: Path, journal: Path, ends: dict[str, int], target: Target) -> None:
    """Restarts over the target's "sync" database and state, as (a) left them. The target
    gets its own copy of the journal, as its restarts append to it."""
    label = target.label
    own = root / f"journal-{label}"
    shutil.copytree(journal, own)
    state, url = root / f"state-{label}", target.url("sync")
    events = sum(ends.values()) + len(ends)
    runs = list(ends)
    goal = GOAL_RESTART_SECONDS

    # Nothing to deliver: the cursors are at the journal's end with their state snapshots.
    processes = [sync_process(own, state, url) for _ in range(RESTART_REPEATS)]
    inside = []
    for _ in range(RESTART_REPEATS):
        delivered, seconds, _ = replay(own, state, url)
        if delivered:
            raise SystemExit(f"a restart of a delivered journal delivered {delivered} events into {url}")
        inside.append(seconds)
    print(f"  {label:<11} runrelay sync, nothing to deliver: process start -> exit {spread(processes)}, "
          f"run_sync in-process {spread(inside)}  {ok(max(processes) <= goal)}")

    # The daemon, from its start until an event appended at once is committed.
    applied = target.applied("sync")
    per_run = events // len(runs)
    for case, run in (("a new run", None), (f"a RUNNING run of {per_run:,} events", runs[0])):
        # The writer first: resume verifies the run's journal, which is the producer's time.
        writer = JournalWriter.create(own) if run is None else JournalWriter.resume(own, run)
        daemon = Daemon(own, state, url, root)
        if run is None:
            seq = writer.append(Kind.STARTED, {"command": "main", "config": {}, "start_time": T0})
        else:
            seq = writer.append_metric(**metric(10**9))
        total = wait_applied(applied, writer.run, seq, daemon) - daemon.started
        writer.close()
        ready = f"{daemon.ready - daemon.started:.2f} s" if daemon.ready else "-"
        print(f"  {label:<11} runrelay daemon, one event into {case:<29} start -> READY {ready}, "
              f"start -> committed {total:5.2f} s  {ok(total <= goal)}")
        daemon.stop()
    applied.close()

    # A cursor one batch behind its sink: the sink committed, the daemon was killed before
    # it saved the cursor (the crash test counts such kills).
    behind = root / f"state-{label}-behind"
    shutil.copytree(state, behind)
    append_points(own, runs[-1], LAGGING_POINTS)
    replay(own, state, url)
    shutil.rmtree(state)
    shutil.move(behind, state)
    seconds = sync_process(own, state, url)
    print(f"  {label:<11} runrelay sync, one run's cursor {LAGGING_POINTS:,} events behind its sink "
          f"(run of {per_run + LAGGING_POINTS:,} events): {seconds:5.2f} s  {ok(seconds <= goal)}")

    # The state directory lost: no cursors, the sink holds everything.
    seconds = sync_process(own, root / f"state-{label}-lost", url)
    print(f"  {label:<11} runrelay sync, state directory lost (no cursors, {events:,} events held): "
          f"{seconds:5.2f} s  {ok(seconds <= goal)}")


# --- (d) memory of a live run -------------------------------------------------------------------


def megabytes(size: int) -> str:
    return f"{size / 2**20:6.1f} MB"


def live_run_memory(root: Path, target: Target, points: int) -> dict[str, float]:
    """`runrelay daemon` delivering one live run while its ``points`` are appended as fast
    as the writer goes; its memory at READY, its peak RSS and peak anonymous RSS."""
    home = root / f"memory-{target.label}-{points}"
    (home / "journal").mkdir(parents=True)
    database = f"memory{points}"
    daemon = Daemon(home / "journal", home / "state", target.url(database), home)
    daemon.wait_ready()
    time.sleep(0.5)  # let its start settle (imports done, loops idle)
    at_ready = daemon.memory()
    applied = target.applied(database)
    peak_anon = [at_ready["RssAnon"]]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(RSS_POLL_SECONDS):
            with contextlib.suppress(OSError, KeyError):
                peak_anon.append(daemon.memory()["RssAnon"])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    begin = time.monotonic()
    writer = JournalWriter.create(home / "journal")  # left open: the run stays live to the end
    writer.append(Kind.STARTED, STARTED)
    for step in range(points):
        last = writer.append_metric(**metric(step))
    produced = time.monotonic() - begin
    wait_applied(applied, writer.run, last, daemon)
    delivered = time.monotonic() - begin
    sampling.set()
    sampler.join()
    after = daemon.memory()
    writer.close()
    applied.close()
    daemon.stop()
    return {"produced": produced, "delivered": delivered, "ready": at_ready["VmRSS"], "peak": after["VmHWM"],
            "anon": max(peak_anon), "anon_ready": at_ready["RssAnon"]}


def bench_memory(root: Path, target: Target, points: int) -> None:
    sizes = [max(1, points // 10), points]
    seen = {}
    for size in sizes:
        seen[size] = live_run_memory(root, target, size)
        m = seen[size]
        print(f"  {target.label:<11} live run of {size:>9,} points: appended in {m['produced']:5.1f} s, all "
              f"committed after {m['delivered']:5.1f} s; RSS at READY {megabytes(m['ready'])}, "
              f"peak RSS {megabytes(m['peak'])}, peak anonymous RSS {megabytes(m['anon'])}")
    small, big = seen[sizes[0]], seen[sizes[1]]
    ratio = big["peak"] / small["peak"]
    growth = (big["peak"] - big["ready"]) / max(1, small["peak"] - small["ready"])
    print(f"  {target.label:<11} {sizes[1] // sizes[0]}x the points: peak RSS x{ratio:.2f}, peak anonymous RSS "
          f"x{big['anon'] / small['anon']:.2f}, growth over READY x{growth:.2f}  "
          f"goal peak RSS x <= {GOAL_MEMORY_RATIO}: {ok(ratio <= GOAL_MEMORY_RATIO)}")


# --- (e) bytes a FileStorage store is handed for one long run --------------------------------------


def bench_bytes(root: Path, targets: list["StoreTarget"], points: int, rate: int) -> None:
    """bench/filestorage.py's run (four names, a beat every 10 s, then completed) replayed
    into each store a second of the run at a time with the default cadence, beside Sacred's
    FileStorageObserver handed the same run."""
    import filestorage  # bench/filestorage.py

    beat = 10.0
    theirs = filestorage.sacred_observer(root / "bytes-sacred", points, rate, beat)
    print(f"  Sacred FileStorageObserver  {theirs['bytes'] / 1e6:9,.1f} MB written (wchar) in "
          f"{theirs['seconds']:.1f} s; final metrics.json {theirs['metrics.json'] / 1e6:,.1f} MB")
    journal = filestorage.Journal(root / "bytes-journal")
    run, ends = filestorage.write_journal(journal.root, points, rate, beat)
    for target in targets:
        ours = filestorage.replay(target.url("bytes"), journal, run, ends)
        print(f"  {target.label:<11} {ours['bytes'] / 1e6:9,.1f} MB put in {ours['puts']:,} objects "
              f"({ours['metrics.json']} metrics.json), {ours['events'] / ours['seconds']:,.0f} events/s; "
              f"Sacred wrote {theirs['bytes'] / ours['bytes']:.1f}x the bytes")


# --- main ---------------------------------------------------------------------------------------


def names(text: str, known: tuple[str, ...]) -> list[str]:
    picked = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in picked if name not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)} (known: {', '.join(known)})")
    return picked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=100_000, help="metric points in the journal of (a) and (c)")
    parser.add_argument("--runs", type=int, default=20, help="runs they are spread over")
    parser.add_argument("--sinks", type=lambda text: names(text, SINKS), default=list(SINKS),
                        help=f"comma-separated, of {', '.join(SINKS)} (default: all)")
    parser.add_argument("--only", type=lambda text: names(text, SECTIONS), default=list(SECTIONS),
                        help=f"comma-separated sections, of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--fixed-runs", type=int, default=1000, help="runs of the fixed-cost journal of (a')")
    parser.add_argument("--fixed-points", type=int, default=100, help="metric points in each of them")
    parser.add_argument("--lag-seconds", type=float, default=2.0, help="how long the producer runs (b)")
    parser.add_argument("--lag-rates", type=lambda text: [int(rate) for rate in text.split(",")],
                        default=[10_000, 50_000], help="comma-separated events/s the producer appends (b)")
    parser.add_argument("--memory-points", type=int, default=100_000,
                        help="points of the bigger live run in (d); the smaller has a tenth")
    parser.add_argument("--store-points", type=int, default=100_000,
                        help="points of the run of (e), logged at --store-rate per second of its time")
    parser.add_argument("--store-rate", type=int, default=1_000, help="points per second of the run of (e)")
    parser.add_argument("--profile", action="store_true", help="cProfile a separate SQLite replay in (a)")
    parser.add_argument("--dir", type=Path, help="work directory (default: a temp dir, removed after)")
    args = parser.parse_args()

    root = Path(args.dir or tempfile.mkdtemp(prefix="runrelay-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    targets: list[Target] = []
    try:
        print(f"runrelay replay benchmark: python {sys.version.split()[0]}, {os.cpu_count()} CPUs, work dir {root}")
        targets = start_targets(root, args.sinks)
        if "replay" in args.only or "restart" in args.only:
            journal = root / "journal"
            begin = time.perf_counter()
            ends = write_journal(journal, args.runs, args.points)
            events = sum(ends.values()) + len(ends)
            seconds = time.perf_counter() - begin
            print(f"journal: {args.runs} RUNNING runs, {events:,} events written in {seconds:.1f} s")
            show = "replay" in args.only
            if show:
                print(f"\n(a) replay {events:,} journaled events ({DEFAULT_BATCH_EVENTS}-event batches) beside a "
                      f"bulk insert of the same rows into an equivalent table, {BULK_ROWS_PER_TRANSACTION} rows "
                      f"per transaction")
            for target in targets:
                bench_replay(root, journal, ends, target, show, args.profile)
            if show:
                read, delivered = journal_reads(journal, root / "state-reads", targets[0].url("reads"))
                runs = len(ends)  # the dead-run judge reads each run's first record (its process)
                print(f"  runrelay sync read {read:,} journal records to deliver {delivered:,} events in {runs} runs "
                      f"(x{read / max(1, delivered):.2f}; the dead-run judge reads a run's first record) "
                      f"goal: never twice: {ok(read <= delivered + runs)}")

        if "fixed" in args.only:
            many = root / "journal-many"
            many_ends = write_journal(many, args.fixed_runs, args.fixed_runs * args.fixed_points)
            fixed_events = sum(many_ends.values()) + len(many_ends)
            few = root / "journal-few"
            few_ends = write_journal(few, args.runs, fixed_events - args.runs)
            print(f"\n(a') a run's fixed cost: {args.fixed_runs:,} runs of {args.fixed_points} points beside "
                  f"{args.runs} runs of as many events in all")
            for target in targets:
                bench_fixed_cost(root, many, many_ends, few, few_ends, target)

        if "lag" in args.only:
            for rate in args.lag_rates:
                print(f"\n(b) lag append -> committed in SQLite, producer at {rate:,} events/s "
                      f"for {args.lag_seconds:.0f} s, `runrelay daemon` running")
                bench_lag(root / f"lag-default-{rate}", args.lag_seconds, rate,
                          f"default (batch_wait_seconds {DEFAULT_BATCH_WAIT_SECONDS})")
                bench_lag(root / f"lag-nowait-{rate}", args.lag_seconds, rate, "batch_wait_seconds 0",
                          RUNRELAY_DELIVERY_BATCH_WAIT_SECONDS="0")

        if "restart" in args.only:
            print(f"\n(c) restart with {events:,} events delivered (goal <= {GOAL_RESTART_SECONDS:.0f} s)")
            for target in targets:
                bench_restart(root, journal, ends, target)

        if "memory" in args.only:
            print(f"\n(d) memory of `runrelay daemon` delivering one live run, its points appended meanwhile "
                  f"as fast as the writer goes")
            for target in targets:
                bench_memory(root, target, args.memory_points)
        stores = [target for target in targets if isinstance(target, StoreTarget)]
        if "bytes" in args.only and stores:
            print(f"\n(e) bytes handed to each store for one run of {args.store_points:,} points "
                  f"({args.store_rate:,}/s of its time) with the default rewrite cadence, beside Sacred's "
                  f"FileStorageObserver")
            bench_bytes(root, stores, args.store_points, args.store_rate)
    finally:
        for target in targets:
            target.close()
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

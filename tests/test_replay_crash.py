"""Effectively once, proven by real crashes: SIGKILL `runrelay daemon` at 100+ random points
while it replays a journal into SQL, then compare every table with the journal row by row.

The journal holds 30 runs (heartbeats with growing output, thousands of metric points over
several names with NaN and infinities, artifacts and a resource copied into the blob store,
every kind of ending, two runs left RUNNING). While the daemon is killed and restarted, with
a random batch size each time, experiments keep appending to live runs and one new run starts,
so there is always something in flight. A final `runrelay sync` delivers the rest; then each
run row must equal the fold of its journal, and every metric point, artifact and resource
must be stored exactly once. ``pytest -s`` prints one summary line per backend.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from runrelay.eventlog.events import Kind
from runrelay.eventlog.fold import fold
from runrelay.eventlog.reader import Journal
from runrelay.eventlog.writer import JournalWriter

RUNRELAY = Path(sys.executable).parent / "runrelay"
SEED = int(os.environ.get("RUNRELAY_TEST_SEED", "20240501"))
KILLS = 100
RUNS = 30
LEFT_RUNNING = 2  # of RUNS: no ending, writer gone
# A backlog that outlasts most of the kills (SQLite replays about twice as fast).
POINTS_PER_RUN = {"sqlite": (20000, 32000), "postgres": (10000, 16000)}
LIVE_RUNS = 3  # appended to during the kills; a fourth starts among them
NEW_RUN_AFTER_SECONDS = 10.0
KILL_AFTER_SECONDS = (0.05, 1.0)  # how long each daemon lives: from mid-import to mid-replay
BATCH_EVENTS = [7, 50, 500, 2000, 5000]  # per daemon start: batch boundaries move between restarts
PRODUCER_TICK_SECONDS = 0.02
WAIT_SECONDS = 120.0  # generous bound on things that take a second or two; never asserted on

T0 = dt.datetime(2024, 5, 1, 12, 0, 0, 123456)  # naive UTC, as Sacred hands observers times
NAMES = ["training.loss", "accuracy", "lr", "grad norm"]
SOURCE_TEXT = "import sacred  # train.py: é ✓\n"
EX_INFO = {
    "name": "replay",
    "base_dir": "/experiments",
    "sources": [{"py/tuple": ["train.py", hashlib.md5(SOURCE_TEXT.encode()).hexdigest()]}],
    "dependencies": ["numpy==1.26.4", "sacred==0.8.7"],
    "repositories": [],
    "mainfile": "train.py",
}
HOST_INFO = {"hostname": "node-1", "cpu": "Test CPU", "os": ["Linux", "Linux-6.1-x86_64"],
             "python_version": "3.11.7", "ENV": {}}


# --- experiments that write the journal ----------------------------------------------------------


class Experiment:
    """One run's producer: deterministic content from its own random generator."""

    def __init__(self, journal: Path, files: Path, seed: int):
        self.writer = JournalWriter.create(journal)
        self.run = self.writer.run
        self.files = files
        self.rng = random.Random(seed)
        self.seconds = 0.0
        self.steps = dict.fromkeys(NAMES, 0)
        self.beats = 0
        self.output = ""
        self.artifacts = 0
        self.appended_points = 0

    def now(self) -> dt.datetime:
        self.seconds += self.rng.uniform(0.0, 0.01)
        return T0 + dt.timedelta(seconds=round(self.seconds, 6))

    def start(self) -> None:
        source = self.files / f"train-{self.run}.py"
        source.write_text(SOURCE_TEXT)
        stored = self.writer.store_file(source)
        seed = self.rng.randrange(10**6)
        self.writer.append(Kind.STARTED, {
            "ex_info": EX_INFO, "command": "main", "host_info": HOST_INFO, "start_time": self.now(),
            "config": {"seed": seed, "lr": self.rng.choice([0.1, 0.01, 1e-3]), "layers": [64, 32], "tag": "α"},
            "meta_info": {"command": "main", "options": {"--name": None}}, "sources": [{"name": "train.py", **stored}],
        })
        path = self.files / f"data-{self.run}.csv"
        path.write_text("x,y\n1,2\n")
        self.writer.append(Kind.RESOURCE, {"filename": str(path), **self.writer.store_file(path)})

    def points(self, count: int) -> None:
        for _ in range(count):
            name = self.rng.choice(NAMES)
            step = self.steps[name]
            self.steps[name] += 1
            body = {"name": name, "step": step, "value": self._value(), "timestamp": self.now()}
            self.writer.append(Kind.METRICS, body)
            self.appended_points += 1
            if self.rng.random() < 0.01:  # the same point logged twice is stored twice
                self.writer.append(Kind.METRICS, body)
                self.appended_points += 1

    def _value(self):
        roll = self.rng.random()
        if roll < 0.03:
            return math.nan
        if roll < 0.05:
            return self.rng.choice([math.inf, -math.inf])
        if roll < 0.10:
            return self.rng.randrange(-1000, 1000)  # ints stay ints in the journal
        return self.rng.uniform(-1e3, 1e3)

    def beat(self) -> None:
        self.beats += 1
        lines = "".join(f"epoch {self.beats}.{i}: loss {self.rng.random():.5f} ✓\n" for i in range(3))
        body = {"beat_time": self.now(), "info": {"epoch": self.beats, "best": self.rng.random()},
                "result": self.rng.choice([None, self.rng.random()])}
        if self.rng.random() < 0.1:  # captured_out_filter rewrote the text: the whole of it
            self.output = self.output[len(self.output) // 2:] + lines
            body["captured_out"] = self.output
        else:
            self.output += lines
            body["captured_out_append"] = lines
        self.writer.append(Kind.HEARTBEAT, body)

    def artifact(self) -> None:
        self.artifacts += 1
        path = self.files / f"artifact-{self.run}-{self.artifacts}.bin"
        path.write_bytes(self.rng.randbytes(self.rng.randrange(1, 20_000)))
        stored = self.writer.store_file(path)
        name = self.rng.choice(["model.pt", f"checkpoint-{self.artifacts}.pt"])  # a name can repeat
        self.writer.append(Kind.ARTIFACT, {"name": name, "filename": str(path), **stored,
                                           "metadata": {"epoch": self.beats}, "content_type": None})
        path.write_bytes(b"rewritten after the event: the journal keeps what it saw")

    def work(self, points: int) -> None:
        """A stretch of training: points, a heartbeat, sometimes an artifact."""
        self.points(points)
        self.beat()
        if self.rng.random() < 0.15:
            self.artifact()

    def end(self, how: str | None) -> None:
        """Append an ending (None: none, the run stays RUNNING) and close the writer."""
        if how == "completed":
            result = self.rng.choice([self.rng.random(), {"accuracy": self.rng.random(), "epochs": self.beats}])
            self.writer.append(Kind.COMPLETED, {"stop_time": self.now(), "result": result})
        elif how == "failed":
            trace = ["Traceback (most recent call last):\n", '  File "train.py", line 3\n', "ValueError: boom\n"]
            self.writer.append(Kind.FAILED, {"fail_time": self.now(), "fail_trace": trace})
        elif how in ("INTERRUPTED", "TIMEOUT"):
            self.writer.append(Kind.INTERRUPTED, {"interrupt_time": self.now(), "status": how})
        self.writer.close()


ENDINGS = ["completed", "failed", "INTERRUPTED", "TIMEOUT"]


def write_journal(journal: Path, files: Path, rng: random.Random, runs: int, points: tuple[int, int],
                  left_running: int) -> int:
    """``runs`` finished experiments (``left_running`` of them without an ending); returns
    how many metric points they hold."""
    files.mkdir(parents=True, exist_ok=True)
    total = 0
    for index in range(runs):
        experiment = Experiment(journal, files, rng.randrange(2**32))
        experiment.start()
        target = rng.randrange(*points)
        while sum(experiment.steps.values()) < target:
            experiment.work(rng.randrange(50, 400))
        experiment.end(None if index < left_running else ENDINGS[index % len(ENDINGS)])
        total += experiment.appended_points
    return total


class Producer:
    """A thread appending to live runs (and starting one more) until stopped."""

    def __init__(self, journal: Path, files: Path, rng: random.Random, live: int):
        self.journal, self.files, self.rng = journal, files, rng
        self.live = [self._experiment() for _ in range(live)]
        for experiment in self.live:
            experiment.start()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="producer", daemon=True)

    def _experiment(self) -> Experiment:
        return Experiment(self.journal, self.files, self.rng.randrange(2**32))

    def _run(self) -> None:
        begun = time.monotonic()
        try:
            while not self.stop.wait(PRODUCER_TICK_SECONDS):
                if len(self.live) == LIVE_RUNS and time.monotonic() - begun > NEW_RUN_AFTER_SECONDS:
                    self.live.append(self._experiment())
                    self.live[-1].start()
                    self.live[-1].work(self.rng.randrange(5, 40))
                self.rng.choice(self.live).work(self.rng.randrange(5, 40))
        except BaseException as error:  # noqa: BLE001 - reported by finish()
            self.error = error

    def __enter__(self) -> "Producer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def finish(self) -> None:
        """End the live runs: every kind of ending, and one left RUNNING."""
        assert self.error is None, f"the producer failed: {self.error!r}"
        for index, experiment in enumerate(self.live):
            experiment.end([None, "completed", "failed", "TIMEOUT"][index % 4])


# --- the daemon ---------------------------------------------------------------------------------


def runrelay_env(home: Path, **settings: str) -> dict[str, str]:
    """A clean environment: no stray config file or RUNRELAY_* setting from the caller."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RUNRELAY_")}
    return {**env, "RUNRELAY_HOME": str(home), **settings}


def delivery_args(command: str, journal: Path, state: Path, *urls: str) -> list[str]:
    args = [str(RUNRELAY), command, "--journal", str(journal), "--state", str(state)]
    for url in urls:
        args += ["--sink", url]
    return args


def sync(journal: Path, state: Path, home: Path, *urls: str) -> int:
    """`runrelay sync` must succeed; returns how many events it delivered."""
    result = subprocess.run([*delivery_args("sync", journal, state, *urls), "--no-progress"], capture_output=True,
                            text=True, env=runrelay_env(home), timeout=WAIT_SECONDS)
    assert result.returncode == 0, f"runrelay sync failed ({result.returncode}):\n{result.stdout}{result.stderr}"
    words = result.stdout.split()
    assert words[0] == "delivered", result.stdout
    return int(words[1])


def sql_after_kill(engine: sa.Engine, state: Path) -> tuple[int, bool]:
    """The sink's metric rows (0 before it made its tables), and whether some run's saved
    cursor is behind what the sink holds: the kill fell between a commit and its cursor save."""
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT count(*) FROM metric")).scalar()
            applied = dict(conn.execute(sa.text("SELECT uid, applied_seq FROM runrelay_run")).all())
    except sa.exc.ProgrammingError:  # PostgreSQL: no table yet
        return 0, False
    except sa.exc.OperationalError as error:  # SQLite: no table (or no file) yet
        if "no such table" in str(error) or "unable to open" in str(error):
            return 0, False
        raise
    return rows, cursor_behind(state, applied)


def cursor_behind(state: Path, applied: dict[str, int]) -> bool:
    """Whether some run's saved cursor is behind ``applied`` (uid -> the sink's applied seq)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{state / 'state.sqlite'}?mode=ro", uri=True)) as db:
            cursors = dict(db.execute("SELECT run, seq FROM cursors").fetchall())
    except sqlite3.OperationalError:  # no state yet
        cursors = {}
    return any(seq + 1 > cursors.get(uid, 0) for uid, seq in applied.items())


def kill_repeatedly(journal: Path, state: Path, url: str, home: Path, kills: int, rng: random.Random,
                    log: Path, backlog: int, after_kill=None) -> dict[str, int]:
    """Start the daemon and SIGKILL it after a random time, ``kills`` times. Counts the kills
    after which the sink held fewer metric rows than the journal's initial ``backlog`` of
    points (still replaying it), and those after which it held more than before (delivering).
    ``after_kill(state)`` reads the sink: (metric points, a cursor behind it); SQL's by default."""
    engine = sa.create_engine(url, poolclass=NullPool) if after_kill is None else None
    after_kill = after_kill or (lambda state: sql_after_kill(engine, state))
    seen = {"kills": 0, "in_backlog": 0, "rows_grew": 0, "cursor_behind": 0}
    rows = 0
    try:
        with open(log, "a") as stderr:
            for attempt in range(kills):
                batch = rng.choice(BATCH_EVENTS)
                stderr.write(f"--- daemon {attempt}: batch_events {batch}\n")
                stderr.flush()
                daemon = subprocess.Popen(
                    [*delivery_args("daemon", journal, state, url), "--log-level", "WARNING"],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                    env=runrelay_env(home, RUNRELAY_DELIVERY_BATCH_EVENTS=str(batch),
                                     RUNRELAY_DELIVERY_RESCAN_SECONDS="0.5"))
                time.sleep(rng.uniform(*KILL_AFTER_SECONDS))
                exited = daemon.poll()
                daemon.kill()
                daemon.wait()
                assert exited is None, f"the daemon exited on its own ({exited}):\n{tail(log)}"
                seen["kills"] += 1
                now, behind = after_kill(state)
                seen["cursor_behind"] += behind
                seen["rows_grew"] += now > rows
                seen["in_backlog"] += now < backlog
                rows = now
    finally:
        if engine is not None:
            engine.dispose()
    return seen


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:]


# --- comparing a database with the journal ------------------------------------------------------


def value_key(value) -> float | str:
    number = float(value)
    return "nan" if math.isnan(number) else number


def finite_or_none(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def loads(text: str | None, empty):
    return empty if text is None else json.loads(text)


def differences(expected: Counter, got: Counter, what: str) -> list[str]:
    missing, extra = expected - got, got - expected
    problems = [f"{what} missing ({sum(missing.values())}): {row}" for row in list(missing)[:5]]
    problems += [f"{what} extra or duplicated ({sum(extra.values())}): {row}" for row in list(extra)[:5]]
    return problems


def assert_sink_matches_journal(url: str, journal_dir: Path) -> dict[str, int]:
    """Every table holds exactly the journal's events: one run row per run, equal to the fold
    of its journal; every metric point, artifact and resource link exactly once."""
    journal = Journal(journal_dir)
    runs = journal.runs()
    states, points, artifacts, resources = {}, Counter(), Counter(), Counter()
    for uid in runs:
        events = list(journal.events(uid))
        states[uid] = fold(events)
        for event in events:
            body = event.body
            if event.kind is Kind.METRICS:
                points[(uid, body["name"], body["step"], value_key(body["value"]), body["timestamp"])] += 1
            elif event.kind is Kind.ARTIFACT:
                artifacts[(uid, body["name"], body["digest"])] += 1
            elif event.kind is Kind.RESOURCE:
                resources[(uid, body["filename"], body["md5"], body["digest"])] += 1

    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            tables = sa.MetaData()
            tables.reflect(conn)
            t = tables.tables
            books = conn.execute(sa.select(t["runrelay_run"])).all()
            run_rows = conn.execute(sa.select(t["run"])).all()
            metric_rows_ = conn.execute(sa.select(t["metric"])).all()
            artifact_rows = conn.execute(sa.select(t["artifact"])).all()
            resource_rows = conn.execute(
                sa.select(t["runs_resources"].c.run_id, t["resource"].c.filename, t["resource"].c.md5sum,
                          t["resource"].c.content)
                .join_from(t["runs_resources"], t["resource"],
                           t["runs_resources"].c.resource_id == t["resource"].c.resource_id)).all()
            shared = {name: conn.execute(sa.select(sa.func.count()).select_from(t[name])).scalar()
                      for name in ("experiment", "host", "source", "dependency", "experiments_sources",
                                   "experiments_dependencies", "resource")}
    finally:
        engine.dispose()

    problems: list[str] = []
    uid_of = {book.run_id: book.uid for book in books}
    book_of = {book.uid: book for book in books}
    if sorted(book_of) != runs or len(books) != len(runs):
        problems.append(f"bookkeeping holds {len(books)} runs, the journal {len(runs)}: "
                        f"missing {sorted(set(runs) - set(book_of))[:3]}, extra {sorted(set(book_of) - set(runs))[:3]}")
    run_ids = [row.run_id for row in run_rows]
    if len(run_ids) != len(runs) or len(set(run_ids)) != len(run_ids) or set(run_ids) != set(uid_of):
        duplicated = [run_id for run_id, count in Counter(run_ids).items() if count > 1]
        problems.append(f"{len(run_rows)} run rows for {len(runs)} journal runs (duplicated run ids {duplicated[:5]}, "
                        f"unbooked {sorted(set(run_ids) - set(uid_of))[:5]})")
    for row in run_rows:
        uid = uid_of.get(row.run_id)
        if uid not in states:
            continue
        state, book = states[uid], book_of[uid]
        expected = {
            "status": state.status, "command": state.command, "start_time": state.start_time,
            "heartbeat": state.heartbeat, "stop_time": state.stop_time, "captured_out": state.captured_out,
            "fail_trace": None if state.fail_trace is None else "\n".join(state.fail_trace),
            "result": finite_or_none(state.result), "config": state.config, "info": state.info,
            "applied_seq": state.last_seq, "result_json": state.result, "death_reason": None,
        }
        stored = {
            **{name: getattr(row, name) for name in ("status", "command", "start_time", "heartbeat", "stop_time",
                                                     "fail_trace", "result")},
            # NULL until a heartbeat sets them, as in Sacred's SqlObserver; the fold starts from "" and {}
            "captured_out": row.captured_out or "", "info": loads(row.info, {}), "config": loads(row.config, {}),
            "applied_seq": book.applied_seq, "result_json": loads(book.result, None), "death_reason": book.death_reason,
        }
        for name, want in expected.items():
            if stored[name] != want:
                problems.append(f"run {uid} (run_id {row.run_id}) {name}: stored {str(stored[name])[:200]!r}, "
                                f"journal folds to {str(want)[:200]!r}")

    stored_points = Counter(
        (uid_of.get(row.run_id), row.name, row.step,
         value_key(row.value if row.nonfinite is None else float(row.nonfinite)), row.timestamp)
        for row in metric_rows_)
    problems += differences(points, stored_points, "metric point")
    stored_artifacts = Counter((uid_of.get(row.run_id), row.filename, hashlib.sha256(row.content).hexdigest())
                               for row in artifact_rows)
    problems += differences(artifacts, stored_artifacts, "artifact")
    stored_resources = Counter((uid_of.get(row.run_id), row.filename, row.md5sum, hashlib.sha256(row.content).hexdigest())
                               for row in resource_rows)
    problems += differences(resources, stored_resources, "resource link")
    distinct_resources = len({(filename, md5) for _, filename, md5, _ in resources})
    want_shared = {"experiment": 1, "host": 1, "source": 1, "dependency": 2, "experiments_sources": 1,
                   "experiments_dependencies": 2, "resource": distinct_resources}
    if shared != want_shared:
        problems.append(f"shared rows {shared}, expected {want_shared}")

    assert not problems, f"{len(problems)} difference(s) between the sink and the journal:\n" + "\n".join(problems[:40])
    return {"runs": len(runs), "events": sum(state.last_seq + 1 for state in states.values()),
            "metric rows": len(metric_rows_), "artifact rows": len(artifact_rows),
            "resource links": len(resource_rows)}


# --- the test -----------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request, tmp_path) -> tuple[str, str]:
    """(name, sink URL)"""
    if request.param == "sqlite":
        return "sqlite", f"sqlite:///{tmp_path / 'sink' / 'runs.sqlite'}"
    return "postgres", request.getfixturevalue("postgres_url")


@pytest.mark.slow
def test_sigkill_at_random_points_while_replaying_stores_every_event_exactly_once(backend, tmp_path):
    name, sink_url = backend
    rng = random.Random(SEED)
    journal, state, files, log = tmp_path / "journal", tmp_path / "state", tmp_path / "files", tmp_path / "daemon.log"
    began = time.monotonic()
    backlog = write_journal(journal, files, rng, RUNS, POINTS_PER_RUN[name], LEFT_RUNNING)
    built = time.monotonic()
    producer = Producer(journal, files, random.Random(rng.randrange(2**32)), LIVE_RUNS)
    with producer:
        seen = kill_repeatedly(journal, state, sink_url, tmp_path, KILLS, rng, log, backlog)
    producer.finish()
    delivered = sync(journal, state, tmp_path, sink_url)
    assert sync(journal, state, tmp_path, sink_url) == 0  # nothing is left, nothing is sent twice

    counts = assert_sink_matches_journal(sink_url, journal)
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "CRITICAL" not in text, tail(log)
    print(f"\n{name}: {seen['kills']} SIGKILLs ({seen['in_backlog']} while replaying the "
          f"{backlog}-point backlog, {seen['rows_grew']} with rows grown since the previous kill, {seen['cursor_behind']} leaving a "
          f"cursor behind its sink), final sync "
          f"delivered {delivered}; "
          + ", ".join(f"{count} {what}" for what, count in counts.items())
          + f"; identical to the journal (journal built in {built - began:.1f} s, "
            f"total {time.monotonic() - began:.1f} s)")

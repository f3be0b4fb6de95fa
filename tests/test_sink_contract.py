"""The sink contract (sinks/base.py), one suite for every backend.

Each backend joins with a read-back adapter: how to make a fresh sink URL, read a run back
as plain values, freeze the store, and spell a URL with a password. Batches and dead
letters come from ``sinkkit``, made exactly as the daemon makes them.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sqlite3
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pymongo
import pytest
import sqlalchemy as sa

from runrelay.daemon.delivery import apply_runs_isolating
from runrelay.eventlog import Journal
from runrelay.sinks.base import PermanentSinkError, SinkError, TransientSinkError, UnusableSinkError
from runrelay.sinks.registry import sink_for
from runrelay.sinks.sql_tables import artifact, metric, resource, run, runrelay_run, runs_resources
from sinkkit import Delivery, artifact as artifact_step, deliver, lifecycle, make_files, open_sink, write_run

TIMEOUT = 2.0  # the sinks' timeout_seconds in these tests
HANG = 60.0  # a call still blocked after this long is blocked for good


class SqlReadBack:
    """The SQL sink's tables read back as plain values."""

    def __init__(self, url: str, server=None, sqlite_path: Path | None = None):
        self.url, self.server, self.sqlite_path = url, server, sqlite_path

    def run(self, uid: str) -> dict:
        engine = sa.create_engine(self.url)
        try:
            with engine.connect() as conn:
                run_id = conn.execute(sa.select(runrelay_run.c.run_id).where(runrelay_run.c.uid == uid)).scalar()
                row = conn.execute(sa.select(run).where(run.c.run_id == run_id)).one()
                metrics = conn.execute(sa.select(metric.c.name, metric.c.step, metric.c.value, metric.c.nonfinite)
                                       .where(metric.c.run_id == run_id)).all()
                artifacts = conn.execute(sa.select(artifact.c.filename, artifact.c.content)
                                         .where(artifact.c.run_id == run_id)).all()
                resources = conn.execute(sa.select(resource.c.filename, resource.c.content).join(runs_resources)
                                         .where(runs_resources.c.run_id == run_id)).all()
                runs = conn.execute(sa.select(sa.func.count()).select_from(run)).scalar()
        finally:
            engine.dispose()
        return {
            "status": row.status, "start_time": row.start_time, "heartbeat": row.heartbeat,
            "stop_time": row.stop_time, "captured_out": row.captured_out, "config": json.loads(row.config),
            "info": row.info and json.loads(row.info), "result": row.result,
            "metrics": sorted((name, step, nonfinite or value) for name, step, value, nonfinite in metrics),
            "artifacts": sorted(map(tuple, artifacts)), "resources": sorted(map(tuple, resources)),
            "runs in the store": runs,
        }

    @contextlib.contextmanager
    def frozen(self):
        if self.server is not None:
            with self.server.frozen():
                yield
            return
        with contextlib.closing(sqlite3.connect(self.sqlite_path, isolation_level=None)) as holder:
            holder.execute("BEGIN IMMEDIATE")  # SQLite's hang: another process holds the write lock
            yield
            holder.execute("ROLLBACK")

    def url_with_password(self, password: str, database: str | None = None, port: int | None = None) -> str | None:
        if self.server is None:
            return None  # an SQLite URL holds no credentials
        url = sa.engine.make_url(self.url).set(password=password)
        if database:
            url = url.set(database=database)
        if port:
            url = url.set(port=port)
        return url.render_as_string(hide_password=False)


class MongoReadBack:
    """The Mongo sink's runs, metrics and GridFS read back as plain values."""

    def __init__(self, url: str, server):
        self.url, self.server = url, server

    def run(self, uid: str) -> dict:
        import gridfs

        database = pymongo.uri_parser.parse_uri(self.url)["database"]
        client = pymongo.MongoClient(self.url, serverSelectionTimeoutMS=5000, timeoutMS=20000)
        try:
            db = client[database]
            document = db.runs.find_one({"runrelay.uid": uid})
            metrics = [(entry["name"], step, value) for entry in db.metrics.find({"run_id": document["_id"]})
                       for step, value in zip(entry["steps"], entry["values"])]
            fs = gridfs.GridFS(db)
            artifacts = [(entry["name"], fs.get(entry["file_id"]).read()) for entry in document["artifacts"]]
            resources = [(filename, fs.find_one({"filename": filename, "md5": md5}).read())
                         for filename, md5 in document["resources"]]
            runs = db.runs.count_documents({})
        finally:
            client.close()
        info = dict(document["info"])
        if "metrics" in info:  # ObjectIds differ between runs: the names they list
            info["metrics"] = sorted(entry["name"] for entry in info["metrics"])
        return {
            "status": document["status"], "start_time": document.get("start_time"),
            "heartbeat": document.get("heartbeat"), "stop_time": document.get("stop_time"),
            "captured_out": document.get("captured_out"), "config": document["config"], "info": info,
            "result": document.get("result"), "metrics": sorted(metrics, key=repr),
            "artifacts": sorted(artifacts), "resources": sorted(resources), "runs in the store": runs,
        }

    @contextlib.contextmanager
    def frozen(self):
        with self.server.frozen():
            yield

    def url_with_password(self, password: str, database: str | None = None, port: int | None = None) -> str:
        parts = pymongo.uri_parser.parse_uri(self.url)
        host, real_port = parts["nodelist"][0]
        return f"mongodb://runrelay:{password}@{host}:{port or real_port}/{database or parts['database']}"


class FileStorageReadBack:
    """A FileStorage sink's objects read back as plain values, through ``read(key)`` (bytes
    or None) and ``run_ids()`` of its store: a directory (sinks/filestorage_local.py), an S3
    bucket (filestorage_s3.py), a GCS bucket (filestorage_gcs.py)."""

    def __init__(self, url: str, read, run_ids, server=None):
        self.url, self.read, self.run_ids, self.server = url, read, run_ids, server

    def run(self, uid: str) -> dict:
        run_id = json.loads(self.read(f"_runrelay/runs/{uid}.json"))["id"]

        def document(name):
            return json.loads(self.read(f"{run_id}/{name}"))

        entry = document("run.json")
        metrics = [(name, step, value) for name, series in document("metrics.json").items()
                   for step, value in zip(series["steps"], series["values"])]
        resources = [(filename, self.read(self.key(location))) for filename, location in entry["resources"]]
        return {
            "status": entry["status"], "start_time": entry.get("start_time"), "heartbeat": entry.get("heartbeat"),
            "stop_time": entry.get("stop_time"), "captured_out": self.read(f"{run_id}/cout.txt").decode(),
            "config": document("config.json"), "info": document("info.json"), "result": entry.get("result"),
            "metrics": sorted(metrics, key=repr), "resources": sorted(resources),
            "artifacts": sorted((name, self.read(f"{run_id}/{name}")) for name in entry["artifacts"]),
            "runs in the store": len(self.run_ids()),
        }

    def key(self, location: str) -> str:
        """The key of a location run.json names (a directory's are absolute paths)."""
        base = self.url.split("://", 1)[1].split("?", 1)[0]
        return location[len(base):].lstrip("/") if location.startswith("/") else location

    @contextlib.contextmanager
    def frozen(self):
        if self.server is None:
            pytest.skip("a local directory has no server to freeze")
        with self.server.frozen():
            yield

    def url_with_password(self, password: str, database: str | None = None, port: int | None = None) -> None:
        return None  # FileStorage URLs hold no credentials


def directory_read_back(path: Path) -> FileStorageReadBack:
    def read(key):
        target = path / key
        return target.read_bytes() if target.exists() else None

    def run_ids():
        return [entry.name for entry in path.iterdir() if entry.name.isdigit()] if path.exists() else []

    return FileStorageReadBack(f"file://{path}", read, run_ids)


def bucket_read_back(scheme: str, server, monkeypatch, prefix: str) -> FileStorageReadBack:
    """A fresh prefix of the test bucket; the sinks reach the server through the usual
    environment (AWS_ENDPOINT_URL_S3 and keys, STORAGE_EMULATOR_HOST), as users would."""
    server.start()  # no-op unless an earlier test killed it
    if "runrelay-tests" not in server.buckets:
        server.create_bucket("runrelay-tests")
    if scheme == "s3":
        for name, value in (("AWS_ENDPOINT_URL_S3", server.endpoint), ("AWS_ACCESS_KEY_ID", "test"),
                            ("AWS_SECRET_ACCESS_KEY", "test"), ("AWS_DEFAULT_REGION", server.region)):
            monkeypatch.setenv(name, value)
    else:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.endpoint)
    return FileStorageReadBack(f"{scheme}://runrelay-tests/{prefix}", lambda key: server.read("runrelay-tests", f"{prefix}/{key}"),
                               lambda: server.run_ids("runrelay-tests", prefix), server=server)


@pytest.fixture(params=["sqlite", "postgres", "mariadb", "mongo", "file", "s3", "gs"])
def store(request, tmp_path, monkeypatch):
    """A fresh store of each backend, with its read-back adapter."""
    if request.param == "sqlite":
        path = tmp_path / "db" / "runs.db"
        return SqlReadBack(f"sqlite:///{path}", sqlite_path=path)
    if request.param == "file":
        return directory_read_back(tmp_path / "runs")
    if request.param in ("s3", "gs"):
        server = request.getfixturevalue("moto_server" if request.param == "s3" else "gcs_server")
        return bucket_read_back(request.param, server, monkeypatch, f"runs-{uuid.uuid4().hex[:8]}")
    url = request.getfixturevalue(f"{request.param}_url")
    adapter = MongoReadBack if request.param == "mongo" else SqlReadBack
    return adapter(url, server=request.getfixturevalue(f"{request.param}_server"))


@pytest.fixture
def journal(journal_dir) -> Journal:
    return Journal(journal_dir)


@pytest.fixture
def files(tmp_path) -> Path:
    return make_files(tmp_path / "experiment")


@pytest.fixture
def sink(store, journal):
    sink = open_sink(store.url, journal, timeout_seconds=TIMEOUT)
    yield sink
    sink.close()


def without_time(contents: dict) -> dict:
    return {key: value for key, value in contents.items() if key != "runs in the store"}


def same(left: dict, right: dict) -> bool:
    """Equal, NaN equal to NaN."""
    def plain(value):
        if isinstance(value, float) and math.isnan(value):
            return "nan"
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        return value
    return {key: plain(value) for key, value in left.items()} == {key: plain(value) for key, value in right.items()}


def missing_blob(journal: Journal, run: str, seq: int) -> tuple[Path, bytes]:
    """Delete the blob event ``seq`` names (a damaged journal); return its path and bytes."""
    event = next(event for event in journal.events(run) if event.seq == seq)
    path = journal.blob(run, event.body["digest"])
    data = path.read_bytes()
    path.unlink()
    return path, data


# --- the contract -------------------------------------------------------------------------------


def test_applying_twice_is_applying_once(sink, store, journal, files):
    run = write_run(journal, lifecycle(files))
    deliver(sink, journal, run, 4)
    once = store.run(run)
    deliver(sink, journal, run, 4)  # the daemon lost its cursor: everything again
    deliver(sink, journal, run, 2, 7)
    assert same(store.run(run), once)
    assert once["status"] == "COMPLETED" and once["runs in the store"] == 1
    assert len(once["metrics"]) == 4 and [name for name, _ in once["artifacts"]] == ["model.bin"]


def test_a_prefix_then_everything_is_everything_once(sink, store, journal, files):
    whole = write_run(journal, lifecycle(files))
    deliver(sink, journal, whole)
    expected = without_time(store.run(whole))
    for cut in (1, 3, 6, 8, 9):
        run = write_run(journal, lifecycle(files))
        Delivery(journal, run).apply(sink, through=cut - 1)  # then the daemon crashed
        deliver(sink, journal, run)
        assert same(without_time(store.run(run)), expected), f"cut before seq {cut}"


def test_a_permanent_error_names_its_event_and_the_rest_is_applied(sink, store, journal, files):
    run = write_run(journal, lifecycle(files))
    missing_blob(journal, run, 7)
    with pytest.raises(PermanentSinkError) as caught:
        sink.apply(Delivery(journal, run).batch())
    assert caught.value.seq == 7
    assert sink.applied(run) == -1  # nothing of a refused batch stays

    delivery = deliver(sink, journal, run)
    assert list(delivery.letters) == [7]
    contents = store.run(run)
    assert contents["status"] == "COMPLETED" and contents["artifacts"] == [] and len(contents["metrics"]) == 4
    assert sink.applied(run) == 9


def test_a_redelivered_letter_is_written_once_and_leaves_applied(sink, store, journal, files):
    run = write_run(journal, lifecycle(files))
    path, data = missing_blob(journal, run, 7)
    delivery = deliver(sink, journal, run)
    path.write_bytes(data)  # the operator restored it
    delivery.redeliver(sink, 7)
    delivery.redeliver(sink, 7)  # dlq retry ran twice
    contents = store.run(run)
    assert contents["artifacts"] == [("model.bin", bytes(range(256)) * 4)]
    assert contents["status"] == "COMPLETED" and sink.applied(run) == 9


def child_preamble(journal: Journal) -> str:
    """The start of a child Python's script: sinkkit importable, ``journal`` opened."""
    return (
        "import sys, time\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from sinkkit import Delivery, open_sink\n"
        "from runrelay.eventlog import Journal\n"
        f"journal = Journal({str(journal.root)!r})\n"
    )


def kill_once_it_says(script: str, line: str) -> None:
    """Run ``script`` in a child Python and SIGKILL it once it prints ``line``."""
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == line + "\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


def test_applied_survives_a_kill_between_commit_and_cursor(store, journal, files):
    run = write_run(journal, lifecycle(files))
    script = (
        child_preamble(journal) +
        f"Delivery(journal, {run!r}).apply(open_sink({store.url!r}, journal), through=4)\n"
        "print('committed', flush=True)\n"
        "time.sleep(60)\n"
    )
    kill_once_it_says(script, "committed")
    sink = open_sink(store.url, journal)
    try:
        assert sink.applied(run) == 4  # the daemon resumes from here, its cursor unsaved
        deliver(sink, journal, run)
        reference = write_run(journal, lifecycle(files))
        deliver(sink, journal, reference)
    finally:
        sink.close()
    assert same(without_time(store.run(run)), without_time(store.run(reference)))


def test_a_frozen_store_is_a_transient_error_within_the_timeout(sink, store, journal, files):
    run = write_run(journal, lifecycle(files))
    Delivery(journal, run).apply(sink, through=4)
    outcome: list[BaseException | None] = []

    def attempt():
        try:
            deliver(sink, journal, run)
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001 - inspected below
            outcome.append(error)

    with store.frozen():
        worker = threading.Thread(target=attempt, daemon=True)
        worker.start()
        worker.join(HANG)
        blocked = worker.is_alive()
    if blocked:
        worker.join(HANG)
    assert not blocked, f"apply still blocked {HANG} s into a freeze (timeout_seconds={TIMEOUT})"
    assert isinstance(outcome[0], TransientSinkError), outcome
    deliver(sink, journal, run)  # the same sink works once the store thaws
    assert store.run(run)["status"] == "COMPLETED" and sink.applied(run) == 9


def test_a_store_that_is_down_is_a_transient_error(sink, store, journal, files):
    if store.server is None:
        pytest.skip("an SQLite file has no server to go down")
    run = write_run(journal, lifecycle(files))
    Delivery(journal, run).apply(sink, through=4)
    store.server.kill()
    try:
        for call in (lambda: deliver(sink, journal, run), lambda: sink.applied(run)):
            with pytest.raises(TransientSinkError):
                call()
    finally:
        store.server.start()
    deliver(sink, journal, run)
    assert store.run(run)["status"] == "COMPLETED"


def test_no_error_shows_the_password(store, journal):
    if store.url_with_password("x") is None:
        pytest.skip("an SQLite URL holds no password")
    closed_port = store.url_with_password("s3cr3t-pw", port=1)
    unknown = store.url_with_password("s3cr3t-pw", database="no_such_database")
    for url, expected in ((closed_port, TransientSinkError), (unknown, (UnusableSinkError, TransientSinkError))):
        sink = sink_for("test", url, {"timeout_seconds": TIMEOUT}, journal)
        with pytest.raises(expected) as caught:
            sink.open()
        sink.close()
        assert "s3cr3t-pw" not in str(caught.value) and "s3cr3t-pw" not in repr(sink)


def test_a_bug_in_the_sink_is_raised_as_itself(store, journal, files):
    """A programming error (here an AttributeError from the source the sink reads blobs
    through) is not a SinkError: the daemon stops the worker instead of dead-lettering."""

    class BrokenSource:
        def open_blob(self, run, digest):
            raise AttributeError("'NoneType' object has no attribute 'read'")

        def points(self, run, through_seq):
            return journal.points(run, through_seq)

    run = write_run(journal, [*lifecycle(files)[:7], artifact_step(files / "model.bin")])
    sink = open_sink(store.url, BrokenSource())
    delivery = Delivery(journal, run)
    try:
        with pytest.raises(AttributeError) as caught:
            delivery.apply(sink)
    finally:
        sink.close()
    assert not isinstance(caught.value, SinkError) and delivery.letters == {}


def test_a_started_event_alone_makes_a_readable_run(sink, store, journal, files):
    run = write_run(journal, lifecycle(files)[:1])
    deliver(sink, journal, run)
    contents = store.run(run)
    assert contents["status"] == "RUNNING" and contents["config"]["lr"] == 0.1
    assert contents["metrics"] == [] and contents["artifacts"] == []


# --- several runs at once (Sink.apply_runs) -------------------------------------------------------


def test_several_runs_applied_together_are_each_applied_once(sink, store, journal, files):
    runs = [write_run(journal, lifecycle(files)) for _ in range(3)]
    reference = write_run(journal, lifecycle(files))
    deliver(sink, journal, reference)
    sink.apply_runs([Delivery(journal, run).batch(through=4) for run in runs])  # then the daemon crashed
    assert sink.applied_runs(runs) == dict.fromkeys(runs, 4)
    for _ in range(2):  # everything again: what each run holds is skipped
        sink.apply_runs([Delivery(journal, run).batch() for run in runs])
    assert sink.applied_runs([*runs, "no-such-run"]) == {**dict.fromkeys(runs, 9), "no-such-run": -1}
    for run in runs:
        assert same(without_time(store.run(run)), without_time(store.run(reference)))


def test_a_permanent_error_among_several_runs_sets_aside_its_event_only(sink, store, journal, files):
    runs = [write_run(journal, lifecycle(files)) for _ in range(3)]
    missing_blob(journal, runs[1], 7)
    letters: dict[tuple[str, int], str] = {}
    stretches = [Delivery(journal, run).stretch() for run in runs]
    apply_runs_isolating(sink, stretches, lambda call: call(),
                         lambda event, reason: letters.setdefault((event.run, event.seq), reason))
    assert list(letters) == [(runs[1], 7)]
    assert sink.applied_runs(runs) == dict.fromkeys(runs, 9)
    assert [len(store.run(run)["artifacts"]) for run in runs] == [1, 0, 1]


def test_a_kill_in_the_middle_of_several_runs_leaves_each_run_applied_or_not(store, journal, files):
    """SIGKILL while the sink writes three runs' batches, blocked reading the last run's
    artifact: each run is wholly applied or not at all (``applied`` says which, and an
    applied run is complete), and delivering again makes every run whole, once."""
    runs = [write_run(journal, lifecycle(files)) for _ in range(3)]
    script = (
        child_preamble(journal) +
        "class Blocking:\n"
        "    def open_blob(self, run, digest):\n"
        f"        if run == {runs[-1]!r}:\n"
        "            print('blocked', flush=True)\n"
        "            time.sleep(60)\n"
        "        return journal.open_blob(run, digest)\n"
        "    def points(self, run, through_seq):\n"
        "        return journal.points(run, through_seq)\n"
        f"sink = open_sink({store.url!r}, Blocking())\n"
        f"sink.apply_runs([Delivery(journal, run).batch() for run in {runs!r}])\n"
    )
    kill_once_it_says(script, "blocked")
    sink = open_sink(store.url, journal)
    try:
        applied = sink.applied_runs(runs)
        assert set(applied.values()) <= {-1, 9} and applied[runs[-1]] == -1, applied
        reference = write_run(journal, lifecycle(files))
        deliver(sink, journal, reference)
        whole = without_time(store.run(reference))
        assert all(same(without_time(store.run(run)), whole) for run in runs if applied[run] == 9)
        for run in runs:
            deliver(sink, journal, run)
        assert all(same(without_time(store.run(run)), whole) for run in runs)
        assert store.run(reference)["runs in the store"] == 4
    finally:
        sink.close()

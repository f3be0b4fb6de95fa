"""The SQL sink against real SQLite, PostgreSQL and MariaDB databases (no mocks)."""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import math
import sqlite3
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from sacred.serializer import flatten

from runrelay.eventlog import Journal, JournalWriter, Kind
from runrelay.eventlog.fold import RunState, fold
from runrelay.sinks import sql
from runrelay.sinks.base import Batch, PermanentSinkError, TransientSinkError
from runrelay.sinks.registry import sink_for

T0 = dt.datetime(2024, 5, 1, 12, 0, 0, 123456)
DIALECTS = ["sqlite", "postgres", "mariadb"]


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


@pytest.fixture(params=DIALECTS)
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'runs.db'}"
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def journal(journal_dir) -> Journal:
    return Journal(journal_dir)


@pytest.fixture
def files(tmp_path) -> Path:
    """An experiment's directory: a source file, a data file, a model."""
    path = tmp_path / "experiment"
    path.mkdir()
    (path / "train.py").write_text("print('training')  # é\n")
    (path / "data.csv").write_text("1,2\n3,4\n")
    (path / "model.bin").write_bytes(bytes(range(256)) * 4)
    return path


@pytest.fixture
def sink(url, journal):
    sink = sql.SqlSink(url, journal.blob)
    sink.open()
    yield sink
    sink.close()


# --- making runs ------------------------------------------------------------------------------


def write_run(journal: Journal, steps: list[tuple[Kind, dict]]) -> str:
    """Journal one run. A body's ``file`` (a path) is stored as a blob and replaced by its
    digest, md5 and size; a started body's ``sources`` are paths stored the same way."""
    with JournalWriter.create(journal.root) as writer:
        for kind, body in steps:
            body = dict(body)
            if "file" in body:
                body.update(writer.store_file(body.pop("file")))
            if "sources" in body:
                body["sources"] = [{"name": path.name, **writer.store_file(path)} for path in body["sources"]]
            writer.append(kind, body)
    return writer.run


def started(files: Path, **changes) -> tuple[Kind, dict]:
    source = files / "train.py"
    md5 = hashlib.md5(source.read_bytes()).hexdigest()
    body = {
        "ex_info": {
            "name": "demo",
            "base_dir": str(files),
            "sources": [{"py/tuple": ["train.py", md5]}],
            "dependencies": ["numpy==1.26.4", "sacred==0.8.7"],
            "repositories": [{"url": "git@example.com:demo.git", "commit": "a" * 40, "dirty": False}] * 2,
            "mainfile": "train.py",
        },
        "command": "main",
        "host_info": {"hostname": "node-1", "cpu": "Test CPU", "os": ["Linux", "Linux-6.1-x86_64"],
                      "python_version": "3.11.7", "ENV": {}},
        "start_time": at(0),
        "config": {"lr": 0.1, "layers": [64, 32], "when": at(-60), "seed": 7},
        "meta_info": {"command": "main", "options": {}, "comment": "first try", "priority": 2},
        "sources": [source],
        "process": {"host": "node-1", "boot_id": "boot", "pid": 1, "start_ticks": 1},
    }
    return Kind.STARTED, {**body, **changes}


def point(name: str, step: int, value, second: float) -> tuple[Kind, dict]:
    return Kind.METRICS, {"name": name, "step": step, "value": value, "timestamp": at(second)}


def beat(second: float, output: str, result=None) -> tuple[Kind, dict]:
    return Kind.HEARTBEAT, {"beat_time": at(second), "info": {"epoch": second}, "result": result,
                            "captured_out_append": output}


def lifecycle(files: Path, ending: tuple[Kind, dict] | None = None) -> list[tuple[Kind, dict]]:
    model = files / "model.bin"
    return [
        started(files),
        (Kind.RESOURCE, {"filename": str(files / "data.csv"), "file": files / "data.csv"}),
        point("loss", 0, 0.5, 1),
        point("loss", 1, float("nan"), 2),
        beat(3, "epoch 1\n"),
        point("loss", 2, float("inf"), 4),
        point("accuracy", 0, 3, 4),
        (Kind.ARTIFACT, {"name": "model.bin", "filename": str(model), "file": model, "metadata": {"format": "raw"},
                         "content_type": None}),
        beat(5, "epoch 2\n", result=0.25),
        ending or (Kind.COMPLETED, {"stop_time": at(9), "result": 0.25}),
    ]


def batches(journal: Journal, run: str, *cuts: int, redelivery: bool = False) -> list[Batch]:
    """The run's events as batches, a new one starting at each seq in ``cuts``."""
    events = list(journal.events(run))
    bounds = [0, *cuts, len(events)]
    state = RunState(run, track_metrics=False)
    result = []
    for start, end in zip(bounds, bounds[1:]):
        state = fold(events[start:end], copy.deepcopy(state))
        result.append(Batch(run, events[start:end], state, redelivery))
    return result


def everything(journal: Journal, run: str) -> Batch:
    return batches(journal, run)[0]


def without(batch: Batch, seq: int) -> Batch:
    """What the daemon applies after dead-lettering ``seq`` from a whole run's batch: the
    other events, and the state folded without it (docs/daemon.md, "Dead letters")."""
    kept = [event for event in batch.events if event.seq != seq]
    return Batch(batch.run, kept, fold(kept, RunState(batch.run, track_metrics=False)))


# --- reading databases ------------------------------------------------------------------------


def query(url: str, statement) -> list[sa.Row]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(statement).all()
    finally:
        engine.dispose()


def dump(url: str) -> dict[str, list]:
    """Every row of every table of ours, in a stable order."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            tables = sql.metadata.sorted_tables
            return {table.name: sorted(conn.execute(sa.select(table)).all(), key=repr) for table in tables}
    finally:
        engine.dispose()


def run_row(url: str, run: str) -> sa.Row:
    join = sql.run.join(sql.runrelay_run, sql.run.c.run_id == sql.runrelay_run.c.run_id)
    statement = sa.select(sql.run, sql.runrelay_run.c.applied_seq, sql.runrelay_run.c.result.label("result_json"),
                          sql.runrelay_run.c.death_reason).select_from(join).where(sql.runrelay_run.c.uid == run)
    return query(url, statement)[0]


def metric_values(url: str, run_id: str) -> list[tuple]:
    rows = query(url, sa.select(sql.metric).where(sql.metric.c.run_id == run_id).order_by(sql.metric.c.metric_id))
    return [(row.name, row.step, row.value if row.nonfinite is None else float(row.nonfinite)) for row in rows]


def run_contents(url: str, run: str) -> dict:
    """What one run holds, without ids: for comparing two runs in one database."""
    row = run_row(url, run)._asdict()
    run_id = row.pop("run_id")
    row.pop("id")
    artifacts = query(url, sa.select(sql.artifact.c.filename, sql.artifact.c.content)
                      .where(sql.artifact.c.run_id == run_id).order_by(sql.artifact.c.artifact_id))
    resources = query(url, sa.select(sql.resource.c.filename, sql.resource.c.content)
                      .join(sql.runs_resources).where(sql.runs_resources.c.run_id == run_id))
    metrics = query(url, sa.select(sql.metric.c.name, sql.metric.c.step, sql.metric.c.value, sql.metric.c.nonfinite,
                                   sql.metric.c.timestamp).where(sql.metric.c.run_id == run_id)
                    .order_by(sql.metric.c.metric_id))
    return {"run": row, "artifacts": artifacts, "resources": resources, "metrics": metrics}


def same_floats(left: list[tuple], right: list[tuple]) -> bool:
    """Equal, with NaN equal to NaN."""
    def key(row):
        return tuple("nan" if isinstance(v, float) and math.isnan(v) else v for v in row)
    return [key(row) for row in left] == [key(row) for row in right]


# --- tests ------------------------------------------------------------------------------------


def test_a_whole_run_is_stored_in_sacreds_tables(sink, url, journal, files):
    run = write_run(journal, lifecycle(files))
    for batch in batches(journal, run, 3, 5, 8):
        sink.apply(batch)

    row = run_row(url, run)
    assert (row.run_id, row.status, row.command, row.applied_seq) == ("0", "COMPLETED", "main", 9)
    assert (row.start_time, row.heartbeat, row.stop_time) == (at(0), at(5), at(9))  # microseconds kept
    assert row.captured_out == "epoch 1\nepoch 2\n"
    assert (row.result, row.result_json, row.priority, row.comment) == (0.25, "0.25", 2.0, "first try")
    # Sacred's own JSON: a datetime in jsonpickle's form
    assert json.loads(row.config) == {"lr": 0.1, "layers": [64, 32], "when": flatten(at(-60)), "seed": 7}
    assert row.info == '{"epoch": 5}'
    assert same_floats(metric_values(url, "0"), [("loss", 0, 0.5), ("loss", 1, math.nan), ("loss", 2, math.inf),
                                                 ("accuracy", 0, 3.0)])
    [artifact] = query(url, sa.select(sql.artifact))
    assert (artifact.filename, artifact.content, artifact.run_id) == ("model.bin", bytes(range(256)) * 4, "0")
    [resource] = query(url, sa.select(sql.resource).join(sql.runs_resources))
    assert (resource.filename, resource.content) == (str(files / "data.csv"), b"1,2\n3,4\n")
    [experiment] = query(url, sa.select(sql.experiment))
    assert (experiment.name, experiment.base_dir) == ("demo", str(files))
    [source] = query(url, sa.select(sql.source))
    assert (source.filename, source.content) == ("train.py", "print('training')  # é\n")
    assert sorted(query(url, sa.select(sql.dependency.c.name, sql.dependency.c.version))) == [
        ("numpy", "1.26.4"), ("sacred", "0.8.7")]
    assert len(query(url, sa.select(sql.experiments_repositories))) == 1  # Sacred links a repository once
    [machine] = query(url, sa.select(sql.host))
    assert (machine.hostname, machine.os, machine.os_info) == ("node-1", "Linux", "Linux-6.1-x86_64")
    assert sink.applied(run) == 9
    assert sink.applied("01890000-0000-7000-8000-000000000000") == -1


def test_heartbeats_reach_the_run_row_while_the_run_is_alive(sink, url, journal, files):
    run = write_run(journal, lifecycle(files))
    first, _ = batches(journal, run, 5)
    sink.apply(first)
    row = run_row(url, run)
    assert (row.status, row.heartbeat, row.info) == ("RUNNING", at(3), '{"epoch": 3}')
    assert row.captured_out == "epoch 1\n"
    assert row.stop_time is None


def test_applying_a_batch_twice_changes_nothing(sink, url, journal, files):
    run = write_run(journal, lifecycle(files))
    for batch in batches(journal, run, 4):
        sink.apply(batch)
    once = dump(url)
    for batch in batches(journal, run, 4):
        sink.apply(batch)
    sink.apply(everything(journal, run))
    assert dump(url) == once


def test_a_prefix_then_everything_equals_everything_once(sink, url, journal, files):
    whole = write_run(journal, lifecycle(files))
    sink.apply(everything(journal, whole))
    expected = run_contents(url, whole)
    for cut in (1, 4, 8, 9):
        run = write_run(journal, lifecycle(files))
        sink.apply(batches(journal, run, cut)[0])  # a prefix: the daemon crashed after it
        sink.apply(everything(journal, run))
        contents = run_contents(url, run)
        assert contents["run"] == expected["run"]
        assert contents["artifacts"] == expected["artifacts"] and contents["resources"] == expected["resources"]
        assert same_floats(contents["metrics"], expected["metrics"])
    assert len(query(url, sa.select(sql.experiment))) == 1  # the same experiment, found again


def test_non_finite_metric_values_round_trip(sink, url, journal, files):
    values = [float("nan"), float("inf"), float("-inf"), 0.1, -0.0, 7, 1e308, 5e-324]
    run = write_run(journal, [started(files), *(point("x", i, v, i) for i, v in enumerate(values))])
    sink.apply(everything(journal, run))
    stored = [value for _, _, value in metric_values(url, "0")]
    assert same_floats([tuple(stored)], [tuple(float(v) for v in values)])
    assert [row.nonfinite for row in query(url, sa.select(sql.metric).order_by(sql.metric.c.metric_id))][:4] == [
        "nan", "inf", "-inf", None]


def test_run_ids_follow_sacreds_rule_and_are_given_once(sink, url, journal, files):
    runs = [write_run(journal, [started(files)]) for _ in range(3)]
    given = write_run(journal, [started(files, sacred_id="my-run")])
    taken = write_run(journal, [started(files, sacred_id="my-run")])
    for run in [*runs, given, taken]:
        sink.apply(everything(journal, run))
        sink.apply(everything(journal, run))
    ids = query(url, sa.select(sql.run.c.id, sql.run.c.run_id).order_by(sql.run.c.id))
    # SqlObserver: 0 for the first run, then the highest id + 1 (ids start at 1)
    assert ids == [(1, "0"), (2, "2"), (3, "3"), (4, "my-run"), (5, "5")]
    assert [sink.applied(run) for run in runs] == [0, 0, 0]


def in_threads(function, sinks: list) -> None:
    """Call ``function(sink)`` for every sink at once, one thread each; then close the sinks."""
    threads = [threading.Thread(target=function, args=(sink,)) for sink in sinks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for sink in sinks:
        sink.close()


def test_runs_created_at_once_by_two_writers_get_distinct_ids(url, journal, files):
    runs = [write_run(journal, lifecycle(files)) for _ in range(8)]
    sinks = [sql.SqlSink(url, journal.blob) for _ in range(2)]
    for sink in sinks:
        sink.open()
    ready = threading.Barrier(len(sinks))
    races = []

    def deliver(sink):  # as a daemon would: retry what is transient
        ready.wait()
        for run in runs:
            while True:
                try:
                    sink.apply(everything(journal, run))
                    break
                except TransientSinkError as error:
                    races.append(error)

    in_threads(deliver, sinks)
    rows = query(url, sa.select(sql.runrelay_run.c.uid, sql.runrelay_run.c.run_id))
    assert sorted(uid for uid, _ in rows) == sorted(runs)
    assert len({run_id for _, run_id in rows}) == len(runs) == len(query(url, sa.select(sql.run)))
    assert len(query(url, sa.select(sql.metric))) == 4 * len(runs)


def test_custom_statuses_and_the_watchdogs_verdict(sink, url, journal, files):
    interrupted = (Kind.INTERRUPTED, {"interrupt_time": at(9), "status": "PREEMPTED"})
    preempted = write_run(journal, lifecycle(files, interrupted))
    died = {"status": "DIED", "reason": "process 4242 is gone", "last_heartbeat": at(5), "detected_time": at(60)}
    dead = write_run(journal, [*lifecycle(files)[:-1], (Kind.DIED, died), beat(70, "back\n")])
    sink.apply(everything(journal, preempted))
    for batch in batches(journal, dead, 10):
        sink.apply(batch)
        if batch.last_seq == 9:
            row = run_row(url, dead)
            assert (row.status, row.stop_time, row.death_reason) == ("DIED", at(5), "process 4242 is gone")
    assert (run_row(url, preempted).status, run_row(url, preempted).stop_time) == ("PREEMPTED", at(9))
    revived = run_row(url, dead)  # a later event withdraws the verdict
    assert (revived.status, revived.stop_time, revived.death_reason) == ("RUNNING", None, None)
    assert revived.heartbeat == at(70)


def test_a_value_that_can_never_be_stored_names_its_event(sink, url, journal, files):
    run = write_run(journal, [*lifecycle(files)[:3], point("loss", 1, "not a number", 2), *lifecycle(files)[4:]])
    batch = everything(journal, run)
    with pytest.raises(PermanentSinkError, match="not a number") as caught:
        sink.apply(batch)
    assert caught.value.seq == 3
    assert sink.applied(run) == -1 and query(url, sa.select(sql.run)) == []  # rolled back: no half run
    sink.apply(without(batch, 3))
    assert sink.applied(run) == 9
    assert [name for name, _, _ in metric_values(url, "0")] == ["loss", "loss", "accuracy"]


@pytest.mark.parametrize("url", ["postgres", "mariadb"], indirect=True)
def test_a_value_too_long_for_its_column_names_its_event(sink, url, journal, files):
    model = files / "model.bin"
    long_name = {"name": "m" * 300, "filename": str(model), "file": model, "metadata": {}, "content_type": None}
    run = write_run(journal, [*lifecycle(files)[:7], (Kind.ARTIFACT, long_name), *lifecycle(files)[8:]])
    with pytest.raises(PermanentSinkError) as caught:
        sink.apply(everything(journal, run))
    assert caught.value.seq == 7 and "too long" in str(caught.value).lower()
    sink.apply(without(everything(journal, run), 7))
    assert run_row(url, run).status == "COMPLETED"


def test_a_metric_name_too_long_for_its_column_names_its_event(sink, url, journal, files):
    """Metric points go through the driver directly (COPY on PostgreSQL): its errors are classified too."""
    run = write_run(journal, [started(files), point("loss", 0, 0.5, 1), point("n" * 300, 1, 0.5, 2),
                              point("loss", 2, 0.25, 3)])
    if url.startswith("sqlite"):  # SQLite does not enforce VARCHAR lengths
        sink.apply(everything(journal, run))
        return
    with pytest.raises(PermanentSinkError) as caught:
        sink.apply(everything(journal, run))
    assert caught.value.seq == 2
    sink.apply(without(everything(journal, run), 2))
    assert sorted(step for _, step, *_ in metric_values(url, run_row(url, run).run_id)) == [0, 2]


def test_an_artifact_too_large_for_the_database_is_permanent(url, journal, files, monkeypatch):
    monkeypatch.setattr(sql, "DEFAULT_MAX_VALUE_BYTES", 64 * 1024)
    big = files / "big.bin"
    big.write_bytes(b"x" * (64 * 1024 + 1))
    artifact = {"name": "big.bin", "filename": str(big), "file": big, "metadata": {}, "content_type": None}
    output = "y" * (64 * 1024)
    run = write_run(journal, [started(files), beat(1, output), (Kind.ARTIFACT, artifact), beat(2, "done\n")])
    sink = sql.SqlSink(url, journal.blob)
    sink.open()
    try:
        with pytest.raises(PermanentSinkError, match="artifact 'big.bin' is 65537 bytes") as caught:
            sink.apply(everything(journal, run))
        assert caught.value.seq == 2
        sink.apply(without(everything(journal, run), 2))
        stored = run_row(url, run).captured_out  # too long: cut from the front, with a marker
        assert stored.startswith("[runrelay: the first 32773 bytes") and stored.endswith("y" * 100 + "done\n")
    finally:
        sink.close()


@pytest.mark.parametrize("url", ["mariadb"], indirect=True)
def test_mariadb_artifacts_are_checked_against_max_allowed_packet(sink, url, journal, files):
    [(packet,)] = query(url, sa.text("SELECT @@max_allowed_packet"))
    big = files / "big.bin"
    big.write_bytes(b"\0" * ((packet - sql.MYSQL_PACKET_MARGIN) // 2 + 1))  # NUL doubles when escaped
    artifact = {"name": "big.bin", "filename": str(big), "file": big, "metadata": {}, "content_type": None}
    run = write_run(journal, [started(files), (Kind.ARTIFACT, artifact)])
    with pytest.raises(PermanentSinkError, match="max_allowed_packet") as caught:
        sink.apply(everything(journal, run))
    assert caught.value.seq == 1


def test_a_redelivered_event_is_written_once_and_leaves_the_cursor(url, journal, files, monkeypatch):
    monkeypatch.setattr(sql, "DEFAULT_MAX_VALUE_BYTES", 1000)
    run = write_run(journal, lifecycle(files))
    batch = everything(journal, run)
    sink = sql.SqlSink(url, journal.blob)
    sink.open()
    with pytest.raises(PermanentSinkError) as caught:
        sink.apply(batch)
    assert caught.value.seq == 7  # the 1 KB model is too large for now
    sink.apply(without(batch, 7))
    sink.close()

    monkeypatch.setattr(sql, "DEFAULT_MAX_VALUE_BYTES", 10_000)  # the operator fixed it
    sink = sql.SqlSink(url, journal.blob)
    sink.open()
    try:
        dead_letter = Batch(run, [batch.events[7]], batch.state, redelivery=True)
        sink.apply(dead_letter)
        sink.apply(dead_letter)
        assert [row.filename for row in query(url, sa.select(sql.artifact))] == ["model.bin"]
        assert sink.applied(run) == 9
    finally:
        sink.close()


@pytest.mark.parametrize("server", ["postgres", "mariadb"])
def test_a_server_that_is_down_is_a_transient_error(server, request, journal, files):
    url = request.getfixturevalue(f"{server}_url")
    process = request.getfixturevalue(f"{server}_server")
    run = write_run(journal, lifecycle(files))
    first, rest = batches(journal, run, 5)
    sink = sql.SqlSink(url, journal.blob)
    sink.open()
    try:
        sink.apply(first)
        process.kill()
        try:
            for attempt in (lambda: sink.apply(rest), sink.check, lambda: sink.applied(run)):
                with pytest.raises(TransientSinkError):
                    attempt()
        finally:
            process.start()
        sink.apply(rest)  # the same sink recovers once the server is back
        assert sink.applied(run) == 9
    finally:
        sink.close()


def test_two_sinks_opening_at_once_both_succeed(url, journal):
    sinks = [sql.SqlSink(url, journal.blob) for _ in range(4)]
    ready = threading.Barrier(len(sinks))
    errors = []

    def open_one(sink):
        ready.wait()
        try:
            sink.open()
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    in_threads(open_one, sinks)
    assert errors == []
    assert set(dump(url)) == {table.name for table in sql.metadata.sorted_tables}


@pytest.mark.parametrize("url", ["sqlite"], indirect=True)
def test_sqlite_is_in_wal_mode(sink, tmp_path):
    with sqlite3.connect(tmp_path / "db" / "runs.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)



def test_errors_never_show_the_password(journal):
    sink = sql.SqlSink("postgresql://runrelay:s3cret@127.0.0.1:1/runs", journal.blob)
    with pytest.raises(TransientSinkError) as caught:
        sink.open()
    assert "s3cret" not in str(caught.value) and "***" in str(caught.value)
    sink.close()
    with pytest.raises(PermanentSinkError) as caught:
        sql.SqlSink("postgresql+nosuchdriver://runrelay:s3cret@host/runs", journal.blob).open()
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize("url", ["postgres", "mariadb"], indirect=True)
@pytest.mark.parametrize("cut", [None, 5], ids=["first batch", "later batch"])
def test_an_ending_the_status_column_cannot_hold_leaves_the_rest_of_its_batch(sink, url, journal, files, cut):
    ending = (Kind.INTERRUPTED, {"interrupt_time": at(9), "status": "S" * 100})
    run = write_run(journal, [*lifecycle(files, ending), point("late", 0, 1.0, 10)])
    *earlier, batch = batches(journal, run, *([cut] if cut else []))
    for piece in earlier:
        sink.apply(piece)
    with pytest.raises(PermanentSinkError) as caught:
        sink.apply(batch)
    assert caught.value.seq == 9
    sink.apply(without(batch, 9))  # the same state, still holding the long status
    row = run_row(url, run)
    assert (row.status, row.heartbeat, row.applied_seq) == ("RUNNING", at(5), 10)


@pytest.mark.parametrize("server, schemes", [("postgres", ["postgresql"]), ("mariadb", ["mysql", "mariadb+pymysql"])],
                         ids=["postgres", "mariadb"])
def test_every_url_form_reaches_its_database(server, schemes, request, journal, files):
    url = request.getfixturevalue(f"{server}_url")
    run = write_run(journal, lifecycle(files))
    for number, scheme in enumerate(schemes):
        sink = sink_for(f"{scheme}://{url.split('://', 1)[1]}", journal.blob)
        sink.open()
        try:
            sink.apply(batches(journal, run, 5)[number])
        finally:
            sink.close()
    assert run_row(url, run).status == ("COMPLETED" if len(schemes) == 2 else "RUNNING")

"""What is SQL-specific in the SQL sink, against real SQLite, PostgreSQL and MariaDB
databases (no mocks). What every sink must do is in test_sink_contract.py."""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from sacred.serializer import flatten

from runrelay.eventlog import Journal, Kind
from runrelay.sinks import sql, sql_tables as tables
from runrelay.sinks.base import SinkConfigError, TransientSinkError
from runrelay.sinks.sql import SqlSink
from sinkkit import Delivery, at, beat, deliver, lifecycle, make_files, open_sink, point, started, write_run

DIALECTS = ["sqlite", "postgres", "mariadb"]


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
    return make_files(tmp_path / "experiment")


@pytest.fixture
def sink(url, journal):
    sink = open_sink(url, journal)
    yield sink
    sink.close()


# --- reading databases ------------------------------------------------------------------------


def query(url: str, statement) -> list[sa.Row]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(statement).all()
    finally:
        engine.dispose()


def run_row(url: str, run: str) -> sa.Row:
    join = tables.run.join(tables.runrelay_run, tables.run.c.run_id == tables.runrelay_run.c.run_id)
    statement = sa.select(tables.run, tables.runrelay_run.c.applied_seq,
                          tables.runrelay_run.c.result.label("result_json"),
                          tables.runrelay_run.c.death_reason).select_from(join).where(tables.runrelay_run.c.uid == run)
    return query(url, statement)[0]


def metric_values(url: str, run_id: str) -> list[tuple]:
    metric = tables.metric
    rows = query(url, sa.select(metric).where(metric.c.run_id == run_id).order_by(metric.c.metric_id))
    return [(row.name, row.step, row.value if row.nonfinite is None else float(row.nonfinite)) for row in rows]


def same_floats(left: list[tuple], right: list[tuple]) -> bool:
    """Equal, with NaN equal to NaN."""
    def key(row):
        return tuple("nan" if isinstance(v, float) and math.isnan(v) else v for v in row)
    return [key(row) for row in left] == [key(row) for row in right]


# --- tests ------------------------------------------------------------------------------------


def test_a_whole_run_is_stored_in_sacreds_tables(sink, url, journal, files):
    run = write_run(journal, lifecycle(files))
    deliver(sink, journal, run, 3, 5, 8)

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
    [artifact] = query(url, sa.select(tables.artifact))
    assert (artifact.filename, artifact.content, artifact.run_id) == ("model.bin", bytes(range(256)) * 4, "0")
    [resource] = query(url, sa.select(tables.resource).join(tables.runs_resources))
    assert (resource.filename, resource.content) == (str(files / "data.csv"), b"1,2\n3,4\n")
    [experiment] = query(url, sa.select(tables.experiment))
    assert (experiment.name, experiment.base_dir) == ("demo", str(files))
    [source] = query(url, sa.select(tables.source))
    assert (source.filename, source.content) == ("train.py", "print('training')  # é\n")
    assert sorted(query(url, sa.select(tables.dependency.c.name, tables.dependency.c.version))) == [
        ("numpy", "1.26.4"), ("sacred", "0.8.7")]
    assert len(query(url, sa.select(tables.experiments_repositories))) == 1  # Sacred links a repository once
    [machine] = query(url, sa.select(tables.host))
    assert (machine.hostname, machine.os, machine.os_info) == ("node-1", "Linux", "Linux-6.1-x86_64")
    assert sink.applied(run) == 9
    assert sink.applied("01890000-0000-7000-8000-000000000000") == -1


def test_heartbeats_reach_the_run_row_while_the_run_is_alive(sink, url, journal, files):
    run = write_run(journal, lifecycle(files))
    Delivery(journal, run).apply(sink, through=4)
    row = run_row(url, run)
    assert (row.status, row.heartbeat, row.info) == ("RUNNING", at(3), '{"epoch": 3}')
    assert row.captured_out == "epoch 1\n"
    assert row.stop_time is None


def test_non_finite_metric_values_round_trip(sink, url, journal, files):
    values = [float("nan"), float("inf"), float("-inf"), 0.1, -0.0, 7, 1e308, 5e-324]
    run = write_run(journal, [started(files), *(point("x", i, v, i) for i, v in enumerate(values))])
    deliver(sink, journal, run)
    stored = [value for _, _, value in metric_values(url, "0")]
    assert same_floats([tuple(stored)], [tuple(float(v) for v in values)])
    metric = tables.metric
    assert [row.nonfinite for row in query(url, sa.select(metric).order_by(metric.c.metric_id))][:4] == [
        "nan", "inf", "-inf", None]


def test_run_ids_follow_sacreds_rule_and_are_given_once(sink, url, journal, files):
    runs = [write_run(journal, [started(files)]) for _ in range(3)]
    given = write_run(journal, [started(files, sacred_id="my-run")])
    taken = write_run(journal, [started(files, sacred_id="my-run")])
    for run in [*runs, given, taken]:
        deliver(sink, journal, run)
        deliver(sink, journal, run)
    ids = query(url, sa.select(tables.run.c.id, tables.run.c.run_id).order_by(tables.run.c.id))
    # SqlObserver: 0 for the first run, then the highest id + 1 (ids start at 1)
    assert ids == [(1, "0"), (2, "2"), (3, "3"), (4, "my-run"), (5, "5")]
    assert [sink.applied(run) for run in runs] == [0, 0, 0]


def test_new_runs_in_one_group_get_sacreds_ids_in_uid_order(sink, url, journal, files):
    handed = write_run(journal, [started(files, sacred_id="6")])
    deliver(sink, journal, handed)  # row id 1 holds run id "6", which the rule reaches below
    handing = [None, "my-run", None, "my-run", None, None, None]
    runs = {write_run(journal, [started(files, **({"sacred_id": given} if given else {}))]): given
            for given in handing}
    sink.apply_runs([Delivery(journal, run).batch() for run in runs])  # one transaction, in uid order
    expected, handed_out = {}, False
    for row_id, run in enumerate(sorted(runs), start=2):
        if runs[run] and not handed_out:
            expected[run], handed_out = "my-run", True
        else:  # the rule: the highest run.id + 1, i.e. this row's id; "6" is taken: the next id past the group's
            expected[run] = "9" if row_id == 6 else str(row_id)
    stored = dict(query(url, sa.select(tables.runrelay_run.c.uid, tables.runrelay_run.c.run_id)))
    assert {run: stored[run] for run in runs} == expected
    assert query(url, sa.select(sa.func.count()).select_from(tables.run)) == [(8,)]
    assert [sink.applied(run) for run in runs] == [0] * len(runs)


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
    sinks = [open_sink(url, journal) for _ in range(2)]
    ready = threading.Barrier(len(sinks))
    races = []

    def deliver_all(sink):  # as a daemon would: retry what is transient
        ready.wait()
        for run in runs:
            while True:
                try:
                    deliver(sink, journal, run)
                    break
                except TransientSinkError as error:
                    races.append(error)

    in_threads(deliver_all, sinks)
    rows = query(url, sa.select(tables.runrelay_run.c.uid, tables.runrelay_run.c.run_id))
    assert sorted(uid for uid, _ in rows) == sorted(runs)
    assert len({run_id for _, run_id in rows}) == len(runs) == len(query(url, sa.select(tables.run)))
    assert len(query(url, sa.select(tables.metric))) == 4 * len(runs)


def test_custom_statuses_and_the_watchdogs_verdict(sink, url, journal, files):
    interrupted = (Kind.INTERRUPTED, {"interrupt_time": at(9), "status": "PREEMPTED"})
    preempted = write_run(journal, lifecycle(files, interrupted))
    died = {"status": "DIED", "reason": "process 4242 is gone", "last_heartbeat": at(5), "detected_time": at(60)}
    dead = write_run(journal, [*lifecycle(files)[:-1], (Kind.DIED, died), beat(70, "back\n")])
    deliver(sink, journal, preempted)
    delivery = Delivery(journal, dead)
    delivery.apply(sink, through=9)
    row = run_row(url, dead)
    assert (row.status, row.stop_time, row.death_reason) == ("DIED", at(5), "process 4242 is gone")
    delivery.apply(sink)
    assert (run_row(url, preempted).status, run_row(url, preempted).stop_time) == ("PREEMPTED", at(9))
    revived = run_row(url, dead)  # a later event withdraws the verdict
    assert (revived.status, revived.stop_time, revived.death_reason) == ("RUNNING", None, None)
    assert revived.heartbeat == at(70)


@pytest.mark.parametrize("url", ["postgres", "mariadb"], indirect=True)
def test_a_value_too_long_for_its_column_is_a_dead_letter(sink, url, journal, files):
    long_path = (Kind.RESOURCE, {"filename": "/" + "r" * 1100, "file": files / "data.csv"})
    run = write_run(journal, [*lifecycle(files)[:7], long_path, *lifecycle(files)[8:]])
    delivery = deliver(sink, journal, run)
    assert list(delivery.letters) == [7] and "too long" in delivery.letters[7].lower()
    assert run_row(url, run).status == "COMPLETED"


@pytest.mark.parametrize("url", ["postgres", "mariadb"], indirect=True)
def test_a_metric_step_too_large_for_its_column_is_a_dead_letter(sink, url, journal, files):
    """Metric points go through the driver directly (COPY on PostgreSQL): its errors are classified too."""
    run = write_run(journal, [started(files), point("loss", 0, 0.5, 1), point("loss", 2**63, 0.5, 2),
                              point("loss", 2, 0.25, 3)])
    delivery = deliver(sink, journal, run)
    assert list(delivery.letters) == [2]
    assert sorted(step for _, step, *_ in metric_values(url, run_row(url, run).run_id)) == [0, 2]


def test_an_artifact_too_large_for_the_database_is_a_dead_letter(url, journal, files, monkeypatch):
    monkeypatch.setattr(sql, "DEFAULT_MAX_VALUE_BYTES", 64 * 1024)
    big = files / "big.bin"
    big.write_bytes(b"x" * (64 * 1024 + 1))
    artifact = {"name": "big.bin", "filename": str(big), "file": big, "metadata": {}, "content_type": None}
    output = "y" * (64 * 1024)
    run = write_run(journal, [started(files), beat(1, output), (Kind.ARTIFACT, artifact), beat(2, "done\n")])
    sink = open_sink(url, journal)
    try:
        delivery = deliver(sink, journal, run)
        assert list(delivery.letters) == [2] and "artifact 'big.bin' is 65537 bytes" in delivery.letters[2]
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
    delivery = deliver(sink, journal, run)
    assert list(delivery.letters) == [1] and "max_allowed_packet" in delivery.letters[1]


def test_two_sinks_opening_at_once_both_succeed(url, journal):
    sinks = [SqlSink("test", url, {}, journal) for _ in range(4)]
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
    engine = sa.create_engine(url)
    try:
        assert set(sa.inspect(engine).get_table_names()) == {table.name for table in tables.metadata.sorted_tables}
    finally:
        engine.dispose()


@pytest.mark.parametrize("url", ["sqlite"], indirect=True)
def test_sqlite_is_in_wal_mode_and_owner_only(sink, tmp_path):
    with sqlite3.connect(tmp_path / "db" / "runs.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert (tmp_path / "db").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "db" / "runs.db").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("server, schemes", [("postgres", ["postgresql"]), ("mariadb", ["mysql", "mariadb+pymysql"])],
                         ids=["postgres", "mariadb"])
def test_every_url_form_reaches_its_database_as_one_sink(server, schemes, request, journal, files):
    url = request.getfixturevalue(f"{server}_url")
    run = write_run(journal, lifecycle(files))
    spellings = [f"{scheme}://{url.split('://', 1)[1]}" for scheme in schemes]
    assert len({SqlSink.identity(spelling) for spelling in [url, *spellings]}) == 1
    for number, spelling in enumerate(spellings):
        sink = open_sink(spelling, journal)
        try:
            Delivery(journal, run).apply(sink, through=4 if number == 0 else None)
        finally:
            sink.close()
    assert run_row(url, run).status == ("COMPLETED" if len(schemes) == 2 else "RUNNING")


def test_sqlite_identity_is_the_absolute_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert SqlSink.identity("sqlite:///runs.db") == f"sqlite:///{tmp_path / 'runs.db'}"
    assert SqlSink.identity("sqlite:///runs.db?timeout=5") == SqlSink.identity(f"sqlite:///{tmp_path}/runs.db")


@pytest.mark.parametrize("url, says", [
    ("sqlite://", "needs a file"),
    ("sqlite:///:memory:", "needs a file"),
    ("postgresql://u:s3cret@host", "names no database"),
    ("postgresql+nosuchdriver://u:s3cret@host/db", "SQL schemes"),
    ("mysql://u:s3cret@host:notaport/db", "not a database URL"),
])
def test_a_url_that_cannot_work_is_refused_without_io(url, says):
    with pytest.raises(SinkConfigError, match=says) as caught:
        SqlSink.identity(url)
    assert "s3cret" not in str(caught.value)

"""The Mongo sink against what Sacred's own MongoObserver writes and what Omniboard and
incense query (the queries below are theirs, read in their sources: Omniboard 2.16's
``server/runs.response.js`` and models, incense 0.0.15's ``ExperimentLoader``)."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
from pathlib import Path

import gridfs
import pymongo
import pytest

from runrelay.eventlog import Journal, Kind
from runrelay.sinks.base import TransientSinkError
from runrelay.sinks.mongo import PART_NAME
from sinkkit import Delivery, deliver, lifecycle, make_files, open_sink, point, write_run

EXPERIMENT = Path(__file__).parent / "experiments" / "seed_experiment.py"
BATCH_EVENTS = 7
TIMES = ("start_time", "heartbeat", "stop_time")
OMNIBOARD_SELECT = ("_id,heartbeat,experiment,command,artifacts,host,stop_time,config,result,start_time,"
                    "resources,format,status,omniboard,metrics,meta,duration")


def database(url: str):
    client = pymongo.MongoClient(url, serverSelectionTimeoutMS=5000, timeoutMS=30000)
    return client, client[pymongo.uri_parser.parse_uri(url)["database"]]


@pytest.fixture
def db(mongo_url):
    client, db = database(mongo_url)
    yield db
    client.close()


@pytest.fixture
def journal(journal_dir) -> Journal:
    return Journal(journal_dir)


@pytest.fixture
def files(tmp_path) -> Path:
    return make_files(tmp_path / "experiment")


@pytest.fixture
def sink(mongo_url, journal):
    sink = open_sink(mongo_url, journal, timeout_seconds=5.0)
    yield sink
    sink.close()


def replay(journal: Journal, sink) -> None:
    for run in journal.runs():
        last = max(event.seq for event in journal.events(run))
        deliver(sink, journal, run, *range(BATCH_EVENTS, last + 1, BATCH_EVENTS))


# --- Sacred's own MongoObserver, field by field ------------------------------------------------


def plain(document: dict, db) -> dict:
    """A run document with ids and times replaced by what they point to, for comparing."""
    fs = gridfs.GridFS(db)
    run_id = document["_id"]
    document = {key: value for key, value in document.items() if key not in ("_id", "runrelay", *TIMES)}
    document["experiment"] = {**document["experiment"],
                              "sources": [[name, fs.get(file_id).filename, fs.get(file_id).read()]
                                          for name, file_id in document["experiment"]["sources"]]}
    document["artifacts"] = [
        {"name": entry["name"], "filename": fs.get(entry["file_id"]).filename.split("/", 3)[-1],
         "content": fs.get(entry["file_id"]).read(), "contentType": fs.get(entry["file_id"])._file.get("contentType"),
         "metadata": fs.get(entry["file_id"]).metadata} for entry in document["artifacts"]]
    metric_ids = document["info"].pop("metrics", [])
    document["info_metrics"] = [entry["name"] for entry in metric_ids]
    metrics = {entry["name"]: entry for entry in db.metrics.find({"run_id": run_id})}
    document["metrics"] = {name: (entry["steps"], [repr(v) for v in entry["values"]], len(entry["timestamps"]))
                           for name, entry in sorted(metrics.items())}
    assert {str(entry["_id"]) for entry in metrics.values()} == {entry["id"] for entry in metric_ids}
    document["meta"]["options"].pop("--mongo_db")
    return document


@pytest.mark.parametrize("mode", ["complete", "fail"])
def test_the_seed_run_is_what_sacreds_mongo_observer_writes(mode, mongo_server, mongo_url, journal_dir):
    sacred_db = f"{pymongo.uri_parser.parse_uri(mongo_url)['database']}_sacred"
    sacred_url = mongo_server.url(sacred_db)
    host, port = pymongo.uri_parser.parse_uri(sacred_url)["nodelist"][0]
    argv = [sys.executable, str(EXPERIMENT), "-j", str(journal_dir), "-m", f"{host}:{port}:{sacred_db}",
            "with", f"mode={mode}", "epochs=4", "pause=0"]
    finished = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert (finished.returncode == 0) == (mode == "complete"), finished.stderr
    journal = Journal(journal_dir)
    sink = open_sink(mongo_url, journal)
    try:
        replay(journal, sink)
    finally:
        sink.close()

    client, ours_db = database(mongo_url)
    _, theirs_db = database(sacred_url)
    try:
        [ours], [theirs] = list(ours_db.runs.find()), list(theirs_db.runs.find())
        assert type(ours["_id"]) is int and ours["_id"] == theirs["_id"]
        for key in TIMES:
            if key in theirs:
                assert type(ours[key]) is type(theirs[key]), key
                assert abs((ours[key] - theirs[key]).total_seconds()) < 1, key
        ours_plain, theirs_plain = plain(ours, ours_db), plain(theirs, theirs_db)
        # documented deviations (docs/compatibility.md): the resource is stored in GridFS too
        assert theirs_db.fs.files.count_documents({"filename": ours["resources"][0][0]}) == 0
        assert gridfs.GridFS(ours_db).find_one({"filename": ours["resources"][0][0]}).read()
        assert ours_plain.keys() == theirs_plain.keys()
        for key in theirs_plain:
            assert ours_plain[key] == theirs_plain[key], key
        assert math.isnan(ours_db.metrics.find_one({"name": "validation.ratio"})["values"][0])
    finally:
        client.close()


# --- what Omniboard and incense query ----------------------------------------------------------


def omniboard_runs(db, select: str = OMNIBOARD_SELECT, metric_column: dict | None = None) -> list[dict]:
    """Omniboard's GET /api/v1/Runs?select=… aggregation (runs.response.js), with a
    configured metric column when given ({"name", "metric_name", "extrema"})."""
    projection = {column: 1 for column in select.split(",") if column != "duration"}
    projection.update(start_time=1, heartbeat=1)
    pipeline = [{"$project": projection},
                {"$addFields": {"duration": {"$subtract": ["$heartbeat", "$start_time"]}}},
                {"$sort": {"_id": -1}}, {"$limit": 200}]
    if metric_column:
        names = [metric_column["metric_name"]]
        projection["info.metrics"] = 1
        pipeline += [
            {"$unwind": {"path": "$info.metrics", "preserveNullAndEmptyArrays": True}},
            {"$match": {"$expr": {"$cond": {"if": "$info.metrics.name",
                                            "then": {"$and": [{"$in": ["$info.metrics.name", names]}]},
                                            "else": True}}}},
            {"$lookup": {"from": "metrics", "let": {"metric_id": {"$toObjectId": "$info.metrics.id"}},
                         "pipeline": [{"$match": {"$expr": {"$and": [{"$eq": ["$_id", "$$metric_id"]},
                                                                     {"$in": ["$name", names]}]}}}],
                         "as": "metrics"}},
            {"$addFields": {"metrics": {"$arrayElemAt": ["$metrics", 0]}}},
            {"$group": {"_id": "$_id", "metrics": {"$push": {"k": "m", "v": "$metrics"}},
                        "runs": {"$first": "$$ROOT"}}},
            {"$addFields": {"runs.metrics": {"$arrayToObject": "$metrics"}}},
            {"$replaceRoot": {"newRoot": "$runs"}},
            {"$addFields": {metric_column["name"]: {f"${metric_column['extrema']}": "$metrics.m.values"}}},
            {"$sort": {"_id": -1}},
        ]
    return list(db.runs.aggregate(pipeline, allowDiskUse=True))


def test_omniboard_and_incense_queries_find_every_run_series_and_file(sink, db, journal, files):
    runs = [write_run(journal, lifecycle(files)) for _ in range(3)]
    for run in runs:
        deliver(sink, journal, run, 3, 6)

    listed = omniboard_runs(db)
    assert [run["_id"] for run in listed] == [3, 2, 1]
    for run in listed:
        assert run["status"] == "COMPLETED" and run["duration"] == 5000 and run["format"] == "MongoObserver-0.7.0"
    assert list(db.runs.aggregate([{"$count": "count"}])) == [{"count": 3}]  # Runs/count

    with_column = omniboard_runs(db, metric_column={"name": "best", "metric_name": "accuracy", "extrema": "max"})
    assert [run["best"] for run in with_column] == [3, 3, 3]

    fs = gridfs.GridFS(db)
    for run in db.runs.find():  # Metrics?query={"run_id": …}, incense's metrics.find, files/artifacts
        series = {entry["name"]: entry for entry in db.metrics.find({"run_id": run["_id"]})}
        assert sorted(series) == ["accuracy", "loss"] and series["loss"]["steps"] == [0, 1, 2]
        assert math.isnan(series["loss"]["values"][1]) and series["loss"]["values"][2] == math.inf
        assert {entry["id"] for entry in run["info"]["metrics"]} == {str(entry["_id"]) for entry in series.values()}
        [entry] = run["artifacts"]
        stored = fs.get(entry["file_id"])
        assert stored.filename == f"artifact://runs/{run['_id']}/model.bin" and stored.read() == bytes(range(256)) * 4
        assert run["info"]["epoch"] == 5 and run["artifacts"] and "omniboard" not in run
    # incense: find_by_id(int), find_latest (sort on start_time), find_by_name (regex), config key
    assert db.runs.find_one({"_id": 2})["status"] == "COMPLETED"
    assert db.runs.find_one(sort=[("start_time", -1)]) is not None
    assert db.runs.count_documents({"experiment.name": {"$regex": "^dem"}}) == 3
    assert db.runs.count_documents({"config.lr": 0.1}) == 3
    assert db.fs.files.count_documents({}) == 3 + 1 + 1  # artifacts, one shared source, one shared resource


def test_omniboard_tags_and_notes_survive_redelivery(sink, db, journal, files):
    run = write_run(journal, lifecycle(files))
    deliver(sink, journal, run, 5)
    db.runs.update_one({"_id": 1}, {"$set": {"omniboard.tags": ["best"], "omniboard.notes": "keep"}})
    deliver(sink, journal, run)  # the daemon lost its cursor: everything again
    delivery = Delivery(journal, run)
    delivery.apply(sink)
    document = db.runs.find_one({"_id": 1})
    assert document["omniboard"] == {"tags": ["best"], "notes": "keep"} and document["status"] == "COMPLETED"
    assert sum(len(entry["steps"]) for entry in db.metrics.find()) == 4


def test_a_queued_run_has_what_readers_need(sink, db, journal, files):
    run = write_run(journal, [(Kind.QUEUED, {"ex_info": {"name": "demo", "base_dir": str(files)},
                                             "command": "main", "host_info": {}, "config": {"lr": 0.1},
                                             "meta_info": {}, "queue_time": lifecycle(files)[0][1]["start_time"]})])
    deliver(sink, journal, run)
    document = db.runs.find_one()
    assert document["status"] == "QUEUED" and document["info"] == {} and document["artifacts"] == []
    assert document["heartbeat"] is not None and document["experiment"]["sources"] == []


def test_a_metric_past_the_document_limit_continues_in_named_parts(mongo_url, db, journal, files):
    sink = open_sink(mongo_url, journal, points_per_document=3)
    try:
        run = write_run(journal, [lifecycle(files)[0], *[point("loss", step, step / 10, step) for step in range(8)]])
        deliver(sink, journal, run, 3, 4, 6)
        deliver(sink, journal, run)
    finally:
        sink.close()
    parts = {entry["name"]: entry["steps"] for entry in db.metrics.find()}
    assert parts == {"loss": [0, 1, 2], PART_NAME.format(name="loss", part=2): [3, 4, 5],
                     PART_NAME.format(name="loss", part=3): [6, 7]}
    assert [entry["name"] for entry in db.runs.find_one()["info"]["metrics"]] == list(parts)


def test_what_a_sink_keeps_of_a_run_between_batches_is_checked_by_its_writes(mongo_url, db, journal, files):
    """The sink keeps a live run's ids and seqs between batches; another writer advancing the
    run meanwhile (a second daemon on a copy of the journal) makes the kept sink's next batch
    transient instead of a second copy of its points, and the retry reads the database."""
    run = write_run(journal, [lifecycle(files)[0], *[point("loss", step, step / 10, step) for step in range(9)]])
    kept, other = open_sink(mongo_url, journal, name="kept"), open_sink(mongo_url, journal, name="other")
    try:
        behind = Delivery(journal, run)
        behind.apply(kept, through=3)
        ahead = Delivery(journal, run)
        ahead.apply(other, through=3)
        ahead.apply(other, through=6)
        with pytest.raises(TransientSinkError, match="metrics changed meanwhile"):
            behind.apply(kept, through=6)
        behind.apply(kept, through=6)  # the daemon's retry: read again, nothing left to write
        behind.apply(kept)
    finally:
        kept.close()
        other.close()
    [series] = db.metrics.find()
    assert series["steps"] == list(range(9)) and db.runs.count_documents({}) == 1
    assert db.runs.find_one()["runrelay"]["applied"] == 9


def test_three_sinks_into_one_database_at_once_make_distinct_runs(mongo_url, db, tmp_path, files):
    journals = [Journal(tmp_path / f"journal-{index}") for index in range(3)]
    runs = {index: [write_run(journal, lifecycle(files)) for _ in range(4)] for index, journal in enumerate(journals)}
    db.runs.insert_one({"_id": 1, "status": "COMPLETED", "info": {}, "artifacts": []})  # Sacred's own run
    errors = []

    def replay_one(index: int) -> None:
        sink = open_sink(mongo_url, journals[index], name=f"daemon-{index}")
        try:
            for run in runs[index]:
                for attempt in range(10):  # the daemon's retry: an id taken meanwhile is transient
                    try:
                        deliver(sink, journals[index], run, 4)
                        break
                    except Exception as error:  # noqa: BLE001 - collected
                        if attempt == 9:
                            errors.append(error)
        finally:
            sink.close()

    threads = [threading.Thread(target=replay_one, args=(index,)) for index in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    ours = list(db.runs.find({"runrelay": {"$exists": True}}))
    assert len(ours) == 12 and len({run["runrelay"]["uid"] for run in ours}) == 12
    assert sorted(run["_id"] for run in ours) == list(range(2, 14))
    assert db.metrics.count_documents({}) == 24 and sum(len(m["steps"]) for m in db.metrics.find()) == 48
    assert db.fs.files.count_documents({"filename": {"$regex": "^artifact://"}}) == 12

"""runrelay.durable(MongoObserver) against a real SecantusDB owned by the test session: the
experiment and the daemon as processes, the experiment killed with SIGKILL, the server
stopped at start. Counts are of what the run document, its metrics and GridFS hold."""

from __future__ import annotations

import datetime
import os
import time

import gridfs
import pymongo
import pytest
from pymongo.uri_parser import parse_uri
from sacred.observers import MongoObserver

from runrelay.sinks.observer import is_transient, prepare

from test_durable import (WAIT_SECONDS, daemon_config, fed_by_a_daemon, killed_mid_run, run_experiment, start_daemon,
                          start_experiment, wait_for)

SINK = "sacred.observers:MongoObserver"
QUICK = "serverSelectionTimeoutMS=2000"  # a call on a server that is down fails in 2 s, not Sacred's 30


def quick(url: str) -> str:
    return f"{url}?{QUICK}"


def sink_args(url: str) -> dict:
    return {"url": url, "db_name": parse_uri(url)["database"]}


def runs(url: str) -> list[dict]:
    with pymongo.MongoClient(url, serverSelectionTimeoutMS=2000) as client:
        return list(client[parse_uri(url)["database"]].runs.find())


def stored(url: str) -> dict:
    """The one run of ``url``'s database without ids and times, its files and metrics read
    back; its info.metrics checked against the metrics collection."""
    with pymongo.MongoClient(url, serverSelectionTimeoutMS=2000) as client:
        db = client[parse_uri(url)["database"]]
        fs = gridfs.GridFS(db)
        [run] = list(db.runs.find())
        metrics = list(db.metrics.find({"run_id": run["_id"]}))
        ids = run["info"].pop("metrics", [])
        assert sorted((entry["name"], entry["id"]) for entry in ids) == sorted(
            (metric["name"], str(metric["_id"])) for metric in metrics)
        for key in ("_id", "start_time", "stop_time", "heartbeat"):
            run.pop(key, None)
        # Sacred's MongoObserver prints each artifact's content type into the run's output; wrapped, it does not
        run["captured_out"] = "\n".join(line for line in run["captured_out"].splitlines()
                                        if "run with ID" not in line and "as content-type of artifact" not in line)
        run["experiment"]["sources"] = [[name, fs.get(file_id).read()] for name, file_id in run["experiment"]["sources"]]
        run["artifacts"] = [(entry["name"], fs.get(entry["file_id"]).read(), fs.get(entry["file_id"])._file.get("contentType"))
                            for entry in run["artifacts"]]
        run["metrics"] = {metric["name"]: (metric["steps"], metric["values"]) for metric in metrics}
        return run


@pytest.mark.parametrize("drain", ["5", "0"], ids=["fed_in_process", "fed_by_the_daemon"])
def test_a_completed_run_reads_as_the_plain_mongo_observer_writes_it(tmp_path, mongo_server, drain):
    plain, wrapped = mongo_server.url(f"plain_{drain}"), mongo_server.url(f"wrapped_{drain}")
    config = ("seed=7", "steps=12", f"workdir={tmp_path}")
    run_experiment(tmp_path / "unused", f"plain-mongo:{plain}", *config)
    run_experiment(tmp_path / "journal", f"mongo:{wrapped}", *config, RUNRELAY_TEST_DRAIN=drain)
    fed_by_a_daemon(tmp_path, {"MongoObserver": (SINK, sink_args(wrapped))},
                    lambda: [run for run in runs(wrapped) if run["status"] == "COMPLETED"], "the completed run")
    expected, got = stored(plain), stored(wrapped)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == expected[key], key
    assert [name for name, *_ in got["artifacts"]] == ["model-0.txt", "model-5.txt", "model-10.txt"]
    assert got["metrics"]["loss"][0] == list(range(12))


def test_a_killed_run_reaches_mongo_with_every_metric_and_artifact_that_had_returned(tmp_path, mongo_url):
    reported = killed_mid_run(tmp_path, f"mongo:{mongo_url}")
    fed_by_a_daemon(tmp_path, {"MongoObserver": (SINK, sink_args(mongo_url))},
                    lambda: [run for run in runs(mongo_url) if run["status"] == "DIED"], "the dead run")
    run = stored(mongo_url)
    names = [name for name, _, _ in run["artifacts"]]
    assert {line.split()[1] for line in reported if line.startswith("artifact")} <= set(names)
    assert all(content == f"weights at step {name[6:-4]}\n".encode() for name, content, _ in run["artifacts"])
    assert len(names) - len(set(names)) <= 1  # or the artifact call in flight at the kill
    steps = run["metrics"]["loss"][0]
    assert {int(line.split()[2]) for line in reported if line.startswith("metric")} <= set(steps)
    twice = sorted(step for step in set(steps) if steps.count(step) > 1)
    assert all(steps.count(step) == 2 for step in twice)  # none twice but the log_metrics call in flight
    assert twice == (list(range(twice[0], twice[-1] + 1)) if twice else []), twice


def test_mongo_down_at_start_fails_nothing_and_gets_the_run_once_it_is_up(tmp_path, mongo_server, mongo_url):
    mongo_server.stop()
    try:
        began = time.monotonic()
        stderr = run_experiment(tmp_path / "journal", f"mongo:{quick(mongo_url)}", "steps=12", f"workdir={tmp_path}",
                                RUNRELAY_TEST_DRAIN="1")
        print(f"the experiment took {time.monotonic() - began:.1f} s with the database down")
        assert "Completed after" in stderr
        daemon = start_daemon(tmp_path, daemon_config(tmp_path, {"MongoObserver": (SINK, sink_args(quick(mongo_url)))}))
    finally:
        mongo_server.start()
    try:
        wait_for(lambda: [run for run in runs(mongo_url) if run["status"] == "COMPLETED"], "the completed run")
    finally:
        code, log = daemon.stop()
        assert code == 0, log
    run = stored(mongo_url)
    assert run["info"] == {"step": 11} and run["result"] == 12 and "step 11" in run["captured_out"]
    assert [name for name, *_ in run["artifacts"]] == ["model-0.txt", "model-5.txt", "model-10.txt"]
    assert run["metrics"]["loss"][0] == list(range(12))


def test_mongo_killed_mid_run_gets_every_write_once_it_is_back(tmp_path, mongo_server, mongo_url):
    """The server killed mid-run (writes under way raise AutoReconnect or time out) and
    started again after the run ended: the daemon writes what the experiment could not."""
    read_fd, write_fd = os.pipe()
    process = start_experiment(tmp_path / "journal", f"mongo:{quick(mongo_url)}", "steps=60", "pause=0.02",
                               f"workdir={tmp_path}", report_fd=write_fd, RUNRELAY_TEST_DRAIN="1")
    os.close(write_fd)
    try:
        with os.fdopen(read_fd) as reports:
            artifacts = 0
            while artifacts < 2:
                artifacts += reports.readline().startswith("artifact")
            mongo_server.kill()
            reports.read()
        _, stderr = process.communicate(timeout=WAIT_SECONDS)
        assert process.returncode == 0 and "Completed after" in stderr, stderr
    finally:
        mongo_server.start()
    assert [run["status"] for run in runs(mongo_url)] in ([], ["RUNNING"])
    fed_by_a_daemon(tmp_path, {"MongoObserver": (SINK, sink_args(quick(mongo_url)))},
                    lambda: [run for run in runs(mongo_url) if run["status"] == "COMPLETED"], "the completed run")
    run = stored(mongo_url)
    assert [name for name, *_ in run["artifacts"]] == [f"model-{step}.txt" for step in range(0, 60, 5)]
    assert sorted(set(run["metrics"]["loss"][0])) == list(range(60)) and run["info"] == {"step": 59}


def test_a_wrapped_mongo_observers_writes_to_a_dead_server_raise_transient_errors(mongo_server, mongo_url):
    """Sacred's heartbeat save passes over AutoReconnect and its final_save does not raise:
    prepared for the feed, both raise, so the feed does not count them as fed."""
    observer = MongoObserver(quick(mongo_url), db_name=parse_uri(mongo_url)["database"])
    prepare(observer)
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    observer.started_event({"name": "demo", "base_dir": "/nonexistent", "sources": []}, "main", {}, now, {}, {}, None)
    mongo_server.kill()
    try:
        for call in (lambda: observer.heartbeat_event({"step": 1}, "out", now, None),
                     lambda: observer.completed_event(now, 3)):
            with pytest.raises(pymongo.errors.ConnectionFailure) as raised:
                call()
            assert is_transient(raised.value)
    finally:
        mongo_server.start()
    observer.completed_event(now, 3)  # fed again once the server is back
    [run] = runs(mongo_url)
    assert run["status"] == "COMPLETED" and run["info"] == {"step": 1} and run["result"] == 3

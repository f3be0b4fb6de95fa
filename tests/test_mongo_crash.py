"""`kill -9` of the daemon at many random points while it replays many runs into MongoDB
(SecantusDB, or $RUNRELAY_TEST_MONGO_URL): afterwards every collection holds exactly the
journal's events — one run document per run, every metric point once, one GridFS file per
stored blob. The journal and the kills are test_replay_crash's."""

from __future__ import annotations

import hashlib
import random
import time
from collections import Counter
from pathlib import Path

import gridfs
import pymongo
import pytest

from runrelay.eventlog import Journal, Kind
from runrelay.eventlog.fold import fold
from test_replay_crash import (
    KILLS, LEFT_RUNNING, LIVE_RUNS, RUNS, SEED, Producer, cursor_behind, differences, kill_repeatedly, sync, tail,
    value_key, write_journal,
)

POINTS_PER_RUN = (3000, 5000)  # SecantusDB is a Python server: a smaller backlog than SQL's


def database(url: str):
    client = pymongo.MongoClient(url, serverSelectionTimeoutMS=5000, timeoutMS=60000)
    return client, client[pymongo.uri_parser.parse_uri(url)["database"]]


def after_kill(url: str):
    def observe(state: Path) -> tuple[int, bool]:
        client, db = database(url)
        try:
            points = sum(len(entry["steps"]) for entry in db.metrics.find({}, {"steps": 1}))
            applied = {doc["runrelay"]["uid"]: doc["runrelay"]["applied"]
                       for doc in db.runs.find({"runrelay.uid": {"$exists": True}}, {"runrelay": 1})}
        finally:
            client.close()
        return points, cursor_behind(state, applied)
    return observe


def assert_mongo_matches_journal(url: str, journal_dir: Path) -> dict[str, int]:
    journal = Journal(journal_dir)
    runs = journal.runs()
    states, points, artifacts = {}, Counter(), Counter()
    for uid in runs:
        events = list(journal.events(uid))
        states[uid] = fold(events)
        for event in events:
            if event.kind is Kind.METRICS:
                body = event.body
                points[(uid, body["name"], body["step"], value_key(body["value"]))] += 1
            elif event.kind is Kind.ARTIFACT:
                artifacts[(uid, event.body["name"], event.body["digest"])] += 1

    client, db = database(url)
    try:
        documents = list(db.runs.find({}))
        metric_documents = list(db.metrics.find({}))
        fs = gridfs.GridFS(db)
        stored_artifacts = Counter()
        referenced = set()
        for document in documents:
            uid = document["runrelay"]["uid"]
            for entry in document["artifacts"]:
                referenced.add(entry["file_id"])
                digest = hashlib.sha256(fs.get(entry["file_id"]).read()).hexdigest()
                stored_artifacts[(uid, entry["name"], digest)] += 1
        files = db["fs.files"].count_documents({})
        orphan_chunks = len(set(db["fs.chunks"].distinct("files_id")) - set(db["fs.files"].distinct("_id")))
    finally:
        client.close()

    problems: list[str] = []
    uids = [document["runrelay"]["uid"] for document in documents]
    ids = [document["_id"] for document in documents]
    if sorted(uids) != runs or len(set(ids)) != len(ids) or not all(isinstance(i, int) for i in ids):
        problems.append(f"{len(documents)} run documents for {len(runs)} runs; ids {sorted(ids)[:10]}")
    uid_of = {document["_id"]: document["runrelay"]["uid"] for document in documents}
    for document in documents:
        state = states.get(document["runrelay"]["uid"])
        if state is None:
            continue
        stored = {"status": document["status"], "applied": document["runrelay"]["applied"],
                  "captured_out": document.get("captured_out") or ""}
        expected = {"status": state.status, "applied": state.last_seq, "captured_out": state.captured_out}
        for name, want in expected.items():
            if stored[name] != want:
                problems.append(f"run {state.run} {name}: stored {str(stored[name])[:200]!r}, "
                                f"journal folds to {str(want)[:200]!r}")
    for document in documents:  # Omniboard joins metric columns on info.metrics: every document listed
        listed = {(entry["id"], entry["name"]) for entry in document["info"].get("metrics", [])}
        made = {(str(entry["_id"]), entry["name"]) for entry in metric_documents if entry["run_id"] == document["_id"]}
        if listed != made:
            problems.append(f"run {document['_id']} info.metrics lists {sorted(listed)}, its documents are {sorted(made)}")
    stored_points = Counter(
        (uid_of.get(entry["run_id"]), entry["name"].split(" [runrelay part")[0], step, value_key(value))
        for entry in metric_documents for step, value in zip(entry["steps"], entry["values"]))
    problems += differences(points, stored_points, "metric point")
    problems += differences(artifacts, stored_artifacts, "artifact")
    # one file per artifact event, per distinct resource and per distinct source (shared by name and md5)
    resources = {(entry["filename"], entry["md5"]) for state in states.values() for entry in state.resources}
    sources = {(state.experiment.get("base_dir"), *pair) for state in states.values()
               for pair in map(tuple, state.experiment.get("sources", []))}
    if files != sum(artifacts.values()) + len(resources) + len(sources):
        problems.append(f"{files} GridFS files for {sum(artifacts.values())} artifacts, {len(resources)} resources "
                        f"and {len(sources)} sources")
    if orphan_chunks:
        problems.append(f"{orphan_chunks} GridFS chunk sets without a file")
    assert not problems, f"{len(problems)} difference(s) between Mongo and the journal:\n" + "\n".join(problems[:40])
    return {"runs": len(runs), "events": sum(state.last_seq + 1 for state in states.values()),
            "metric points": sum(stored_points.values()), "artifacts": sum(stored_artifacts.values()),
            "GridFS files": files}


@pytest.mark.slow
def test_sigkill_at_random_points_while_replaying_into_mongo_stores_every_event_exactly_once(mongo_url, tmp_path):
    rng = random.Random(SEED)
    journal, state, files, log = tmp_path / "journal", tmp_path / "state", tmp_path / "files", tmp_path / "daemon.log"
    began = time.monotonic()
    backlog = write_journal(journal, files, rng, RUNS, POINTS_PER_RUN, LEFT_RUNNING)
    with Producer(journal, files, random.Random(rng.randrange(2**32)), LIVE_RUNS) as producer:
        seen = kill_repeatedly(journal, state, mongo_url, tmp_path, KILLS, rng, log, backlog, after_kill(mongo_url))
    producer.finish()
    delivered = sync(journal, state, tmp_path, mongo_url)
    assert sync(journal, state, tmp_path, mongo_url) == 0  # nothing is left, nothing is sent twice

    counts = assert_mongo_matches_journal(mongo_url, journal)
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "CRITICAL" not in text, tail(log)
    print(f"\nmongo: {seen['kills']} SIGKILLs ({seen['in_backlog']} while replaying the {backlog}-point backlog, "
          f"{seen['rows_grew']} with points grown since the previous kill, {seen['cursor_behind']} leaving a cursor "
          f"behind its sink), final sync delivered {delivered}; "
          + ", ".join(f"{count} {what}" for what, count in counts.items())
          + f"; identical to the journal (total {time.monotonic() - began:.1f} s)")

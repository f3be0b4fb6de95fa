"""`kill -9` of the daemon at many random points while it replays many runs into each
FileStorage store (a directory, moto's S3, fake-gcs-server): afterwards every run has one
integer directory, and its files equal the journal's fold — status, applied position, the
whole output (a live run's: one it had), every metric point once (a live run's metrics.json:
a prefix of its points), each artifact's last bytes. The journal and the kills are test_replay_crash's."""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections import Counter
from pathlib import Path

import pytest

from runrelay.eventlog import Journal, Kind
from runrelay.eventlog.fold import RunState, fold, fold_event
import test_replay_crash
from test_filestorage import base  # noqa: F401 - the fixture: a fresh base on each store
from test_replay_crash import (
    KILLS, LEFT_RUNNING, LIVE_RUNS, RUNS, SEED, Producer, cursor_behind, differences, kill_repeatedly, sync, tail,
    value_key, write_journal,
)

POINTS_PER_RUN = (3000, 5000)
# CI-sized by default (10 kills, 8 runs, file:// only); RUNRELAY_FILESTORAGE_FULL=1: 100 kills, 30 runs,
# every store (the figures in docs/benchmarks.md)
FULL = os.environ.get("RUNRELAY_FILESTORAGE_FULL") == "1"
ONLY_FULL = pytest.mark.skipif(not FULL, reason="set RUNRELAY_FILESTORAGE_FULL=1 to run it (CI time)")
STORES = pytest.mark.parametrize("base", ["file", *(pytest.param(scheme, marks=ONLY_FULL) for scheme in ("s3", "gs"))],
                                 indirect=True)
BUCKET_KILL_AFTER_SECONDS = (0.3, 2.5)  # boto3 and google-cloud-storage take longer to import than the SQL drivers


def books(read_back) -> dict[int, dict]:
    """run id -> the sink's book in that directory's run.json."""
    found = {}
    for name in read_back.run_ids():
        text = read_back.read(f"{name}/run.json")
        if text is not None:
            found[int(name)] = json.loads(text)["runrelay"]
    return found


def after_kill(read_back):
    def observe(state: Path) -> tuple[int, bool]:
        held = books(read_back).values()
        return sum(book["points"] for book in held), cursor_behind(state, {book["uid"]: book["applied"] for book in held})
    return observe


def stored_points(metrics: dict) -> list[tuple]:
    return [(name, step, value_key(value)) for name, series in metrics.items()
            for step, value in zip(series["steps"], series["values"])]


def assert_files_match_journal(read_back, journal_dir: Path, only: set[str] | None = None) -> dict[str, int]:
    """Every run of the journal (or ``only`` those; others may be absent, never doubled) in
    one directory whose files equal the run's fold."""
    journal = Journal(journal_dir)
    runs = journal.runs()
    states, points, artifacts, outputs = {}, {}, {}, {}
    for uid in runs:
        events = list(journal.events(uid))
        states[uid] = fold(events)
        state, outputs[uid] = RunState(uid), {""}
        for event in events:  # the outputs the run had: a live run's cout.txt is one of them
            state = fold_event(state, event)
            outputs[uid].add(state.captured_out)
        points[uid] = [(event.body["name"], event.body["step"], value_key(event.body["value"]))
                       for event in events if event.kind is Kind.METRICS]
        artifacts[uid] = {event.body["name"]: event.body["digest"] for event in events if event.kind is Kind.ARTIFACT}

    problems: list[str] = []
    held = books(read_back)
    owners = Counter(book["uid"] for book in held.values())
    if (sorted(owners) != runs if only is None else not only <= set(owners)) or max(owners.values(), default=1) != 1:
        problems.append(f"{len(held)} run directories for {len(runs)} runs; doubled: "
                        f"{[uid for uid, count in owners.items() if count > 1][:5]}")
    totals = Counter()
    for run_id, book in held.items():
        uid, state = book["uid"], states.get(book["uid"])
        if state is None:
            problems.append(f"directory {run_id} holds unknown run {uid}")
            continue
        if only is not None and uid not in only:
            continue
        if json.loads(read_back.read(f"_runrelay/runs/{uid}.json"))["id"] != run_id:
            problems.append(f"run {uid}: its record names another directory than {run_id}")
        entry = json.loads(read_back.read(f"{run_id}/run.json"))
        stored = {"status": entry["status"], "applied": book["applied"],
                  "captured_out": read_back.read(f"{run_id}/cout.txt").decode()}
        expected = {"status": state.status, "applied": state.last_seq, "captured_out": state.captured_out}
        for name, want in expected.items():
            if stored[name] != want and not (name == "captured_out" and not state.finished):
                problems.append(f"run {uid} {name}: stored {str(stored[name])[-200:]!r}, journal {str(want)[-200:]!r}")
        if not state.finished and stored["captured_out"] not in outputs[uid]:
            problems.append(f"run {uid}: cout.txt is none of the outputs the run had")
        series = stored_points(json.loads(read_back.read(f"{run_id}/metrics.json")))
        if state.finished:
            problems += differences(Counter(points[uid]), Counter(series), f"run {uid} metric point")
        else:  # a live run's: every point once, in order, up to some point
            for name in {point[0] for point in points[uid]}:
                mine = [point for point in series if point[0] == name]
                if mine != [point for point in points[uid] if point[0] == name][:len(mine)]:
                    problems.append(f"run {uid}: metrics.json {name!r} is not a prefix of the journal's")
        totals["metric points"] += len(series)
        for name in set(entry["artifacts"]):
            data = read_back.read(f"{run_id}/{name}")
            if data is None or hashlib.sha256(data).hexdigest() != artifacts[uid].get(name):
                problems.append(f"run {uid}: artifact {name!r} is not the journal's last of that name")
            totals["artifacts"] += 1
    assert not problems, f"{len(problems)} difference(s) between the files and the journal:\n" + "\n".join(problems[:40])
    return {"runs": len(runs), "events": sum(state.last_seq + 1 for state in states.values()), **totals}


@pytest.mark.slow
@STORES
def test_sigkill_at_random_points_while_replaying_into_filestorage_leaves_the_journals_files(base, tmp_path,
                                                                                           monkeypatch):
    if base.server is not None:
        monkeypatch.setattr(test_replay_crash, "KILL_AFTER_SECONDS", BUCKET_KILL_AFTER_SECONDS)
    rng = random.Random(SEED)
    journal, state, files, log = tmp_path / "journal", tmp_path / "state", tmp_path / "files", tmp_path / "daemon.log"
    began = time.monotonic()
    backlog = write_journal(journal, files, rng, RUNS if FULL else 8, POINTS_PER_RUN, LEFT_RUNNING)
    with Producer(journal, files, random.Random(rng.randrange(2**32)), LIVE_RUNS) as producer:
        seen = kill_repeatedly(journal, state, base.url, tmp_path, KILLS if FULL else 10, rng, log, backlog,
                               after_kill(base))
    producer.finish()
    delivered = sync(journal, state, tmp_path, base.url)
    assert sync(journal, state, tmp_path, base.url) == 0  # nothing is left, nothing is sent twice

    counts = assert_files_match_journal(base, journal)
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "CRITICAL" not in text, tail(log)
    print(f"\n{base.url.split(':')[0]}: {seen['kills']} SIGKILLs ({seen['in_backlog']} while replaying the "
          f"{backlog}-point backlog, {seen['rows_grew']} with points grown since the previous kill, "
          f"{seen['cursor_behind']} leaving a cursor behind its sink), final sync delivered {delivered}; "
          + ", ".join(f"{count} {what}" for what, count in counts.items())
          + f"; identical to the journal (total {time.monotonic() - began:.1f} s)")

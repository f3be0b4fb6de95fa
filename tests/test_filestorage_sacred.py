"""The seed experiment stored by Sacred's own FileStorageObserver and journaled at once, then
replayed into a file:// sink: file by file and field by field the same, except ids, times
and the deviations docs/compatibility.md lists (the sink's ``runrelay`` entry in run.json,
times with microseconds always, a heartbeat from the start, resources named under the
sink's own base)."""

from __future__ import annotations

import datetime as dt
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from runrelay.eventlog import Journal
from sinkkit import deliver, open_sink

EXPERIMENT = Path(__file__).parent / "experiments" / "seed_experiment.py"
BATCH_EVENTS = 7
TIMES = ("start_time", "heartbeat", "stop_time")


def observe(mode: str, journal_dir: Path, sacred_base: Path, *flags: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(EXPERIMENT), "-j", str(journal_dir), "-F", str(sacred_base), *flags,
            "with", f"mode={mode}", "epochs=4", "pause=0"]
    # from its own directory: Sacred's observer copies a queued run's sources by relative path
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=EXPERIMENT.parent)


def replay(journal_dir: Path, base: Path) -> None:
    journal = Journal(journal_dir)
    sink = open_sink(f"file://{base}", journal)
    try:
        for run in journal.runs():
            last = max(event.seq for event in journal.events(run))
            deliver(sink, journal, run, *range(BATCH_EVENTS, last + 1, BATCH_EVENTS))
    finally:
        sink.close()


def files_of(base: Path) -> dict[str, bytes]:
    return {str(path.relative_to(base)): path.read_bytes() for path in sorted(base.rglob("*"))
            if path.is_file() and not str(path.relative_to(base)).startswith("_runrelay")}


def comparable_metrics(text: bytes) -> dict:
    """metrics.json with its timestamps as datetimes (Sacred writes isoformat(), which drops
    zero microseconds; the sink writes them always) and NaN as a string."""
    metrics = json.loads(text)
    for series in metrics.values():
        series["timestamps"] = [dt.datetime.fromisoformat(stamp) for stamp in series["timestamps"]]
        series["values"] = ["nan" if isinstance(value, float) and math.isnan(value) else value
                            for value in series["values"]]
    return metrics


@pytest.mark.parametrize("mode,status", [("complete", "COMPLETED"), ("fail", "FAILED"), ("interrupt", "INTERRUPTED"),
                                         ("custom", "PREEMPTED"), ("queue", "QUEUED")])
def test_the_seed_run_is_what_sacreds_file_storage_observer_writes(mode, status, tmp_path):
    theirs_base, ours_base = tmp_path / "sacred", tmp_path / "ours"
    finished = observe("complete" if mode == "queue" else mode, tmp_path / "journal", theirs_base,
                       *(["-q"] if mode == "queue" else []))
    assert (finished.returncode == 0) == (mode in ("complete", "queue")), finished.stderr
    replay(tmp_path / "journal", ours_base)

    theirs, ours = files_of(theirs_base), files_of(ours_base)
    if "1/info.json" not in theirs:
        assert json.loads(ours.pop("1/info.json")) == {}  # written always: readers need it
    if mode == "queue":  # Sacred copies a queued run's sources into its run directory (artifacts to incense)
        # and writes no cout.txt or metrics.json (incense cannot load it); the sink writes them empty and
        # the sources where a started run's go
        assert ours.pop("1/cout.txt") == b"" and ours.pop("1/metrics.json") == b"{}"
        for name in ("regression.py", "seed_experiment.py"):
            shared = next(key for key in ours if key.startswith(f"_sources/{name[:-3]}_"))
            assert ours.pop(shared) == theirs.pop(f"1/{name}")
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        if name.endswith(("run.json", "metrics.json")):
            continue
        assert ours[name] == theirs[name], name

    their_run, our_run = json.loads(theirs["1/run.json"]), json.loads(ours["1/run.json"])
    assert our_run.pop("runrelay")["applied"] >= 0
    assert their_run["status"] == our_run["status"] == status
    if their_run.get("heartbeat") is None:
        their_run.pop("heartbeat", None)  # Sacred's queued run has none; the sink writes one (its queue time)
        our_run.pop("heartbeat")
    for key in TIMES:
        if key in their_run:
            ours_time = dt.datetime.strptime(our_run.pop(key), "%Y-%m-%dT%H:%M:%S.%f")
            assert abs((ours_time - dt.datetime.fromisoformat(their_run.pop(key))).total_seconds()) < 1, key
    if "resources" not in their_run:  # Sacred's queued run.json has no resources and artifacts
        assert our_run.pop("resources") == our_run.pop("artifacts") == []
    for entry in (their_run, our_run):
        for pair in entry.get("resources", []):
            pair[1] = Path(pair[1]).relative_to(theirs_base if entry is their_run else ours_base).as_posix()
        entry["meta"]["options"].pop("--file_storage")
    if mode == "queue":  # Sacred's queued run.json keeps (name, md5) pairs; the sink names the stored files
        their_sources = [entry["py/tuple"] for entry in their_run["experiment"].pop("sources")]
        our_sources = our_run["experiment"].pop("sources")
        assert [[name, f"_sources/{name[:-3]}_{md5}.py"] for name, md5 in their_sources] == our_sources
    if "result" not in their_run:
        assert our_run.pop("result") is None
    assert our_run.keys() == their_run.keys()
    for key in their_run:
        assert our_run[key] == their_run[key], key
    if "1/metrics.json" in theirs:
        assert comparable_metrics(ours["1/metrics.json"]) == comparable_metrics(theirs["1/metrics.json"])

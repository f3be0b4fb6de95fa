"""JournalObserver against Sacred's own FileStorageObserver, on the very same runs.

Each experiment runs in a subprocess with both observers attached from the command line
(``-j`` and ``-F``); the folded journal must hold everything FileStorage wrote.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from sacred import Experiment
from sacred.observers import FileStorageObserver, RunObserver
from sacred.serializer import flatten

from runrelay.eventlog import Journal, Kind, codec
from runrelay.eventlog.fold import RunState, fold
from runrelay.eventlog.sacred import PRIORITY, JournalObserver

EXPERIMENTS = Path(__file__).parent / "experiments"
EPOCHS = 20  # seed_experiment's default


def run_seed_experiment(tmp_path: Path, *args: str) -> tuple[Journal, Path]:
    journal, storage = tmp_path / "journal", tmp_path / "file_storage"
    # cwd: Sacred's FileStorageObserver copies queued sources by their name relative to it.
    done = subprocess.run(
        [sys.executable, "seed_experiment.py", "-j", str(journal), "-F", str(storage), "-b", "0.1", *args],
        cwd=EXPERIMENTS,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert Journal(journal).runs(), done.stderr
    return Journal(journal), storage


def only_run(journal: Journal) -> tuple[str, list, RunState]:
    [run] = journal.runs()
    assert journal.verify(run).ok
    events = list(journal.events(run))
    return run, events, fold(events)


def metric_series(journal: Journal, run: str) -> dict:
    """The run's metric points by name, as Sacred's metrics.json groups them."""
    series: dict = {}
    for points in journal.points(run, through_seq=journal.verify(run).last_seq):
        for name, step, value, timestamp in zip(points.names, points.steps, points.values, points.timestamps):
            metric = series.setdefault(name, {"steps": [], "values": [], "timestamps": []})
            metric["steps"].append(step)
            metric["values"].append(value)
            metric["timestamps"].append(timestamp)
    return series


def load(path: Path):
    return json.loads(path.read_text())


def as_stored(value):
    """A journaled value as FileStorageObserver writes it: datetimes in flatten's form."""
    if isinstance(value, dt.datetime):
        return flatten(value)
    if isinstance(value, dict):
        return {key: as_stored(item) for key, item in value.items()}
    if isinstance(value, list):
        return [as_stored(item) for item in value]
    return value


def same(a, b) -> bool:
    """Equal as JSON text: NaN equals NaN, while 1 and 1.0 differ."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def blob(journal: Journal, run: str, stored: dict) -> bytes:
    data = journal.blob(run, stored["digest"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == stored["digest"]
    assert hashlib.md5(data).hexdigest() == stored["md5"] and len(data) == stored["size"]
    return data


ENDINGS = {  # mode: (status, last event)
    "complete": ("COMPLETED", Kind.COMPLETED),
    "fail": ("FAILED", Kind.FAILED),
    "interrupt": ("INTERRUPTED", Kind.INTERRUPTED),
    "timeout": ("TIMEOUT", Kind.INTERRUPTED),
    "custom": ("PREEMPTED", Kind.INTERRUPTED),  # a SacredInterrupt subclass's own STATUS
}


@pytest.mark.parametrize("mode", ENDINGS)
def test_a_run_journals_everything_file_storage_stores(tmp_path, mode):
    journal, storage = run_seed_experiment(tmp_path, "with", f"mode={mode}")
    run, events, state = only_run(journal)
    run_dir = storage / "1"  # FileStorage numbered the run as it would without the journal
    stored = load(run_dir / "run.json")

    status, last = ENDINGS[mode]
    assert state.status == stored["status"] == status
    assert [events[0].kind, events[-1].kind] == [Kind.STARTED, last]
    assert events[0].body["sacred_id"] == state.sacred_id == "1"
    assert state.command == stored["command"] == "main"
    assert same(as_stored(state.config), load(run_dir / "config.json"))
    assert state.config["optimizer"] == {"lr": 0.2, "schedule": {"decay": 0.5, "every": 8}}
    assert same(as_stored(state.host), stored["host"])
    assert same(as_stored(state.meta), stored["meta"])

    # Times: the very datetimes FileStorage formatted, naive UTC with microseconds.
    for field in ("start_time", "heartbeat", "stop_time"):
        value = getattr(state, field)
        assert type(value) is dt.datetime and value.tzinfo is None
        assert stored[field] == value.isoformat()
    assert same(as_stored(state.result), stored.get("result"))
    assert stored.get("fail_trace") == (None if state.fail_trace is None else list(state.fail_trace))
    if mode == "fail":
        assert state.fail_trace[-1] == "RuntimeError: diverged (on purpose)\n"
    series = metric_series(journal, run)
    if mode == "complete":
        assert state.result == series["training.loss"]["values"][-1]

    # ex_info as Sacred handed it (FileStorage then rewrote its sources in place).
    experiment = {key: value for key, value in state.experiment.items() if key != "sources"}
    assert same(experiment, {key: value for key, value in stored["experiment"].items() if key != "sources"})
    assert state.experiment["sources"] == [{"py/tuple": [s["name"], s["md5"]]} for s in state.sources]
    assert [s["name"] for s in state.sources] == ["regression.py", "seed_experiment.py"]
    assert [name for name, _ in stored["experiment"]["sources"]] == [s["name"] for s in state.sources]
    for (_, copy), source in zip(stored["experiment"]["sources"], state.sources):
        original = (EXPERIMENTS / source["name"]).read_bytes()
        assert blob(journal, run, source) == (storage / copy).read_bytes() == original

    assert [[r["filename"]] for r in state.resources] == [[filename] for filename, _ in stored["resources"]]
    for resource, (_, copy) in zip(state.resources, stored["resources"]):
        assert blob(journal, run, resource) == Path(copy).read_bytes() == (EXPERIMENTS / "data/points.csv").read_bytes()

    # The artifact's file was deleted right after add_artifact; the blob kept its bytes.
    [artifact] = state.artifacts
    assert stored["artifacts"] == [artifact["name"]] == ["model.txt"]
    assert not Path(artifact["filename"]).exists()
    assert blob(journal, run, artifact) == (run_dir / "model.txt").read_bytes()
    assert blob(journal, run, artifact).startswith(b"weight ")
    assert artifact["metadata"] == {"format": "text", "epochs": EPOCHS}
    assert artifact["content_type"] is None

    assert same(as_stored(state.info), load(run_dir / "info.json"))
    assert state.info["model"]["weight"] > 2

    metrics = {
        name: {"steps": s["steps"], "values": s["values"], "timestamps": [t.isoformat() for t in s["timestamps"]]}
        for name, s in series.items()
    }
    assert same(metrics, load(run_dir / "metrics.json"))
    assert series["model.weight"]["steps"] == list(range(0, 10 * EPOCHS, 10))
    ratio = series["validation.ratio"]["values"]
    assert ratio[0] != ratio[0] and ratio[1] == float("inf")  # NaN and inf survive
    assert all(type(value) is float for value in series["model.weight"]["values"])  # np.float64 logged

    assert state.captured_out == (run_dir / "cout.txt").read_text()
    if mode == "complete":  # Sacred drops output printed since the last beat when a run fails
        assert f"epoch {EPOCHS - 1}: loss" in state.captured_out
    assert sum(event.kind is Kind.HEARTBEAT for event in events) >= 2

    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert state.process["host"] == socket.gethostname() and state.process["boot_id"] == boot_id
    assert isinstance(state.process["pid"], int) and isinstance(state.process["start_ticks"], int)


def test_a_queued_run_journals_what_file_storage_stores(tmp_path):
    journal, storage = run_seed_experiment(tmp_path, "-q", "with", "epochs=3")
    run, events, state = only_run(journal)
    stored = load(storage / "1" / "run.json")

    assert [event.kind for event in events] == [Kind.QUEUED]
    assert state.sacred_id == "1"
    assert state.status == stored["status"] == "QUEUED"
    assert same(state.experiment, stored["experiment"])  # queued: FileStorage keeps Sacred's sources
    assert same(as_stored(state.host), stored["host"])
    assert same(as_stored(state.meta), stored["meta"])
    assert state.meta["queue_time"] == state.queue_time and type(state.queue_time) is dt.datetime
    assert state.meta["options"]["--queue"] is True
    assert same(as_stored(state.config), load(storage / "1" / "config.json"))
    assert state.config["epochs"] == 3
    for source in state.sources:
        assert blob(journal, run, source) == (storage / "1" / source["name"]).read_bytes()
    assert "process" not in events[0].body


def test_an_id_given_to_sacred_is_kept_and_recorded(tmp_path):
    journal, storage = run_seed_experiment(tmp_path, "--id", "run-7", "with", "epochs=2", "pause=0")
    run, events, state = only_run(journal)
    assert events[0].body["sacred_id"] == "run-7"
    assert state.status == load(storage / "run-7" / "run.json")["status"] == "COMPLETED"


def inline_experiment() -> Experiment:
    ex = Experiment("inline", save_git_info=False)

    @ex.main
    def main(_run):
        for step in range(5):
            _run.log_scalar("loss", 1.0 / (step + 1))
        return "done"

    return ex


def test_sacred_observers_beside_the_journal_number_runs_as_without_it(tmp_path):
    ex = inline_experiment()
    ex.observers += [JournalObserver(tmp_path / "journal"), FileStorageObserver(tmp_path / "storage")]
    runs = [ex.run(options={"--capture": "no"}) for _ in range(2)]

    assert [sacred_run._id for sacred_run in runs] == ["1", "2"]
    assert sorted(path.name for path in (tmp_path / "storage").iterdir()) == ["1", "2", "_sources"]
    journal = Journal(tmp_path / "journal")
    states = [fold(journal.events(run)) for run in journal.runs()]
    assert [state.sacred_id for state in states] == ["1", "2"]
    assert [state.status for state in states] == ["COMPLETED", "COMPLETED"]


def test_the_journal_alone_gives_the_run_its_uid(tmp_path):
    observer = JournalObserver(tmp_path)
    ex = inline_experiment()
    ex.observers.append(observer)
    sacred_run = ex.run(options={"--capture": "no"})

    run, events, state = only_run(Journal(tmp_path))
    assert sacred_run._id == observer.run_uid == run
    assert "sacred_id" not in events[0].body and state.sacred_id is None


class FailsToStart(RunObserver):
    priority = 20  # after the journal, like every Sacred observer

    def started_event(self, *args, **kwargs):
        raise ConnectionError("database unreachable")

    def queued_event(self, *args, **kwargs):
        raise ConnectionError("database unreachable")


def test_an_observer_that_fails_to_start_fails_the_journaled_run(tmp_path):
    ex = inline_experiment()
    ex.observers += [JournalObserver(tmp_path / "journal"), FileStorageObserver(tmp_path / "storage"), FailsToStart()]
    with pytest.raises(ConnectionError):
        ex.run(options={"--capture": "no"})

    run, events, state = only_run(Journal(tmp_path / "journal"))
    assert [event.kind for event in events] == [Kind.STARTED, Kind.FAILED]
    assert state.status == "FAILED" and state.fail_trace[-1] == "ConnectionError: database unreachable\n"
    assert state.sacred_id == "1"  # FileStorage had numbered the run before the failure
    assert load(tmp_path / "storage" / "1" / "run.json")["status"] == "FAILED"


def test_a_run_sacred_could_not_queue_leaves_no_journal(tmp_path):
    ex = inline_experiment()
    ex.observers += [JournalObserver(tmp_path / "journal"), FailsToStart()]
    with pytest.raises(ConnectionError):
        ex.run(options={"--queue": True})
    assert Journal(tmp_path / "journal").runs() == []


def test_the_long_journal_flag_attaches_the_observer(tmp_path):
    subprocess.run(
        [sys.executable, "seed_experiment.py", "--journal", str(tmp_path), "with", "epochs=2", "pause=0"],
        cwd=EXPERIMENTS,
        capture_output=True,
        timeout=120,
    )
    assert only_run(Journal(tmp_path))[2].status == "COMPLETED"


def test_two_journal_observers_each_journal_every_metric_once(tmp_path):
    ex = inline_experiment()
    first, second = JournalObserver(tmp_path / "a"), JournalObserver(tmp_path / "b")
    ex.observers += [first, second]
    sacred_run = ex.run(options={"--capture": "no", "--beat-interval": "0.05"})

    assert first.priority == second.priority == PRIORITY
    assert sacred_run._id == first.run_uid
    for observer in (first, second):
        run, events, state = only_run(Journal(observer.journal_dir))
        assert state.status == "COMPLETED" and state.result == "done"
        assert metric_series(Journal(observer.journal_dir), run)["loss"]["steps"] == [0, 1, 2, 3, 4]
    assert events[0].body["sacred_id"] == first.run_uid  # the second one was handed the first's uid


def test_without_sacred_run_metrics_are_journaled_at_heartbeats(tmp_path):
    """Called outside Sacred's Run (no frame to hook), log_metrics journals the points."""
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "exp.py").write_text("print('hi')\n")
    observer = JournalObserver(tmp_path / "journal")
    queued_at, start = dt.datetime(2024, 5, 6, 7, 8, 9, 123456), dt.datetime(2024, 5, 6, 7, 8, 10, 1)
    ex_info = {"name": "direct", "base_dir": str(tmp_path / "code"), "sources": [("exp.py", "md5")]}
    meta = {"comment": "x", "when": {"at": queued_at, "pair": (start, 2)}}
    assert observer.started_event(ex_info, "main", {"hostname": "h"}, start, {"a": 1}, meta, None) == observer.run_uid
    ex_info["sources"].append(("later.py", "md5"))  # Sacred's observers mutate what they are handed
    meta["comment"] = "changed"

    observer.log_metrics({"m": {"steps": [0, 1], "values": [0.5, float("nan")], "timestamps": [start, start]}}, {})
    observer.heartbeat_event({"t": start}, "ab", start, None)
    observer.heartbeat_event({}, "abc", start, None)
    observer.heartbeat_event({}, "filtered", start, (1, 2))
    observer.completed_event(start, 3)

    run, events, state = only_run(Journal(tmp_path / "journal"))
    assert events[0].body["ex_info"]["sources"] == [{"py/tuple": ["exp.py", "md5"]}]
    assert events[0].body["meta_info"] == {"comment": "x", "when": {"at": queued_at, "pair": {"py/tuple": [start, 2]}}}
    assert [s["name"] for s in state.sources] == ["exp.py"]
    series = metric_series(Journal(tmp_path / "journal"), run)
    assert series["m"]["steps"] == [0, 1] and series["m"]["timestamps"] == [start, start]
    beats = [event.body for event in events if event.kind is Kind.HEARTBEAT]
    assert [beat.get("captured_out_append") for beat in beats] == ["ab", "c", None]
    assert beats[0]["info"] == {"t": start} and beats[2]["result"] == {"py/tuple": [1, 2]}
    assert state.captured_out == "filtered" and state.result == 3 and state.status == "COMPLETED"


class Unflattenable:
    def __getstate__(self):
        raise ValueError("no state to give")


def test_no_value_handed_to_sacred_fails_the_run_through_the_journal(tmp_path, caplog):
    ex = Experiment("big", save_git_info=False)

    @ex.config
    def config():
        flops = 3 * 10**21  # beyond MessagePack's 64 bits

    @ex.main
    def main(_run, flops):
        _run.log_scalar("flops", flops * 2**40)
        _run.info["huge"] = 2**10000  # beyond what the journal keeps
        _run.info["model"] = Unflattenable()  # Sacred's flatten raises
        return -flops

    observer = JournalObserver(tmp_path)
    ex.observers.append(observer)
    ex.run(options={"--capture": "no", "--beat-interval": "0.05"})

    run, events, state = only_run(Journal(tmp_path))
    assert state.status == "COMPLETED" and events[-1].kind is Kind.COMPLETED
    assert state.config["flops"] == 3 * 10**21 and state.result == -3 * 10**21
    assert metric_series(Journal(tmp_path), run)["flops"]["values"] == [3 * 10**21 * 2**40]
    assert state.info["huge"] == {codec.UNJOURNALED: "int", "repr": state.info["huge"]["repr"]}
    assert state.info["model"][codec.UNJOURNALED] == "Unflattenable"
    assert any("info.huge: an int of 10001 bits is too big to journal" in record.message for record in caplog.records)

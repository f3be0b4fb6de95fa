"""Making runs and batches for sink tests, exactly as the daemon makes them.

Batches come from ``Journal.read_batch`` and ``daemon.delivery.Stretch``; dead letters are
found and set aside by ``daemon.delivery.apply_isolating``: a sink under test sees nothing
the daemon would not hand it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

from runrelay.daemon.delivery import Stretch, apply_isolating, letter_batch
from runrelay.eventlog import Journal, JournalWriter, Kind
from runrelay.eventlog.events import Event
from runrelay.eventlog.fold import RunState, fold, passed
from runrelay.eventlog.reader import Position
from runrelay.sinks.base import Batch, Sink
from runrelay.sinks.registry import sink_for

T0 = dt.datetime(2024, 5, 1, 12, 0, 0, 123456)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def make_files(path: Path) -> Path:
    """An experiment's directory: a source file, a data file, a model."""
    path.mkdir()
    (path / "train.py").write_text("print('training')  # é\n")
    (path / "data.csv").write_text("1,2\n3,4\n")
    (path / "model.bin").write_bytes(bytes(range(256)) * 4)
    return path


def open_sink(url: str, journal: Journal, name: str = "test", **options) -> Sink:
    sink = sink_for(name, url, options, journal)
    sink.open()
    return sink


# --- making runs ------------------------------------------------------------------------------


def write_run(journal: Journal, steps: list[tuple[Kind, dict]]) -> str:
    """Journal one run. A body's ``file`` (a path) is stored as a blob and replaced by its
    digest, md5 and size; a started body's ``sources`` are paths stored the same way."""
    with JournalWriter.create(journal.root) as writer:
        append_steps(writer, steps)
    return writer.run


def append_steps(writer: JournalWriter, steps: list[tuple[Kind, dict]]) -> None:
    for kind, body in steps:
        body = dict(body)
        if "file" in body:
            body.update(writer.store_file(body.pop("file")))
        if "sources" in body:
            body["sources"] = [{"name": path.name, **writer.store_file(path)} for path in body["sources"]]
        writer.append(kind, body)


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


def artifact(path: Path, name: str | None = None) -> tuple[Kind, dict]:
    return Kind.ARTIFACT, {"name": name or path.name, "filename": str(path), "file": path,
                           "metadata": {"format": "raw"}, "content_type": None}


def lifecycle(files: Path, ending: tuple[Kind, dict] | None = None) -> list[tuple[Kind, dict]]:
    """A whole run, seqs 0-9: started, resource, 2 points, beat, 2 points, artifact, beat, ending."""
    return [
        started(files),
        (Kind.RESOURCE, {"filename": str(files / "data.csv"), "file": files / "data.csv"}),
        point("loss", 0, 0.5, 1),
        point("loss", 1, float("nan"), 2),
        beat(3, "epoch 1\n"),
        point("loss", 2, float("inf"), 4),
        point("accuracy", 0, 3, 4),
        artifact(files / "model.bin"),
        beat(5, "epoch 2\n", result=0.25),
        ending or (Kind.COMPLETED, {"stop_time": at(9), "result": 0.25}),
    ]


# --- batches as the daemon makes them ---------------------------------------------------------


class Delivery:
    """One run delivered to a sink the daemon's way; what it refused is in ``letters``."""

    def __init__(self, journal: Journal, run: str):
        self.journal, self.run = journal, run
        self.state = RunState(run)
        self.position = Position()
        self.letters: dict[int, str] = {}  # seq -> reason

    def stretch(self, through: int | None = None) -> Stretch:
        """The next records, up to seq ``through`` (default: the run's end)."""
        limit = 1_000_000 if through is None else through - self.position.seq + 1
        records = self.journal.read_batch(self.run, self.position, limit)
        return Stretch(self.run, self.state, records.events, records.points, self.position.seq, records.end.seq - 1)

    def batch(self, through: int | None = None) -> Batch:
        """The next batch without applying it (and without moving on)."""
        return self.stretch(through).batch(self._refuse)

    def apply(self, sink: Sink, through: int | None = None) -> Batch:
        """Apply the next batch, dead letters set aside as the daemon does; move on."""
        records = self.journal.read_batch(self.run, self.position,
                                          1_000_000 if through is None else through - self.position.seq + 1)
        stretch = Stretch(self.run, self.state, records.events, records.points, self.position.seq,
                          records.end.seq - 1)
        batch = apply_isolating(sink.apply, stretch, lambda call: call(), self._refuse)
        self.state, self.position = batch.state, records.end
        return batch

    def redeliver(self, sink: Sink, seq: int) -> None:
        """Re-drive the dead letter ``seq`` as ``runrelay dlq retry`` does."""
        event = next(event for event in self.journal.events(self.run) if event.seq == seq)
        state = passed(fold(list(self.journal.events(self.run, 0))[: max(sink.applied(self.run), seq) + 1]),
                       max(sink.applied(self.run), seq))
        sink.redeliver(letter_batch(event, state))

    def _refuse(self, event: Event, reason: str) -> None:
        self.letters[event.seq] = reason


def deliver(sink: Sink, journal: Journal, run: str, *cuts: int) -> Delivery:
    """Deliver the whole run in batches ending before each seq in ``cuts``."""
    delivery = Delivery(journal, run)
    for cut in cuts:
        delivery.apply(sink, through=cut - 1)
    delivery.apply(sink)
    return delivery

"""One Sacred run, stored by Sacred's own SqlObserver and by runrelay's SQL sink, read back
with Sacred's own reading model (``Run.to_json()``): the two must agree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from sacred.observers.sql_bases import Base, Run
from sqlalchemy.orm import Session

from runrelay.daemon.delivery import Stretch, apply_isolating
from runrelay.eventlog import Event, Journal, Kind
from runrelay.eventlog.events import Points
from runrelay.sinks.base import Sink
from sinkkit import Delivery, deliver, open_sink

EXPERIMENT = Path(__file__).parent / "experiments" / "seed_experiment.py"
BATCH_EVENTS = 7  # several batches, cut at arbitrary places
IDS_AND_TIMES = ("_id", "start_time", "heartbeat", "stop_time", "queue_time")


def observe(mode: str, journal_dir: Path, sacred_db: Path) -> subprocess.CompletedProcess:
    """Run the seed experiment journaled and stored by Sacred's SqlObserver at once."""
    argv = [sys.executable, str(EXPERIMENT), "-j", str(journal_dir), "-s", f"sqlite:///{sacred_db}",
            "with", f"mode={mode}", "epochs=4", "pause=0"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def replay(journal: Journal, sink: Sink) -> None:
    """Deliver every journaled run to ``sink`` in batches, as the daemon would."""
    for run in journal.runs():
        last = max(event.seq for event in journal.events(run))
        deliver(sink, journal, run, *range(BATCH_EVENTS, last + 1, BATCH_EVENTS))


def read_with_sacred(database: Path) -> dict:
    """The one run in ``database`` as Sacred's SqlObserver.query returns it, without ids and times."""
    engine = sa.create_engine(f"sqlite:///{database}")
    try:
        with Session(engine) as session:
            [run] = session.query(Run).all()
            document = run.to_json()
    finally:
        engine.dispose()
    for key in IDS_AND_TIMES:
        document.pop(key)
    for artifact in document["artifacts"]:
        artifact.pop("_id")
    for key in ("sources", "repositories", "dependencies"):  # Sacred's order is the session's flush order
        document["experiment"][key].sort(key=repr)
    return document


def replay_into(journal_dir, database) -> None:
    journal = Journal(journal_dir)
    sink = open_sink(f"sqlite:///{database}", journal)
    try:
        replay(journal, sink)
    finally:
        sink.close()


@pytest.mark.parametrize("mode", ["complete", "fail", "interrupt", "timeout"])
def test_sacreds_reader_sees_the_same_run_in_both_databases(mode, journal_dir, tmp_path):
    sacred_db, our_db = tmp_path / "sacred.db", tmp_path / "runrelay.db"
    finished = observe(mode, journal_dir, sacred_db)
    assert (finished.returncode == 0) == (mode == "complete"), finished.stderr
    replay_into(journal_dir, our_db)

    theirs, ours = read_with_sacred(sacred_db), read_with_sacred(our_db)
    assert ours.keys() == theirs.keys()
    for field in theirs:
        assert ours[field] == theirs[field], field
    assert ours["status"] == {"complete": "COMPLETED", "fail": "FAILED", "interrupt": "INTERRUPTED",
                              "timeout": "TIMEOUT"}[mode]


def test_a_custom_status_is_beyond_sacreds_reader_for_both(journal_dir, tmp_path):
    """Sacred's model declares status as a fixed Enum: reading a custom status fails the
    same way for the run Sacred stored itself and for ours (docs/compatibility.md)."""
    sacred_db, our_db = tmp_path / "sacred.db", tmp_path / "runrelay.db"
    assert observe("custom", journal_dir, sacred_db).returncode != 0
    replay_into(journal_dir, our_db)
    for database in (sacred_db, our_db):
        with pytest.raises(LookupError, match="PREEMPTED"):
            read_with_sacred(database)


@pytest.mark.parametrize("server", ["postgres", "mariadb"])
def test_tables_sacred_created_take_our_runs(server, request, journal_dir, tmp_path):
    """A database Sacred's SqlObserver set up (its status Enum, its narrow columns) takes
    our runs; a status outside its Enum is refused as that one event's permanent error."""
    url = request.getfixturevalue(f"{server}_url")
    engine = sa.create_engine(url)
    Base.metadata.create_all(engine)
    engine.dispose()
    assert observe("complete", journal_dir, tmp_path / "sacred.db").returncode == 0
    journal = Journal(journal_dir)
    [run] = journal.runs()
    *lived, ended = journal.events(run)  # the run as if it had died instead of completing
    verdict = {"status": "DIED", "reason": "test", "last_heartbeat": lived[-1].body["beat_time"]}
    died = Event(run, ended.seq, Kind.DIED, ended.time, verdict)
    sink = open_sink(url, journal)
    letters = {}
    try:
        delivery = Delivery(journal, run)
        delivery.apply(sink, through=ended.seq - 1)
        verdict_only = Stretch(run, delivery.state, [died], Points(), died.seq, died.seq)
        apply_isolating(sink.apply, verdict_only, lambda call: call(),
                        lambda event, reason: letters.setdefault(event.seq, reason))
    finally:
        sink.close()
    assert list(letters) == [died.seq] and "status" in letters[died.seq]
    engine = sa.create_engine(url)
    try:
        with Session(engine) as session:
            document = session.query(Run).one().to_json()
    finally:
        engine.dispose()
    assert document["status"] == "RUNNING" and document["experiment"]["name"] == "seed_regression"
    assert document["config"]["epochs"] == 4

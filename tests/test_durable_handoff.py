"""The hand-off record is untrusted journal content; the observer sink's configuration is checked
without running anything; the sink leaves alone what is not its own."""

from __future__ import annotations

import datetime as dt
import json
import os

import pytest

from runrelay.daemon.config import ConfigError, load
from runrelay.eventlog.durable import _batch
from runrelay.eventlog.events import Kind
from runrelay.eventlog.handoff import HandOff, Record, parse
from runrelay.eventlog.reader import Journal, Position
from runrelay.eventlog.writer import JournalWriter
from runrelay.eventlog.fold import RunState
from runrelay.sinks.base import RunDeferred, SinkConfigError
from runrelay.sinks.observer import ObserverSink
from runrelay.sinks.registry import sink_for

OBSERVER = "observer://sacred.observers:TinyDbObserver"


def record_bytes(**fields) -> bytes:
    return json.dumps({"format": 1, "observer": "X", "fed_through": 3, "id": "abc", **fields}).encode()


def test_a_valid_record_reads_back():
    assert parse(record_bytes()) == Record(3, "abc")
    assert parse(record_bytes(fed_through=-1, id=None)) == Record(-1, None)
    assert parse(record_bytes(id=7)) == Record(3, 7)
    assert parse(record_bytes(id="3")) == Record(3, "3")


@pytest.mark.parametrize("data", [
    b"", b"\xff\xfe", b"[1, 2]", b"null", b'{"format": 1}', record_bytes(format=2),
    record_bytes(fed_through=True), record_bytes(fed_through="3"), record_bytes(fed_through=-2),
    record_bytes(fed_through=2**63), record_bytes(fed_through=3.0), record_bytes(id=1.5), record_bytes(id=True),
    record_bytes(id={"py/object": "os.system"}), record_bytes(id=["a"]), record_bytes(id="x" * 256), record_bytes(id="../../etc"), record_bytes(id="a/b"),
    record_bytes(id=""), record_bytes(id=".."),
    b" " * 5000 + record_bytes(),
], ids=lambda data: repr(data[:40]))
def test_a_record_that_is_not_one_is_none(data):
    assert parse(data) is None


def test_a_record_that_is_a_symlink_or_a_fifo_is_none(tmp_path):
    (tmp_path / "elsewhere.json").write_bytes(record_bytes())
    os.symlink(tmp_path / "elsewhere.json", tmp_path / "observer-A.json")
    assert HandOff(tmp_path, "A").read() is None
    os.mkfifo(tmp_path / "observer-B.json")
    assert HandOff(tmp_path, "B").read() is None  # never opened: no hang


def test_saving_a_record_replaces_a_symlink_never_writes_through_it(tmp_path):
    target = tmp_path / "target"
    target.write_text("untouched")
    os.symlink(target, tmp_path / "observer-A.json")
    HandOff(tmp_path, "A").save(Record(0, "x"))
    assert target.read_text() == "untouched"
    assert HandOff(tmp_path, "A").read() == Record(0, "x")


@pytest.mark.parametrize("name", ["", "../x", "a/b", "-a", "x" * 65, "a b"])
def test_an_observer_name_that_is_no_file_name_is_refused(tmp_path, name):
    with pytest.raises(ValueError, match="observer name"):
        HandOff(tmp_path, name)


@pytest.mark.parametrize("url, options, message", [
    ("observer://no_such_module_here:Observer", {}, "cannot import 'no_such_module_here'"),
    ("observer://sacred.observers:NoSuchObserver", {}, "has no class 'NoSuchObserver'"),
    ("observer://sacred.observers", {}, "expected observer://module:Class"),
    (OBSERVER, {"args": ["runs_db"]}, "table of keyword arguments"),
    (OBSERVER, {"transient_errors": "OSError"}, "qualified exception class names"),
    (OBSERVER, {"path": "runs_db"}, "unknown option 'path'"),
])
def test_the_daemon_config_says_what_is_wrong_with_an_observer_sink(tmp_path, url, options, message):
    table = "".join(f"{key} = {json.dumps(value)}\n" for key, value in options.items())
    config = tmp_path / "runrelay.toml"
    config.write_text(f'[sinks.TinyDbObserver]\nurl = "{url}"\n{table}')
    with pytest.raises(ConfigError, match=message):
        load(config, environ={})


def test_an_observer_sink_is_named_after_its_class(tmp_path):
    config = load(None, environ={"RUNRELAY_SINKS": OBSERVER, "RUNRELAY_HOME": str(tmp_path)})
    assert [sink.name for sink in config.sinks] == ["TinyDbObserver"]


def journaled_run(tmp_path, wrapped_as: str | None):
    writer = JournalWriter.create(tmp_path / "journal")
    if wrapped_as:
        HandOff(writer.dir, wrapped_as).save(Record(), durable=True)
    writer.append(Kind.STARTED, {"ex_info": {"name": "x", "sources": []}, "host_info": {}, "config": {},
                                 "meta_info": {}, "start_time": dt.datetime(2026, 1, 1), "command": "main"})
    writer.append(Kind.COMPLETED, {"stop_time": dt.datetime(2026, 1, 1, 0, 1), "result": 1})
    writer.close()
    journal = Journal(tmp_path / "journal")
    records = journal.read_batch(writer.run, Position(), 10)
    return journal, _batch(writer.run, RunState(writer.run), records, 0)


def test_the_sink_leaves_a_run_wrapped_with_another_name_alone(tmp_path):
    journal, batch = journaled_run(tmp_path, wrapped_as="Other")
    sink = sink_for("TinyDbObserver", OBSERVER, {"args": {"path": str(tmp_path / "db")}}, journal)
    assert sink.applied(batch.run) == -1
    sink.apply(batch)
    assert not (tmp_path / "db").exists()  # never even built
    assert not [name for name in os.listdir(journal.run_dir(batch.run)) if "TinyDbObserver" in name]


def test_the_sink_defers_a_run_whose_feeder_holds_the_lock(tmp_path):
    journal, batch = journaled_run(tmp_path, wrapped_as="TinyDbObserver")
    feeder = HandOff(journal.run_dir(batch.run), "TinyDbObserver")
    assert feeder.try_lock()
    sink = ObserverSink("TinyDbObserver", OBSERVER, {"args": {"path": str(tmp_path / "db")}}, journal)
    with pytest.raises(RunDeferred):
        sink.apply(batch)
    feeder.release()
    sink.apply(batch)
    assert HandOff(journal.run_dir(batch.run), "TinyDbObserver").read().fed_through == batch.last_seq


def test_an_unknown_class_is_a_sink_config_error_without_the_daemon():
    with pytest.raises(SinkConfigError, match="PYTHONPATH"):
        ObserverSink.identity("observer://nowhere_module:X")


def test_an_observer_error_is_transient_only_when_its_backend_is_out_of_reach():
    import urllib.error

    import sqlalchemy.exc

    from runrelay.sinks.observer import is_transient

    assert is_transient(ConnectionRefusedError())
    assert is_transient(urllib.error.URLError("refused"))
    assert is_transient(urllib.error.HTTPError("http://x", 503, "busy", {}, None))
    assert not is_transient(urllib.error.HTTPError("http://x", 404, "gone", {}, None))
    assert is_transient(sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("down")))
    assert not is_transient(FileNotFoundError("x"))
    assert not is_transient(ValueError("bad"))
    assert is_transient(ValueError("custom"), ("builtins.ValueError",))

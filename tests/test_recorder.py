"""Recorder: a run journaled from plain Python code."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from runrelay.eventlog import Journal, Kind, codec
from runrelay.eventlog.fold import fold
from runrelay.eventlog.recorder import Recorder


def journaled(journal_dir, run: Recorder):
    journal = Journal(journal_dir)
    assert journal.runs() == [run.uid]
    assert journal.verify(run.uid).ok
    events = list(journal.events(run.uid))
    return events, fold(events)


def metric_series(journal_dir, run: Recorder) -> dict:
    """The run's metric points by name, as Sacred's metrics.json groups them."""
    journal, series = Journal(journal_dir), {}
    for points in journal.points(run.uid, through_seq=journal.verify(run.uid).last_seq):
        for name, step, value, timestamp in zip(points.names, points.steps, points.values, points.timestamps):
            metric = series.setdefault(name, {"steps": [], "values": [], "timestamps": []})
            metric["steps"].append(step)
            metric["values"].append(value)
            metric["timestamps"].append(timestamp)
    return series


def heartbeat_threads(run: Recorder) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == f"runrelay-heartbeat-{run.uid[:8]}"]


def test_a_block_that_ends_normally_completes_the_run(journal_dir):
    config = {"lr": 0.1, "epochs": 3, "model": {"layers": [64, 32], "dropout": 0.5}}
    with Recorder.start(config=config, journal_dir=journal_dir, experiment="demo", heartbeat_seconds=0.05) as run:
        assert heartbeat_threads(run)
        run.print("epoch", 1)
        run.info["best"] = {"epoch": 1}
        time.sleep(0.2)
        run.print("done")
        run.result = 0.9

    events, state = journaled(journal_dir, run)
    assert run.status == state.status == "COMPLETED"
    assert [events[0].kind, events[-2].kind, events[-1].kind] == [Kind.STARTED, Kind.HEARTBEAT, Kind.COMPLETED]
    assert state.config == config and state.experiment["name"] == "demo"
    assert state.result == 0.9 and state.info == {"best": {"epoch": 1}}
    assert state.captured_out == "epoch 1\ndone\n"
    assert state.process["pid"] == os.getpid()
    assert state.start_time < state.heartbeat and state.start_time.tzinfo is None
    assert sum(event.kind is Kind.HEARTBEAT for event in events) >= 3  # background beats, then the last


def test_the_heartbeat_thread_stops_when_the_run_ends(journal_dir):
    run = Recorder.start(journal_dir=journal_dir, heartbeat_seconds=0.01)
    time.sleep(0.05)
    run.finish(result=[1, 2])
    assert not heartbeat_threads(run)
    count = len(list(Journal(journal_dir).events(run.uid)))
    time.sleep(0.05)
    events, state = journaled(journal_dir, run)
    assert len(events) == count and events[-1].kind is Kind.COMPLETED
    assert state.result == [1, 2]


def test_an_exception_fails_the_run_with_its_traceback(journal_dir):
    with pytest.raises(ValueError):
        with Recorder.start(journal_dir=journal_dir) as run:
            raise ValueError("diverged")

    events, state = journaled(journal_dir, run)
    assert state.status == "FAILED" and events[-1].kind is Kind.FAILED
    assert state.fail_trace[0] == "Traceback (most recent call last):\n"
    assert state.fail_trace[-1] == "ValueError: diverged\n"
    assert not heartbeat_threads(run)


def test_keyboard_interrupt_interrupts_the_run(journal_dir):
    with pytest.raises(KeyboardInterrupt):
        with Recorder.start(journal_dir=journal_dir) as run:
            raise KeyboardInterrupt

    events, state = journaled(journal_dir, run)
    assert state.status == "INTERRUPTED" and events[-1].body["status"] == "INTERRUPTED"


def test_a_sacred_style_interrupt_keeps_its_status(journal_dir):
    class Timeout(Exception):
        STATUS = "TIMEOUT"

    with pytest.raises(Timeout):
        with Recorder.start(journal_dir=journal_dir) as run:
            raise Timeout

    assert journaled(journal_dir, run)[1].status == "TIMEOUT"


def test_explicit_endings_are_final(journal_dir):
    with Recorder.start(journal_dir=journal_dir) as run:
        try:
            raise OSError("disk gone")
        except OSError:
            run.fail()
    events, state = journaled(journal_dir, run)
    assert state.status == "FAILED" and state.fail_trace[-1] == "OSError: disk gone\n"
    assert sum(event.kind.is_terminal for event in events) == 1
    with pytest.raises(RuntimeError, match="already ended"):
        run.finish()

    other = Recorder.start(journal_dir=journal_dir / "other")
    other.fail(["line 1\n", "Boom\n"])
    assert journaled(journal_dir / "other", other)[1].fail_trace == ("line 1\n", "Boom\n")


def test_metric_steps_count_per_name_unless_given(journal_dir):
    with Recorder.start(journal_dir=journal_dir) as run:
        run.log_metric("loss", 1.0)
        run.log_metric("acc", np.float32(0.5))
        run.log_metric("loss", float("nan"))
        run.log_metric("loss", 3, step=10)
        run.log_metric("loss", float("-inf"))
        # journaled at once, not at the next heartbeat
        assert sum(event.kind is Kind.METRICS for event in Journal(journal_dir).events(run.uid)) == 5

    loss = metric_series(journal_dir, run)["loss"]
    assert loss["steps"] == [0, 1, 10, 11]
    assert loss["values"][0] == 1.0 and math.isnan(loss["values"][1]) and loss["values"][3] == float("-inf")
    assert type(loss["values"][2]) is int
    acc = metric_series(journal_dir, run)["acc"]["values"]
    assert acc == [0.5] and type(acc[0]) is float  # a NumPy scalar is journaled as the number it is
    assert loss["timestamps"] == sorted(loss["timestamps"])


def test_files_are_captured_when_added(journal_dir, tmp_path):
    model = tmp_path / "model.pt"
    model.write_bytes(b"weights v1")
    data = tmp_path / "data.csv"
    data.write_text("x,y\n1,2\n")
    with Recorder.start(journal_dir=journal_dir) as run:
        run.add_resource(data)
        run.add_artifact(model, metadata={"epoch": 3})
        model.write_bytes(b"weights v2")
        run.add_artifact(model, name="final.pt", content_type="application/octet-stream")
        model.unlink()

    journal = Journal(journal_dir)
    state = journaled(journal_dir, run)[1]
    first, final = state.artifacts
    assert (first["name"], first["metadata"], first["content_type"]) == ("model.pt", {"epoch": 3}, None)
    assert final["name"] == "final.pt" and final["filename"] == str(model)
    assert journal.blob(run.uid, first["digest"]).read_bytes() == b"weights v1"
    assert journal.blob(run.uid, final["digest"]).read_bytes() == b"weights v2"
    [resource] = state.resources
    assert resource["filename"] == str(data) and resource["size"] == len("x,y\n1,2\n")
    assert journal.blob(run.uid, resource["digest"]).read_text() == "x,y\n1,2\n"


def test_no_value_handed_to_the_recorder_fails_the_run(journal_dir, caplog):
    config = {"flops": 3 * 10**21, "model": object()}
    with Recorder.start(config=config, journal_dir=journal_dir) as run:
        run.log_metric("flops", 2**64)
        run.info["classes"] = {"cat", "dog"}
        run.result = -(2**100)

    events, state = journaled(journal_dir, run)
    assert state.status == "COMPLETED" and events[-1].kind is Kind.COMPLETED
    assert state.config["flops"] == 3 * 10**21 and state.result == -(2**100)
    assert state.config["model"][codec.UNJOURNALED] == "object"
    assert state.info["classes"][codec.UNJOURNALED] == "set"
    assert metric_series(journal_dir, run)["flops"]["values"] == [2**64]
    warnings = "\n".join(record.message for record in caplog.records if record.levelname == "WARNING")
    assert "config.model: cannot journal a value of type object" in warnings
    assert "info.classes: cannot journal a value of type set" in warnings
    assert "type int" not in warnings


@pytest.mark.parametrize("limit", [10, 200], ids=["segment header", "started event"])
def test_a_start_that_fails_leaves_no_run_behind(journal_dir, limit):
    """RLIMIT_FSIZE makes write(2) fail: before the segment header is whole, or in the first event."""
    script = textwrap.dedent(
        f"""
        import resource
        from runrelay.eventlog import JournalWriteError
        from runrelay.eventlog.recorder import Recorder
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        try:
            Recorder.start(journal_dir={str(journal_dir)!r})
        except JournalWriteError as error:
            print(error)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "File too large" in out
    assert os.listdir(journal_dir) == []

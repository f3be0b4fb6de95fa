"""A full journal disk: appends fail with JournalWriteError until space returns, then the
journal goes on; the Sacred experiment and the Recorder run never fail of it and end with
their real status (issue 8, item 3). The disk is a small tmpfs, really full."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest
from sacred import Experiment

from runrelay.eventlog import Journal, JournalWriteError, JournalWriter, Kind
from runrelay.eventlog import writer as writer_module
from runrelay.eventlog.fold import fold
from runrelay.eventlog.recorder import Recorder
from runrelay.eventlog.sacred import JournalObserver

from test_daemon_state import small_state_disk as small_disk  # noqa: F401 - a fixture
from test_sacred_observer import metric_series


def fill(directory: Path) -> Path:
    """Take every free byte of ``directory``'s filesystem (to the last page: tmpfs hands out
    pages, so a smaller write may still fit after a larger one failed)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as error:
                assert error.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def beat(step: int) -> dict:
    return {"beat_time": None, "info": {"step": step}, "result": None, "captured_out_append": "x" * 100}


@pytest.mark.parametrize("segment_bytes", [1, None], ids=["at a segment rotation", "inside a segment"])
def test_appends_fail_while_the_disk_is_full_and_go_on_once_space_returns(small_disk, segment_bytes, caplog):
    journal = small_disk / "journal"
    writer = JournalWriter.create(journal, segment_bytes=segment_bytes)  # 1: every append starts a segment
    writer.append(Kind.HEARTBEAT, beat(0))
    filler = fill(small_disk)
    with caplog.at_level(logging.WARNING, logger="runrelay.eventlog.writer"):
        for step in range(1, 4):
            with pytest.raises(JournalWriteError, match="No space left"):
                writer.append(Kind.HEARTBEAT, {**beat(step), "captured_out_append": "x" * 8192})
            if segment_bytes:  # a point fits in the segment's last page, but never in a new segment
                with pytest.raises(JournalWriteError, match="No space left"):
                    writer.append_metric("loss", step, 0.5)
        filler.unlink()
        assert writer.append(Kind.HEARTBEAT, beat(4)) == 1
        assert writer.append_metric("loss", 5, 0.25) == 2
    writer.close()

    failures = [record.message for record in caplog.records if "No space left" in record.message]
    assert len(failures) == 1  # the first of the series only
    failed = 6 if segment_bytes else 3
    assert any(f"journaling again; {failed} writes had failed" in record.message for record in caplog.records)
    check = Journal(journal).verify(writer.run)
    assert check.ok and check.torn is None and check.records == 3
    events = list(Journal(journal).events(writer.run))
    assert [event.body.get("info", {}).get("step") for event in events[:2]] == [0, 4]
    assert events[2].body["step"] == 5


@pytest.fixture
def small_segments(monkeypatch):
    """Every append starts a new segment, so each one on the full disk meets a rotation."""
    monkeypatch.setattr(writer_module, "DEFAULT_SEGMENT_BYTES", 1)


def test_a_sacred_experiment_outlives_a_full_journal_disk(small_disk, small_segments):
    ex = Experiment("full", save_git_info=False)
    artifact = small_disk.parent / "model.txt"
    artifact.write_text("weights")

    @ex.main
    def main(_run):
        _run.log_scalar("loss", 1.0)
        filler = fill(small_disk)
        for step in range(3):
            _run.log_scalar("lost", float(step))
        _run.add_artifact(str(artifact))
        filler.unlink()
        _run.log_scalar("loss", 0.5)
        return 42

    ex.observers.append(JournalObserver(small_disk / "journal"))
    sacred_run = ex.run(options={"--capture": "no"})

    assert sacred_run.status == "COMPLETED" and sacred_run.result == 42
    journal = Journal(small_disk / "journal")
    [run] = journal.runs()
    assert journal.verify(run).ok
    state = fold(journal.events(run))
    assert state.status == "COMPLETED" and state.result == 42
    assert metric_series(journal, run)["loss"]["values"] == [1.0, 0.5]
    assert "lost" not in metric_series(journal, run) and not state.artifacts


def test_a_recorder_run_outlives_a_full_journal_disk(small_disk, small_segments):
    journal_dir = small_disk / "journal"
    artifact = small_disk.parent / "model.txt"
    artifact.write_text("weights")
    with Recorder.start(journal_dir=journal_dir, heartbeat_seconds=60) as run:
        run.log_metric("loss", 1.0)
        filler = fill(small_disk)
        run.log_metric("lost", 2.0)
        run.add_artifact(artifact)
        run.print("said while the disk was full")
        filler.unlink()
        run.log_metric("loss", 0.5)
        run.result = 7

    journal = Journal(journal_dir)
    assert journal.verify(run.uid).ok
    state = fold(journal.events(run.uid))
    assert state.status == "COMPLETED" and state.result == 7
    assert state.captured_out == "said while the disk was full\n"
    assert metric_series(journal, run.uid)["loss"]["values"] == [1.0, 0.5]
    assert "lost" not in metric_series(journal, run.uid)

"""Producers never write what a reader calls corrupt, and a run's ending always lands: output
too large for one record goes in pieces, a body too large is cut with a visible note, a
body nested too deep or a seq beyond the last is refused with a marker or an error (issue 8,
items 4 and 5), and a FIFO where the writer's lock belongs hangs no follower."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from runrelay.eventlog import Journal, JournalWriteError, JournalWriter, Kind, codec
from runrelay.eventlog.format import (MAX_PAYLOAD, SEGMENT_HEADER_SIZE, encode_resume_hint, encode_segment_header,
                                      segment_name)
from runrelay.eventlog.fold import fold
from runrelay.eventlog.reader import MAX_DEPTH, MAX_SEQ
from runrelay.eventlog.recorder import OUTPUT_PIECE_CHARS, Recorder
from runrelay.eventlog.writer import LOCK_FILE


def nested(depth: int):
    value: object = "bottom"
    for _ in range(depth):
        value = {"down": value}
    return value


def ended(journal_dir, run: str):
    journal = Journal(journal_dir)
    check = journal.verify(run)
    assert check.ok and check.torn is None, check.corrupt
    events = list(journal.events(run))
    return events, fold(events)


# --- 4. output and bodies too large for one record ------------------------------------------


def test_output_beyond_one_record_between_beats_is_journaled_whole_in_pieces(journal_dir, capsys):
    text = "0123456789abcdé\n" * (5 * 1024 * 1024)  # 80 Mi characters, 85 MiB of UTF-8
    with Recorder.start(journal_dir=journal_dir, heartbeat_seconds=60) as run:
        run.print(text, end="")
        capsys.readouterr()
    events, state = ended(journal_dir, run.uid)
    assert state.status == "COMPLETED" and events[-1].kind is Kind.COMPLETED
    assert state.captured_out == text
    beats = [event for event in events if event.kind is Kind.HEARTBEAT]
    assert len(beats) == -(-len(text) // OUTPUT_PIECE_CHARS)


def test_a_body_beyond_one_record_is_cut_with_a_note_and_the_ending_lands(journal_dir, caplog):
    huge = "start" + "r" * (MAX_PAYLOAD + 1000) + "end"
    with Recorder.start(journal_dir=journal_dir, heartbeat_seconds=60) as run:
        run.info["log"] = huge
        run.result = huge
    events, state = ended(journal_dir, run.uid)
    assert state.status == "COMPLETED" and events[-1].kind is Kind.COMPLETED
    for kept in (state.result, state.info["log"]):
        assert kept.startswith("start") and kept.endswith("end") and len(kept) < MAX_PAYLOAD
        assert "characters cut here, too large to journal" in kept
    assert any("result: " in record.message and "characters cut (too large to journal)" in record.message
               for record in caplog.records)


def test_bytes_or_very_many_values_beyond_one_record_become_markers(journal_dir):
    many = ["x" * 4096] * 20_000  # 80 MiB in many parts
    result = {"blob": b"\0" * (MAX_PAYLOAD + 1), "series": many, "kept": [1, 2]}
    with JournalWriter.create(journal_dir) as writer:
        writer.append(Kind.COMPLETED, {"stop_time": None, "result": result})
        run = writer.run
    [event] = Journal(journal_dir).events(run)
    stored = event.body["result"]
    assert stored["blob"][codec.UNJOURNALED] == "bytes" and stored["series"][codec.UNJOURNALED] == "list"
    assert stored["kept"] == [1, 2]


# --- 5. nothing a reader calls corrupt ---------------------------------------------------------


def test_a_body_nested_deeper_than_readers_take_is_journaled_with_a_marker(journal_dir, caplog):
    with Recorder.start(config={"deep": nested(MAX_DEPTH + 50)}, journal_dir=journal_dir, heartbeat_seconds=60) as run:
        run.info["deep"] = nested(MAX_DEPTH + 50)
        run.result = nested(MAX_DEPTH + 50)
    events, state = ended(journal_dir, run.uid)
    assert state.status == "COMPLETED"
    value, depth = state.config["deep"], 2  # the body 0, its config 1
    while codec.UNJOURNALED not in value:
        value, depth = value["down"], depth + 1
    assert depth == codec.MAX_DEPTH
    assert any("nested more than" in record.message for record in caplog.records)


def test_a_seq_beyond_the_last_a_reader_takes_is_refused(journal_dir):
    with JournalWriter.create(journal_dir) as writer:
        writer.append(Kind.HEARTBEAT, {"beat_time": None, "info": {}, "result": None})
        run = writer.run
    segment = journal_dir / run / segment_name(MAX_SEQ)  # a newest segment starting at the last seq
    segment.write_bytes(encode_segment_header(run, MAX_SEQ))
    with open(journal_dir / run / LOCK_FILE, "r+b") as lock:  # and the hint naming it
        lock.write(encode_resume_hint(MAX_SEQ, SEGMENT_HEADER_SIZE, MAX_SEQ))
    with JournalWriter.resume(journal_dir, run) as writer:
        assert writer.append(Kind.HEARTBEAT, {"beat_time": None, "info": {}, "result": None}) == MAX_SEQ
        size = segment.stat().st_size
        with pytest.raises(JournalWriteError, match="beyond the last"):
            writer.append(Kind.COMPLETED, {"stop_time": None, "result": None})
        with pytest.raises(JournalWriteError, match="beyond the last"):
            writer.append_metric("loss", 0, 1.0)
    assert segment.stat().st_size == size


# --- a FIFO where the writer's lock belongs ---------------------------------------------------


def test_following_a_run_whose_lock_is_a_fifo_ends(journal_dir):
    with JournalWriter.create(journal_dir) as writer:
        writer.append(Kind.HEARTBEAT, {"beat_time": None, "info": {}, "result": None})
        run = writer.run
    lock = journal_dir / run / LOCK_FILE
    lock.unlink()
    os.mkfifo(lock)
    done = subprocess.run([sys.executable, "-m", "runrelay.daemon.cli", "journal", "cat", "--follow",
                           "--journal", str(journal_dir), run], capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    assert '"kind": "heartbeat"' in done.stdout

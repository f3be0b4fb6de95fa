"""The journal's writer, reader and format, on real files."""

from __future__ import annotations

import datetime as dt
import math
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from runrelay.eventlog import codec
from runrelay.eventlog import Durability, Journal, JournalCorrupt, JournalWriteError, JournalWriter, Kind, WriterBusy
from runrelay.eventlog.events import Event, check_run_uid, new_run_uid
from runrelay.eventlog.fold import Folding, MalformedEvent, RunState, fold_event
from runrelay.eventlog.reader import _Outcome
from runrelay.eventlog.writer import writer_alive


def test_values_keep_their_types(journal_dir):
    body = {
        "nan": math.nan,
        "inf": math.inf,
        "-inf": -math.inf,
        "int": 3,
        "float": 3.0,
        "naive": dt.datetime(2024, 5, 6, 7, 8, 9, 123456),
        "aware": dt.datetime(2024, 5, 6, 7, 8, 9, 654321, tzinfo=dt.timezone(dt.timedelta(hours=2))),
        "nested": {"a": [1, 2.5, {"b": None, "c": True}], "bytes": b"\x00\xff"},
    }
    with JournalWriter.create(journal_dir) as writer:
        writer.append(Kind.STARTED, body)
    (event,) = Journal(journal_dir).events(writer.run)
    got = event.body
    assert math.isnan(got["nan"]) and got["inf"] == math.inf and got["-inf"] == -math.inf
    assert type(got["int"]) is int and type(got["float"]) is float
    assert got["naive"] == body["naive"] and got["naive"].tzinfo is None
    assert got["aware"] == body["aware"] and got["aware"].utcoffset() == dt.timedelta(hours=2)
    assert got["nested"] == body["nested"]
    assert event.time.tzinfo == dt.timezone.utc and event.kind is Kind.STARTED and event.seq == 0


def test_ints_beyond_64_bits_and_tuple_keys_are_journaled_exactly(journal_dir):
    ints = [2**64, 3 * 10**21, -(2**63) - 1, -(2**1000), 2**8190, 2**64 - 1, -(2**63), 0]
    with JournalWriter.create(journal_dir) as writer:
        writer.append(Kind.STARTED, {"config": {"ints": ints, "grid": {(0, (1, 2)): 0.5}}})
    (event,) = Journal(journal_dir).events(writer.run)
    assert event.body["config"]["ints"] == ints and all(type(value) is int for value in event.body["config"]["ints"])
    assert event.body["config"]["grid"] == {(0, (1, 2)): 0.5}
    assert codec.encode(2**64 - 1) == b"\xcf" + b"\xff" * 8  # what MessagePack holds stays MessagePack


def test_what_cannot_be_journaled_becomes_a_marker_with_one_warning(journal_dir, caplog):
    body = {"model": object(), "name": "caf\udce9", "classes": {"cat"}, "huge": 2**8191, "ok": [1, 2**70]}
    with JournalWriter.create(journal_dir) as writer:
        writer.append(Kind.STARTED, body)
        writer.append(Kind.STARTED, body)
    first, second = (event.body for event in Journal(journal_dir).events(writer.run))
    assert first == second
    assert first["model"][codec.UNJOURNALED] == "object" and first["model"]["repr"].startswith("<object object")
    assert first["classes"] == {codec.UNJOURNALED: "set", "repr": "{'cat'}"}
    assert first["huge"][codec.UNJOURNALED] == "int" and first["name"] == "caf\\udce9"
    assert first["ok"] == [1, 2**70]
    [warning] = [record for record in caplog.records if record.levelname == "WARNING"]
    assert "started event journaled with markers for model: cannot journal a value of type object" in warning.message
    assert "huge: an int of 8192 bits is too big to journal" in warning.message


def test_run_uids_sort_by_creation_and_are_validated():
    uids = [new_run_uid() for _ in range(50)]
    assert all(check_run_uid(u) == u for u in uids)
    with pytest.raises(ValueError, match="not a runrelay run uid"):
        check_run_uid("../../etc")


def test_rotation_and_resuming_from_any_seq_or_position(journal_dir):
    with JournalWriter.create(journal_dir, segment_bytes=2048) as writer:
        for step in range(300):
            writer.append(Kind.METRICS, {"name": "loss", "step": step, "value": step / 3, "timestamp": None})
    run_dir = journal_dir / writer.run
    assert len(list(run_dir.glob("*.seg"))) > 5
    journal = Journal(journal_dir)
    pairs = list(journal.read(writer.run))
    assert [e.seq for e, _ in pairs] == list(range(300))
    for index in (0, 1, 57, 150, 298):
        _, position = pairs[index]
        assert [e.seq for e, _ in journal.read(writer.run, position)] == list(range(index + 1, 300))
        assert [e.seq for e, _ in journal.read(writer.run, index)] == list(range(index, 300))
    assert list(journal.read(writer.run, pairs[-1][1])) == []


def test_journal_files_are_owner_only(journal_dir, tmp_path):
    source = tmp_path / "model.bin"
    source.write_bytes(b"weights")
    with JournalWriter.create(journal_dir) as writer:
        writer.store_file(source)
        writer.append(Kind.STARTED, {})
    for path in [journal_dir, *journal_dir.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path} is {oct(mode)}"


def test_blob_keeps_the_bytes_seen_at_event_time(journal_dir, tmp_path):
    source = tmp_path / "artifact.txt"
    source.write_bytes(b"first version")
    with JournalWriter.create(journal_dir) as writer:
        ref = writer.store_file(source)
        source.write_bytes(b"rewritten a moment later")
        source.unlink()
    assert ref["size"] == len(b"first version")
    assert Journal(journal_dir).blob(writer.run, ref["digest"]).read_bytes() == b"first version"
    with pytest.raises(ValueError):
        Journal(journal_dir).blob(writer.run, "../../../etc/passwd")


def test_one_writer_per_run(journal_dir):
    with JournalWriter.create(journal_dir) as writer:
        assert writer_alive(journal_dir / writer.run)
        with pytest.raises(WriterBusy):
            JournalWriter.resume(journal_dir, writer.run)
    assert not writer_alive(journal_dir / writer.run)


def test_resume_continues_the_sequence(journal_dir):
    with JournalWriter.create(journal_dir, segment_bytes=1024) as writer:
        for step in range(40):
            writer.append(Kind.METRICS, {"name": "x", "step": step, "value": 1.0, "timestamp": None})
    with JournalWriter.resume(journal_dir, writer.run, segment_bytes=1024) as resumed:
        assert resumed.append(Kind.DIED, {"reason": "test"}) == 40
    check = Journal(journal_dir).verify(writer.run)
    assert check.ok and check.records == 41 and check.torn is None


def test_a_closed_writer_refuses_appends(journal_dir):
    writer = JournalWriter.create(journal_dir)
    writer.close()
    with pytest.raises(JournalWriteError, match="closed"):
        writer.append(Kind.HEARTBEAT, {})


def test_durability_knobs_are_checked():
    with pytest.raises(ValueError, match="positive"):
        Durability(group_commit_seconds=0)


def test_corruption_is_raised_after_the_good_events(journal_dir):
    with JournalWriter.create(journal_dir) as writer:
        for step in range(10):
            writer.append(Kind.METRICS, {"name": "x", "step": step, "value": 1.0, "timestamp": None})
    segment = next((journal_dir / writer.run).glob("*.seg"))
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF
    segment.write_bytes(bytes(data))
    seen = []
    with pytest.raises(JournalCorrupt) as raised:
        for event in Journal(journal_dir).events(writer.run):
            seen.append(event.seq)
    assert seen == list(range(len(seen))) and len(seen) < 10
    assert raised.value.segment == segment.name and raised.value.offset > 0


def test_file_size_limit_is_a_clear_error_and_keeps_what_was_journaled(journal_dir):
    """RLIMIT_FSIZE makes write(2) fail part-way; the writer cuts the partial record."""
    script = textwrap.dedent(
        f"""
        import resource, sys
        from runrelay.eventlog import JournalWriter, JournalWriteError, Kind
        resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000))
        writer = JournalWriter.create({str(journal_dir)!r})
        print(writer.run, flush=True)
        appended = 0
        try:
            for step in range(10_000):
                writer.append(Kind.METRICS, {{"name": "x", "step": step, "value": 0.5, "pad": "p" * 300}})
                appended += 1
        except JournalWriteError as error:
            print(appended, flush=True)
            print(error, flush=True)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    run, appended, message = out.splitlines()[:3]
    assert "could not append" in message and "File too large" in message
    check = Journal(journal_dir).verify(run)
    assert check.ok and check.torn is None
    assert check.records == int(appended) > 0


def test_reading_a_missing_run_says_so(journal_dir):
    from runrelay.eventlog import UnknownRun

    with pytest.raises(UnknownRun):
        list(Journal(journal_dir).events(new_run_uid()))
    assert Journal(journal_dir / "nowhere").runs() == []
    os.makedirs(journal_dir / "not-a-run")
    assert Journal(journal_dir).runs() == []


def test_follow_yields_live_events_until_the_run_ends(journal_dir):
    import threading

    writer = JournalWriter.create(journal_dir)
    writer.append(Kind.STARTED, {})

    def produce():
        for step in range(20):
            writer.append(Kind.METRICS, {"name": "x", "step": step, "value": 1.0, "timestamp": None})
        writer.append(Kind.COMPLETED, {"result": 1})
        writer.close()

    thread = threading.Thread(target=produce)
    thread.start()
    kinds = [e.kind for e in Journal(journal_dir).follow(writer.run, poll_seconds=0.01)]
    thread.join()
    assert kinds[0] is Kind.STARTED and kinds[-1] is Kind.COMPLETED and len(kinds) == 22


def test_producers_and_the_daemon_share_one_journal_location_rule(tmp_path):
    from runrelay.daemon.config import load
    from runrelay.eventlog.location import default_journal_dir

    cases = [
        ({"RUNRELAY_JOURNAL": str(tmp_path / "j"), "RUNRELAY_HOME": str(tmp_path / "h")}, tmp_path / "j"),
        ({"RUNRELAY_HOME": str(tmp_path / "h")}, tmp_path / "h" / "journal"),
        ({"XDG_DATA_HOME": str(tmp_path / "x")}, tmp_path / "x" / "runrelay" / "journal"),
    ]
    for environ, expected in cases:
        assert default_journal_dir(environ) == expected
        assert load(None, {}, environ=environ).journal == expected


def test_a_metric_point_reads_back_the_same_on_the_fast_path_or_not(journal_dir):
    stamp = dt.datetime(2024, 5, 6, 7, 8, 9, 123456)
    aware = stamp.replace(tzinfo=dt.timezone.utc)
    points = [("loss", 0, 0.5, stamp), ("loss", 1, 3, None), ("loss", 2, math.nan, stamp), ("big", 3, 2**70, stamp),
              ("aware", 4, 1.0, aware), ("flag", 5, True, stamp), ("caf\udce9", 6, 1.0, stamp)]
    with JournalWriter.create(journal_dir) as writer:
        for name, step, value, timestamp in points:
            writer.append_metric(name, step, value, timestamp)
    events = list(Journal(journal_dir).events(writer.run))
    assert [e.kind for e in events] == [Kind.METRICS] * len(points)
    for event, (name, step, value, timestamp) in zip(events[:6], points):
        assert event.body.keys() == {"name", "step", "value", "timestamp"}
        assert (event.body["name"], event.body["step"], event.body["timestamp"]) == (name, step, timestamp)
        assert type(event.body["value"]) is type(value) and (event.body["value"] == value or math.isnan(value))
    assert events[-1].body["name"] == "caf\\udce9"  # journaled with a marker, as append does


def test_a_batch_holds_each_point_once_in_columns_whatever_its_shape_and_a_fold_only_read_none(journal_dir):
    stamp = dt.datetime(2024, 5, 6, 7, 8, 9, 123456)
    with JournalWriter.create(journal_dir) as writer:
        writer.append(Kind.STARTED, {"command": "main", "start_time": stamp})
        writer.append_metric("loss", 0, 0.5, stamp)  # columns
        writer.append(Kind.METRICS, {"name": "loss", "step": 1, "value": 2, "timestamp": None})  # [kind, time, body]
        writer.append_metric("", 2, 1.0, stamp)  # malformed (no name): an Event, for the fold to refuse
        writer.append(Kind.HEARTBEAT, {"beat_time": stamp, "info": {}})
        writer.append_metric("loss", 3, 1.5, None)
    journal = Journal(journal_dir)
    batch = journal.read_batch(writer.run, 0, 100)
    assert list(zip(batch.points.seqs, batch.points.names, batch.points.steps, batch.points.values,
                    batch.points.timestamps)) == [(1, "loss", 0, 0.5, stamp), (2, "loss", 1, 2, None),
                                                  (5, "loss", 3, 1.5, None)]
    assert [(event.seq, event.kind) for event in batch.events] == [(0, Kind.STARTED), (3, Kind.METRICS),
                                                                   (4, Kind.HEARTBEAT)]
    fold_only = journal.read_batch(writer.run, 0, 100, fold_only=True)
    assert [event.seq for event in fold_only.events] == [0, 4]
    assert (fold_only.end, fold_only.records, len(fold_only.points)) == (batch.end, 6, 0)
    assert journal.read_batch(writer.run, 0, 3, fold_only=True).end == journal.read_batch(writer.run, 0, 3).end


def test_folding_heartbeats_adds_their_output_in_order_and_a_replacement_drops_what_came_before():
    run = new_run_uid()
    beats = [{"captured_out_append": "a"}, {"captured_out_append": "b"}, {"captured_out": "new"},
             {"captured_out_append": 42}, {"captured_out_append": "c"}, {}]
    events = [Event(run, seq, Kind.HEARTBEAT, dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc),
                    {"beat_time": None, "info": {}, **body}) for seq, body in enumerate(beats)]
    folding, one_by_one = Folding(RunState(run, captured_out="start:")), RunState(run, captured_out="start:")
    for event in events[:2]:
        folding.add(event)
        one_by_one = fold_event(one_by_one, event)
    assert folding.state.captured_out == one_by_one.captured_out == "start:ab"
    for event in events[2:]:
        try:
            folding.add(event)
            one_by_one = fold_event(one_by_one, event)
        except MalformedEvent:
            assert event.seq == 3  # refused: the folding is as it was
    assert folding.state == one_by_one
    assert (folding.state.captured_out, folding.state.last_seq) == ("newc", 5)


def test_resume_checks_from_the_hint_and_without_it_checks_everything(journal_dir):
    with JournalWriter.create(journal_dir, segment_bytes=1024) as writer:
        for step in range(100):
            writer.append_metric("x", step, 1.0)
    run_dir = journal_dir / writer.run
    newest = max(run_dir.glob("*.seg"))
    with open(newest, "ab") as f:
        f.write(b"\x00\x00\x01")  # a torn record header after the hint
    with JournalWriter.resume(journal_dir, writer.run, segment_bytes=1024) as resumed:
        assert resumed.append(Kind.DIED, {"reason": "test"}) == 100
    hint = bytearray((run_dir / "writer.lock").read_bytes())
    hint[3] ^= 1  # a damaged hint is ignored: every record is checked
    (run_dir / "writer.lock").write_bytes(bytes(hint))
    oldest = min(run_dir.glob("*.seg"))
    data = bytearray(oldest.read_bytes())
    data[60] ^= 0xFF
    oldest.write_bytes(bytes(data))
    with pytest.raises(JournalCorrupt):
        JournalWriter.resume(journal_dir, writer.run)


@pytest.mark.parametrize("hint", ["a later seq at the end", "an earlier seq at the end", "the middle of a record",
                                  "the header with a seq not the segment's", "an older writer's: the end"])
def test_resume_trusts_a_hint_only_where_the_segment_vouches_for_it(journal_dir, hint):
    from runrelay.eventlog.format import SEGMENT_HEADER_SIZE, encode_resume_hint
    from runrelay.eventlog.writer import LOCK_FILE

    with JournalWriter.create(journal_dir) as writer:
        for step in range(10):
            writer.append_metric("x", step, 1.0)
    end = (journal_dir / writer.run / "00000000000000000000.seg").stat().st_size
    segment, offset, seq = {"a later seq at the end": (0, end, 500), "an earlier seq at the end": (0, end, 3),
                            "the middle of a record": (0, end - 7, 9),
                            "the header with a seq not the segment's": (0, SEGMENT_HEADER_SIZE, 4),
                            "an older writer's: the end": (0, end, 10)}[hint]
    (journal_dir / writer.run / LOCK_FILE).write_bytes(encode_resume_hint(segment, offset, seq))
    with JournalWriter.resume(journal_dir, writer.run) as resumed:
        assert resumed.append(Kind.DIED, {"reason": "test"}) == 10  # not a gap, not a second seq 3
    assert Journal(journal_dir).verify(writer.run).ok


def test_resuming_a_version_1_run_writes_version_1_shapes_in_its_segment(tmp_path):
    import shutil
    from pathlib import Path

    fixture = Path(__file__).parent / "fixtures" / "journal" / "clean"  # written by version 1
    shutil.copytree(fixture, tmp_path / "clean")
    run = "0190a1b2-c3d4-7e5f-8a6b-7c8d9e0f1a2b"
    with JournalWriter.resume(tmp_path / "clean", run) as writer:
        assert writer.append_metric("loss", 10, 0.1) == 10
    journal = Journal(tmp_path / "clean")
    assert journal.verify(run).ok
    [segment] = (tmp_path / "clean" / run).glob("*.seg")
    assert segment.read_bytes()[8:10] == b"\x00\x01"
    payloads = [payload for _, payload, *_ in journal._records(run, 0, _Outcome())]
    assert len(codec.decode(payloads[-1])) == 3  # [kind, time, body]: no column payload in a v1 segment
    last = list(journal.events(run))[-1]
    assert last.body == {"name": "loss", "step": 10, "value": 0.1, "timestamp": None}

"""Delivering journals with `runrelay sync` and `runrelay dlq` (real processes, the SQLite sink)."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from runrelay.daemon.state import StateStore
from runrelay.eventlog.events import Kind
from runrelay.eventlog.reader import Journal
from runrelay.eventlog.writer import JournalWriter
from sinkkit import deliver, open_sink

FIXTURES = Path(__file__).parent / "fixtures" / "journal"
START = dt.datetime(2024, 5, 6, 7, 8, 9, 123456)
HANG_SECONDS = 300  # a command taking this long is hung: fail instead of blocking the suite


class Place:
    """A journal, a state directory and a SQLite sink in one temp dir, driven by the CLI."""

    def __init__(self, root: Path):
        self.root = root
        self.journal = root / "journal"
        self.state = root / "state"
        self.database = root / "runs.sqlite"
        self.url = f"sqlite:///{self.database}"

    def runrelay(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        location = ["--journal", str(self.journal), "--state", str(self.state), "--sink", self.url]
        return subprocess.run(
            [sys.executable, "-m", "runrelay.daemon.cli", *args, *location],
            capture_output=True, text=True, env={"RUNRELAY_HOME": str(self.root), "PATH": "/usr/bin:/bin", **env},
            timeout=HANG_SECONDS,
        )

    def sync(self, **env: str) -> subprocess.CompletedProcess:
        return self.runrelay("sync", "--no-progress", **env)

    def query(self, sql: str, *params) -> list[tuple]:
        with sqlite3.connect(self.database) as db:
            return db.execute(sql, params).fetchall()

    def points(self, run: str, name: str = "loss") -> int:
        return self.query(
            "SELECT count(*) FROM metric JOIN runrelay_run USING (run_id) WHERE uid = ? AND name = ?", run, name
        )[0][0]

    def status_of(self, run: str) -> str:
        return self.query("SELECT status FROM run JOIN runrelay_run USING (run_id) WHERE uid = ?", run)[0][0]

    def cursors(self) -> dict:
        store = StateStore.open(self.state)
        try:
            return store.cursors(self.url)
        finally:
            store.close()


@pytest.fixture
def place(tmp_path) -> Place:
    return Place(tmp_path)


def write_run(journal: Path, points: int, end: Kind | None = Kind.COMPLETED, extra: dict | None = None) -> str:
    """A run: started, ``points`` loss metrics (and ``extra`` metrics by step), then ``end``."""
    with JournalWriter.create(journal) as writer:
        writer.append(Kind.STARTED, {
            "ex_info": {"name": "delivery_test", "base_dir": "/", "sources": [], "dependencies": [],
                        "repositories": []},
            "command": "main", "host_info": {"hostname": "testhost"}, "start_time": START,
            "config": {"lr": 0.1}, "meta_info": {}, "sources": [],
        })
        for step in range(points):
            writer.append(Kind.METRICS, _point("loss", step))
            if extra and step in extra:
                writer.append(Kind.METRICS, _point(extra[step], step))
        if end is Kind.COMPLETED:
            writer.append(end, {"stop_time": START, "result": 0.5})
        return writer.run


def _point(name: str, step: int) -> dict:
    return {"name": name, "step": step, "value": 1 / (step + 1), "timestamp": START}


def continue_run(journal: Path, run: str, points: int, first_step: int) -> None:
    with JournalWriter.resume(journal, run) as writer:
        for step in range(first_step, first_step + points):
            writer.append(Kind.METRICS, _point("loss", step))
        writer.append(Kind.COMPLETED, {"stop_time": START, "result": 0.25})


def flip_a_payload_byte(segment: Path) -> None:
    """Damage the first record of ``segment``: flip a bit inside its payload."""
    with open(segment, "r+b") as f:
        f.seek(70)
        byte = f.read(1)
        f.seek(70)
        f.write(bytes([byte[0] ^ 0x40]))


def test_sync_delivers_every_event_exactly_once(place):
    runs = [write_run(place.journal, points) for points in (300, 1, 120)]
    first = place.sync(RUNRELAY_DELIVERY_BATCH_EVENTS="50")
    assert first.returncode == 0, first.stderr
    assert first.stdout == "delivered 427 event(s)\n"  # 3 started + 421 points + 3 completed
    assert [place.points(run) for run in runs] == [300, 1, 120]
    assert [place.status_of(run) for run in runs] == ["COMPLETED"] * 3

    again = place.sync()
    assert again.returncode == 0, again.stderr
    assert again.stdout == "delivered 0 event(s)\n"
    assert [place.points(run) for run in runs] == [300, 1, 120]
    assert place.query("SELECT count(*) FROM run") == [(3,)]


def test_cursors_survive_a_restart_and_resume_where_they_stopped(place):
    finished = write_run(place.journal, 40)
    live = write_run(place.journal, 100, end=None)  # still running: no ending yet
    assert place.sync().returncode == 0
    cursors = place.cursors()
    assert (cursors[finished].position.seq, cursors[finished].done) == (42, True)
    assert (cursors[live].position.seq, cursors[live].done) == (101, False)

    continue_run(place.journal, live, points=50, first_step=100)
    resumed = place.sync()
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout == "delivered 51 event(s)\n"  # only what was appended since
    assert place.points(live) == 150
    assert place.status_of(live) == "COMPLETED"
    assert place.cursors()[live].position.seq == 152


def test_the_sink_is_the_truth_when_the_cursors_are_lost(place):
    runs = [write_run(place.journal, 25) for _ in range(2)]
    assert place.sync().returncode == 0
    shutil.rmtree(place.state)  # as if every cursor save had been lost after the sink committed
    again = place.sync()
    assert again.returncode == 0, again.stderr
    assert [place.points(run) for run in runs] == [25, 25]
    assert place.query("SELECT count(*) FROM run") == [(2,)]
    assert place.cursors()[runs[0]].position.seq == 27


def test_a_permanent_error_is_dead_lettered_the_stream_continues_and_retry_redrives(place):
    write_run(place.journal, 1)
    assert place.sync().returncode == 0  # the sink's tables now exist
    place.query("CREATE TRIGGER refuse_poison BEFORE INSERT ON metric WHEN NEW.name = 'poison' "
                "BEGIN SELECT RAISE(ABORT, 'poison is refused here'); END")
    run = write_run(place.journal, 30, extra={10: "poison"})

    refused = place.sync()
    assert refused.returncode == 1
    assert refused.stdout == "delivered 32 event(s)\n"  # all but the refused one
    assert "1 event(s) in the dead-letter queue" in refused.stderr
    assert place.points(run) == 30  # everything else went through ...
    assert place.status_of(run) == "COMPLETED"  # ... up to the run's end
    assert place.points(run, "poison") == 0

    listed = place.runrelay("dlq", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [letter] = json.loads(listed.stdout)
    assert (letter["run"], letter["seq"], letter["kind"], letter["attempts"]) == (run, 12, "metrics", 1)
    assert "poison is refused here" in letter["reason"]
    text = place.runrelay("dlq", "list")
    assert f"{run} seq 12 metrics" in text.stdout and "poison is refused here" in text.stdout

    still = place.runrelay("dlq", "retry", str(letter["id"]))
    assert still.returncode == 1
    assert "refused again" in still.stderr
    assert [entry["attempts"] for entry in json.loads(place.runrelay("dlq", "list", "--json").stdout)] == [2]

    place.query("DROP TRIGGER refuse_poison")  # the cause, fixed
    fixed = place.runrelay("dlq", "retry", "--all")
    assert fixed.returncode == 0, fixed.stderr
    assert fixed.stdout == "re-delivered 1 dead letter(s)\n"
    assert place.points(run, "poison") == 1
    assert place.points(run) == 30
    assert place.status_of(run) == "COMPLETED"  # the redelivery rewrote the run as it stood
    assert place.runrelay("dlq", "list").stdout == "no dead letters\n"
    assert place.sync().returncode == 0


def test_dropped_letters_are_gone(place):
    write_run(place.journal, 1)
    assert place.sync().returncode == 0
    place.query("CREATE TRIGGER refuse_poison BEFORE INSERT ON metric WHEN NEW.name = 'poison' "
                "BEGIN SELECT RAISE(ABORT, 'no'); END")
    write_run(place.journal, 5, extra={1: "poison", 3: "poison"})
    assert place.sync().returncode == 1
    assert len(json.loads(place.runrelay("dlq", "list", "--json").stdout)) == 2

    assert place.runrelay("dlq", "drop").returncode == 2  # neither ids nor --all
    assert place.runrelay("dlq", "drop", "999").returncode == 2
    dropped = place.runrelay("dlq", "drop", "--all")
    assert dropped.stdout == "dropped 2 dead letter(s)\n"
    assert place.runrelay("dlq", "list").stdout == "no dead letters\n"
    assert place.sync().returncode == 0


def test_a_corrupt_run_is_stopped_and_the_others_flow(place):
    before = write_run(place.journal, 20)
    shutil.copytree(FIXTURES / "flipped_payload_middle", place.journal, dirs_exist_ok=True)
    corrupt = Journal(FIXTURES / "flipped_payload_middle").runs()[0]
    good_records = Journal(FIXTURES / "flipped_payload_middle").verify(corrupt).records
    after = write_run(place.journal, 20)

    result = place.sync()
    assert result.returncode == 1
    assert f"run {corrupt} stopped" in result.stderr
    assert "corrupt journal" in result.stderr
    assert [place.points(before), place.points(after)] == [20, 20]
    assert place.points(corrupt) == good_records - 1  # every good event before the damage

    status = place.runrelay("status", "--json")
    assert status.returncode == 0, status.stderr
    [sink] = json.loads(status.stdout)["sinks"]
    assert list(sink["corrupt_runs"]) == [corrupt]
    assert sink["pending_events"] == 0


def test_status_shows_what_is_pending_without_a_daemon(place):
    write_run(place.journal, 9)
    write_run(place.journal, 4, end=None)
    status = place.runrelay("status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["daemon_pid"] is None
    [sink] = report["sinks"]
    assert (sink["sink"], sink["pending_events"], sink["pending_runs"], sink["dead_letters"]) == (place.url, 16, 2, 0)
    assert sink["oldest_pending_seconds"] >= 0
    assert not place.state.exists()  # looking changes nothing

    assert place.sync().returncode == 0
    text = place.runrelay("status")
    assert "pending      0 event(s) in 0 run(s)" in text.stdout
    assert "daemon   not running" in text.stdout


def test_sync_gives_up_on_an_unreachable_sink_and_says_so(place):
    run = write_run(place.journal, 3)
    result = subprocess.run(
        [sys.executable, "-m", "runrelay.daemon.cli", "sync", "--no-progress", "--journal", str(place.journal),
         "--state", str(place.state), "--sink", place.url, "--sink", "postgresql+psycopg://relay:pw@127.0.0.1:9/x"],
        capture_output=True, text=True,
        env={"RUNRELAY_HOME": str(place.root), "PATH": "/usr/bin:/bin", "RUNRELAY_RETRY_GIVE_UP_SECONDS": "1",
             "RUNRELAY_RETRY_INITIAL_SECONDS": "0.1", "RUNRELAY_RETRY_JITTER_SECONDS": "0"},
        timeout=HANG_SECONDS,
    )
    assert result.returncode == 1
    assert "postgresql://relay@127.0.0.1:9/x: unreachable, gave up" in result.stderr
    assert "pw@" not in result.stderr
    assert result.stderr.count("is failing, retrying with backoff") == 1  # one line per outage, not per attempt
    assert place.points(run) == 3  # the other sink got everything


def test_a_restart_never_reads_again_what_was_delivered(place):
    """Restart cost follows what is pending: delivered bytes are not even read.

    Damage planted in already-delivered records goes unnoticed by the next sync (a scan
    from the start would stop at it); only new events are read, from the saved position.
    """
    finished = write_run(place.journal, 50)
    live = write_run(place.journal, 50, end=None)
    assert place.sync().returncode == 0
    for run in (finished, live):
        [segment] = (place.journal / run).glob("*.seg")
        data = bytearray(segment.read_bytes())
        data[70] ^= 0x40  # inside the first record's payload
        segment.write_bytes(bytes(data))

    unchanged = place.sync()
    assert unchanged.returncode == 0, unchanged.stderr
    assert unchanged.stdout == "delivered 0 event(s)\n"
    [sink] = json.loads(place.runrelay("status", "--json").stdout)["sinks"]
    assert (sink["pending_events"], sink["corrupt_runs"]) == (0, {})


WRITE_FOREVER = """
import sys, time
from runrelay.eventlog.events import Kind
from runrelay.eventlog.writer import JournalWriter
writer = JournalWriter.create(sys.argv[1])
writer.append(Kind.STARTED, {"config": {}, "command": "main"})
step = 0
while True:
    writer.append(Kind.METRICS, {"name": "loss", "step": step, "value": 0.5, "timestamp": None})
    step += 1
    if step == 1000:
        print(writer.run, flush=True)
    if step % 100 == 0:
        time.sleep(0.001)
"""


def test_sync_ends_while_a_run_is_written_non_stop(place):
    writer = subprocess.Popen([sys.executable, "-c", WRITE_FOREVER, str(place.journal)], stdout=subprocess.PIPE,
                              text=True)
    try:
        run = writer.stdout.readline().strip()  # 1000 points are journaled
        result = place.sync(RUNRELAY_DELIVERY_BATCH_EVENTS="100")
    finally:
        writer.kill()
        writer.wait()
    assert result.returncode == 0, result.stderr
    assert place.points(run) >= 1000  # at least everything that was pending when it started


def test_a_restarted_sync_resumes_a_live_run_from_its_saved_state(place):
    """A live run's folded state is saved with its cursor: a restart goes on from there,
    without folding the run's delivered events again (damage planted in them is never read)."""
    with JournalWriter.create(place.journal) as writer:
        writer.append(Kind.STARTED, {"config": {"lr": 0.1}, "command": "main", "start_time": START})
        writer.append(Kind.HEARTBEAT, {"beat_time": START, "info": {}, "result": None, "captured_out": "hello\n"})
        for step in range(20):
            writer.append(Kind.METRICS, _point("loss", step))
        assert place.sync().returncode == 0
        [segment] = (place.journal / writer.run).glob("*.seg")
        flip_a_payload_byte(segment)
        writer.append(Kind.HEARTBEAT, {"beat_time": START, "info": {}, "result": None,
                                       "captured_out_append": "world\n"})
        for step in range(20, 30):
            writer.append(Kind.METRICS, _point("loss", step))

    resumed = place.sync()
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout == "delivered 11 event(s)\n"
    assert place.points(writer.run) == 30
    assert place.query("SELECT captured_out FROM run JOIN runrelay_run USING (run_id) WHERE uid = ?",
                       writer.run) == [("hello\nworld\n",)]


def test_a_sink_ahead_of_the_cursor_is_caught_up_from_the_saved_state(place):
    """After a kill between the sink's commit and the cursor save, the sink holds more than
    the cursor: the restart folds on from the state saved at the cursor, never from the
    run's start (damage planted before the cursor is never read, and the state is whole)."""
    with JournalWriter.create(place.journal) as writer:
        writer.append(Kind.STARTED, {"config": {"lr": 0.1}, "command": "main", "start_time": START})
        writer.append(Kind.HEARTBEAT, {"beat_time": START, "info": {}, "result": None, "captured_out": "hello\n"})
        for step in range(20):
            writer.append(Kind.METRICS, _point("loss", step))
        assert place.sync().returncode == 0
        writer.append(Kind.HEARTBEAT, {"beat_time": START, "info": {}, "result": None,
                                       "captured_out_append": "world\n"})
        for step in range(20, 30):
            writer.append(Kind.METRICS, _point("loss", step))
        writer.sync()
        sink = open_sink(place.url, Journal(place.journal))
        try:
            deliver(sink, Journal(place.journal), writer.run)  # committed; then killed before the cursor save
        finally:
            sink.close()
        [segment] = (place.journal / writer.run).glob("*.seg")
        flip_a_payload_byte(segment)
        writer.append(Kind.HEARTBEAT, {"beat_time": START, "info": {}, "result": None,
                                       "captured_out_append": "again\n"})

    resumed = place.sync()
    assert resumed.returncode == 0, resumed.stderr
    assert place.points(writer.run) == 30
    assert place.query("SELECT captured_out FROM run JOIN runrelay_run USING (run_id) WHERE uid = ?",
                       writer.run) == [("hello\nworld\nagain\n",)]


def test_a_refold_that_meets_damage_stops_the_run_instead_of_writing_a_partial_state(place):
    with JournalWriter.create(place.journal) as writer:
        writer.append(Kind.STARTED, {"config": {"lr": 0.1}, "command": "main", "start_time": START})
        writer.append(Kind.HEARTBEAT, {"beat_time": START, "info": {}, "result": None, "captured_out": "hello\n"})
        assert place.sync().returncode == 0
        shutil.rmtree(place.state)  # no cursor, no saved state: the run must be folded again
        [segment] = (place.journal / writer.run).glob("*.seg")
        flip_a_payload_byte(segment)
        writer.append(Kind.HEARTBEAT, {"beat_time": START, "info": {}, "result": None,
                                       "captured_out_append": "again\n"})

    stopped = place.sync()
    assert stopped.returncode == 1 and writer.run in stopped.stderr, stopped.stderr
    assert place.query("SELECT captured_out FROM run JOIN runrelay_run USING (run_id) WHERE uid = ?",
                       writer.run) == [("hello\n",)]  # untouched, never rewritten from half a state


def test_a_sink_that_lost_committed_events_is_refilled(place):
    """The sink is the truth: restored from an older backup, it gets its lost events again."""
    with JournalWriter.create(place.journal) as writer:
        writer.append(Kind.STARTED, {"config": {}, "command": "main", "start_time": START})
        for step in range(10):
            writer.append(Kind.METRICS, _point("loss", step))
        assert place.sync().returncode == 0
        backup = place.database.read_bytes()
        for step in range(10, 20):
            writer.append(Kind.METRICS, _point("loss", step))
        assert place.sync().returncode == 0
        place.database.write_bytes(backup)  # synced SQLite (WAL checkpointed on close): the whole database
        for leftover in place.root.glob("runs.sqlite-*"):
            leftover.unlink()
        writer.append(Kind.COMPLETED, {"stop_time": START, "result": 1.0})

    refilled = place.sync()
    assert refilled.returncode == 0, refilled.stderr
    assert "the sink lost data" in refilled.stderr
    assert place.points(writer.run) == 20
    assert place.status_of(writer.run) == "COMPLETED"


def test_malformed_events_are_dead_lettered_and_never_stop_delivery(place):
    """Journal content is untrusted: a body that does not fit its kind is refused, not a crash."""
    with JournalWriter.create(place.journal) as writer:
        writer.append(Kind.STARTED, {"config": {}, "command": "main", "host_info": ["not", "a", "dict"]})
        writer.append(Kind.METRICS, {"name": "loss", "step": [1], "value": 0.5, "timestamp": START})
        writer.append(Kind.METRICS, _point("loss", 2))
        writer.append(Kind.HEARTBEAT, {"beat_time": START, "info": {}, "captured_out_append": 42})
        writer.append(Kind.COMPLETED, {"stop_time": START, "result": 1.0})
    bad = writer.run
    good = write_run(place.journal, 5)

    first = place.sync()
    assert first.returncode == 1, first.stderr  # something was dead-lettered
    assert "Traceback" not in first.stderr
    assert place.points(good) == 5 and place.status_of(good) == "COMPLETED"
    assert place.points(bad) == 1 and place.status_of(bad) == "COMPLETED"
    letters = json.loads(place.runrelay("dlq", "list", "--json").stdout)
    assert sorted((letter["seq"], letter["kind"]) for letter in letters) == [
        (0, "started"), (1, "metrics"), (3, "heartbeat")]
    assert all("malformed body" in letter["reason"] or "not an integer" in letter["reason"] for letter in letters)
    assert place.sync().returncode == 1  # still held, nothing re-delivered twice
    assert place.points(bad) == 1


def test_a_refold_without_the_dead_letters_still_skips_a_malformed_event(place):
    """With the state directory lost (cursors and dead letters), a restart folds the run from
    the journal again: the malformed event it meets is passed over, not a crash."""
    with JournalWriter.create(place.journal) as writer:
        writer.append(Kind.STARTED, {"config": {}, "command": "main", "host_info": ["not", "a", "dict"]})
        for step in range(5):
            writer.append(Kind.METRICS, _point("loss", step))
        assert place.sync().returncode == 1  # the started event is dead-lettered
        shutil.rmtree(place.state)
        for step in range(5, 8):
            writer.append(Kind.METRICS, _point("loss", step))

    again = place.sync()
    assert "Traceback" not in again.stderr, again.stderr
    assert place.points(writer.run) == 8

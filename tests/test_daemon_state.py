"""A damaged or full state disk, and a state that grows with output: never a crash loop.

Cursors are hints (every sink knows what it applied): a damaged state.sqlite is moved aside
and rebuilt, a full state disk is waited out, and a live run's captured output is saved
once, not again with every cursor.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runrelay.eventlog.events import Kind, new_run_uid
from runrelay.eventlog.writer import JournalWriter

from test_daemon_delivery import START, Place
from test_hostile_journal import (CASE_SECONDS, corrupt_runs, daemon_delivers_and_stays, delivered_runs,
                                  no_traceback, payload, raw_run, segment, started_payload, whole_run)


@pytest.fixture
def place(tmp_path) -> Place:
    return Place(tmp_path)


# --- 9. the state ------------------------------------------------------------------------------


def test_a_damaged_state_is_moved_aside_and_rebuilt(place):
    runs = [whole_run(place.journal) for _ in range(2)]
    assert place.sync().returncode == 0
    state = place.state / "state.sqlite"
    for leftover in place.state.glob("state.sqlite-*"):
        leftover.unlink()
    state.write_bytes(b"this is not a database" * 100)
    later = whole_run(place.journal)

    result = place.sync()
    no_traceback(result)
    assert result.returncode == 0, result.stderr
    assert "damaged" in result.stderr and "moved aside" in result.stderr
    assert [delivered_runs(place).get(run) for run in [*runs, later]] == ["COMPLETED"] * 3
    assert place.query("SELECT count(*) FROM run") == [(3,)]
    assert list(place.state.glob("state.sqlite.damaged-*"))
    assert place.cursors()[later].done

    status = place.runrelay("status")
    no_traceback(status)
    assert status.returncode == 0

    (place.state / "state.sqlite").write_bytes(b"\0" * 4096 + b"garbage")
    assert corrupt_runs(place) == {}  # status reads around a damaged state (and says so on stderr)
    daemon_delivers_and_stays(place, [*runs, later, whole_run(place.journal)])


@pytest.fixture
def small_state_disk(tmp_path):
    """A 4 MiB tmpfs for the state directory (root only)."""
    mount = tmp_path / "state"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and mount(8) for a small filesystem")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb") as file:
        try:
            while True:
                file.write(b"\0" * 65536)
                file.flush()
        except OSError:
            pass
    return filler


def live_run(journal: Path, output: int) -> str:
    """A run still going: started, and a beat with ``output`` characters of captured output."""
    run = new_run_uid()
    beat = payload("heartbeat", {"beat_time": START, "info": {}, "result": None, "captured_out_append": "x" * output})
    return raw_run(journal, {0: segment(run, 0, [started_payload(), beat])}, run)


def test_a_full_state_disk_is_waited_out(place, small_state_disk):
    early = whole_run(place.journal)
    location = ["--journal", str(place.journal), "--state", str(small_state_disk), "--sink", place.url]
    env = {"RUNRELAY_HOME": str(place.root), "PATH": "/usr/bin:/bin", "RUNRELAY_DELIVERY_RESCAN_SECONDS": "0.2",
           "RUNRELAY_RETRY_MAX_SECONDS": "0.5", "RUNRELAY_RETRY_INITIAL_SECONDS": "0.1"}
    daemon = subprocess.Popen([sys.executable, "-m", "runrelay.daemon.cli", "daemon", *location],
                              stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + CASE_SECONDS
        while delivered_runs(place).get(early) != "COMPLETED" and time.monotonic() < deadline:
            time.sleep(0.1)
        filler = fill(small_state_disk)
        later = [live_run(place.journal, output=50_000) for _ in range(20)]  # 1 MB of state to save
        time.sleep(3)
        assert daemon.poll() is None, daemon.communicate()[1]
        filler.unlink()  # space is back
        deadline = time.monotonic() + CASE_SECONDS
        while time.monotonic() < deadline and not all(delivered_runs(place).get(run) == "RUNNING" for run in later):
            time.sleep(0.2)
        assert all(delivered_runs(place).get(run) == "RUNNING" for run in later)
        assert daemon.poll() is None
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, stderr = daemon.communicate(timeout=CASE_SECONDS)
    assert daemon.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    assert "state" in stderr and "full" in stderr, stderr


def test_a_full_state_disk_at_start_is_waited_out(place, small_state_disk):
    run = whole_run(place.journal)
    filler = fill(small_state_disk)
    location = ["--journal", str(place.journal), "--state", str(small_state_disk), "--sink", place.url]
    daemon = subprocess.Popen([sys.executable, "-m", "runrelay.daemon.cli", "daemon", *location],
                              stderr=subprocess.PIPE, text=True,
                              env={"RUNRELAY_HOME": str(place.root), "PATH": "/usr/bin:/bin"})
    try:
        time.sleep(3)
        assert daemon.poll() is None, daemon.communicate()[1]  # waiting, not exiting 1 in a loop
        filler.unlink()
        deadline = time.monotonic() + CASE_SECONDS
        while delivered_runs(place).get(run) != "COMPLETED" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert delivered_runs(place).get(run) == "COMPLETED"
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, stderr = daemon.communicate(timeout=CASE_SECONDS)
    assert daemon.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr


# --- 11. the state does not grow with captured output -----------------------------------------


def state_bytes(state: Path) -> int:
    return sum(path.stat().st_size for path in state.rglob("*") if path.is_file())


def test_the_state_does_not_copy_captured_output_at_every_save(place):
    """A live run's cursor saves its folded state; the output in it is saved once, not per beat."""
    beats, chunk = 40, "x" * 199 + "\n"
    with JournalWriter.create(place.journal) as writer:
        writer.append(Kind.STARTED, {"config": {}, "command": "main", "start_time": START})
        for beat in range(beats):
            writer.append(Kind.HEARTBEAT, {"beat_time": START, "info": {}, "result": None,
                                           "captured_out_append": chunk * 1000})  # 200 kB a beat, 8 MB in all
    result = place.sync(RUNRELAY_DELIVERY_BATCH_EVENTS="1")
    assert result.returncode == 0, result.stderr
    output = beats * len(chunk) * 1000
    assert state_bytes(place.state) < 1.5 * output + 1_000_000, state_bytes(place.state)

    # and a restart still resumes from the saved state, output included
    with JournalWriter.resume(place.journal, writer.run) as again:
        again.append(Kind.HEARTBEAT, {"beat_time": START, "info": {}, "result": None, "captured_out_append": "end\n"})
        again.append(Kind.COMPLETED, {"stop_time": START, "result": 1.0})
    assert place.sync().returncode == 0
    [(stored,)] = place.query("SELECT captured_out FROM run")
    assert len(stored) == output + 4 and stored.endswith("x\nend\n")

"""Hostile journals and a hostile state: one run's problem is that run's alone.

Every journal byte and file is untrusted. Whatever a run directory holds (unreadable
files, FIFOs, directories or symlinks where segments belong, a missing first segment,
seqs beyond SQLite's integers, nesting beyond the encoder, records of a newer writer),
``runrelay sync``, ``status``, ``journal verify`` and the daemon report that run and deliver
the others: never a traceback, never a hang, never a crash loop, never a read outside the
journal. A damaged or full state disk is waited out or rebuilt, never a crash loop.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runrelay.eventlog import codec
from runrelay.eventlog.events import Kind, new_run_uid
from runrelay.eventlog.format import encode_record, encode_segment_header, segment_name
from runrelay.eventlog.reader import Journal
from runrelay.eventlog.writer import JournalWriter

from test_daemon_delivery import START, Place, write_run

CASE_SECONDS = 60  # one command on a hostile journal taking longer than this is hung


# --- crafting raw journals --------------------------------------------------------------------


def payload(kind: str, body: dict, micros: int = 1_700_000_000_000_000) -> bytes:
    return codec.encode([kind, micros, body])


def segment(run: str, first: int, payloads: list[bytes]) -> bytes:
    return encode_segment_header(run, first) + b"".join(
        encode_record(first + index, data) for index, data in enumerate(payloads))


def started_payload(config: dict | None = None) -> bytes:
    return payload("started", {"config": config or {"lr": 0.1}, "command": "main", "start_time": START})


def completed_payload() -> bytes:
    return payload("completed", {"stop_time": START, "result": 1.0})


def metric_payload(step: int) -> bytes:
    return payload("metrics", {"name": "loss", "step": step, "value": 0.5, "timestamp": START})


def raw_run(journal: Path, segments: dict[int, bytes], run: str | None = None) -> str:
    """A run directory holding exactly these segment files (first seq -> file bytes)."""
    run = run or new_run_uid()
    run_dir = journal / run
    run_dir.mkdir(parents=True, mode=0o700)
    for first, data in segments.items():
        (run_dir / segment_name(first)).write_bytes(data)
    return run


def whole_run(journal: Path, run: str | None = None) -> str:
    """started, two points, completed, in one raw segment."""
    run = run or new_run_uid()
    return raw_run(journal, {0: segment(run, 0, [started_payload(), metric_payload(0), metric_payload(1),
                                                  completed_payload()])}, run)


def no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout, result.stdout


def corrupt_runs(place: Place, **env: str) -> dict[str, str]:
    status = place.runrelay("status", "--json", **env)
    no_traceback(status)
    assert status.returncode == 0, status.stderr
    [sink] = json.loads(status.stdout)["sinks"]
    return sink["corrupt_runs"]


def delivered_runs(place: Place) -> dict[str, str]:
    try:
        return dict(place.query("SELECT uid, status FROM run JOIN runrelay_run USING (run_id)"))
    except sqlite3.OperationalError:  # no database, or its tables not made yet
        return {}


def check_isolated(place: Place, good: list[str], bad: list[str], **env: str) -> subprocess.CompletedProcess:
    """sync delivers every good run and stops each bad one; status, verify and ls name the bad ones."""
    result = place.sync(**env)
    no_traceback(result)
    assert result.returncode == 1, result.stderr
    for run in bad:
        assert f"run {run} stopped" in result.stderr, result.stderr
    assert all(delivered_runs(place).get(run) == "COMPLETED" for run in good), (delivered_runs(place), result.stderr)
    assert sorted(corrupt_runs(place, **env)) == sorted(bad)
    verify = journal_command(place, "verify", **env)
    no_traceback(verify)
    assert verify.returncode == 1
    for run in bad:
        assert f"{run}  CORRUPT" in verify.stdout or f"{run}  UNREADABLE" in verify.stdout, verify.stdout
    listed = journal_command(place, "ls", **env)
    no_traceback(listed)
    assert listed.returncode == 0
    return result


def journal_command(place: Place, *args: str, **env: str) -> subprocess.CompletedProcess:
    """``runrelay journal ARGS`` on the place's journal, as the place runs commands."""
    return subprocess.run(
        [*getattr(place, "prefix", []), sys.executable, "-m", "runrelay.daemon.cli", "journal", *args, "--journal",
         str(place.journal)], capture_output=True, text=True, timeout=CASE_SECONDS,
        env={"RUNRELAY_HOME": str(place.root), "PATH": "/usr/bin:/bin", **env})


def daemon_delivers_and_stays(place: Place, good: list[str], **env) -> str:
    """The daemon delivers the good runs, keeps running, and stops cleanly on SIGTERM."""
    command = env.pop("_command", [])
    location = ["--journal", str(place.journal), "--state", str(place.state), "--sink", place.url]
    daemon = subprocess.Popen(
        [*command, sys.executable, "-m", "runrelay.daemon.cli", "daemon", *location], stderr=subprocess.PIPE,
        text=True, env={"RUNRELAY_HOME": str(place.root), "PATH": "/usr/bin:/bin",
                        "RUNRELAY_DELIVERY_RESCAN_SECONDS": "0.2", **env})
    try:
        deadline = time.monotonic() + CASE_SECONDS
        while time.monotonic() < deadline and daemon.poll() is None:
            if all(delivered_runs(place).get(run) == "COMPLETED" for run in good):
                break
            time.sleep(0.1)
        time.sleep(0.5)  # a crash right after delivering shows here
        assert daemon.poll() is None, daemon.communicate()[1]
        assert all(delivered_runs(place).get(run) == "COMPLETED" for run in good)
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, stderr = daemon.communicate(timeout=CASE_SECONDS)
    assert daemon.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    return stderr


@pytest.fixture
def place(tmp_path) -> Place:
    return Place(tmp_path)


# --- 1. an unreadable run ---------------------------------------------------------------------

OTHER_USER = 12345
# As root, drop only the power to read other users' files: the daemon then meets another
# user's 0700 run as an unprivileged daemon meets root's.
UNPRIVILEGED = (["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                 "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else [])


class Unprivileged(Place):
    """Every command runs unable to read other users' files."""

    prefix = UNPRIVILEGED

    def runrelay(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        location = ["--journal", str(self.journal), "--state", str(self.state), "--sink", self.url]
        return subprocess.run(
            [*UNPRIVILEGED, sys.executable, "-m", "runrelay.daemon.cli", *args, *location], capture_output=True,
            text=True, env={"RUNRELAY_HOME": str(self.root), "PATH": "/usr/bin:/bin", **env}, timeout=CASE_SECONDS)


def test_an_unreadable_run_is_reported_and_the_others_are_delivered(tmp_path):
    """Another user wrote a run into a shared journal (0700, as every run): the daemon cannot read it."""
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("as root, needs setpriv(1) to drop CAP_DAC_OVERRIDE")
    place = Unprivileged(tmp_path)
    good = [write_run(place.journal, 3) for _ in range(2)]
    bad = write_run(place.journal, 3)
    unreadable_segment = write_run(place.journal, 3)
    [seg] = (place.journal / unreadable_segment).glob("*.seg")
    if os.geteuid() == 0:
        for path in [place.journal / bad, *(place.journal / bad).iterdir(), seg]:
            os.chown(path, OTHER_USER, OTHER_USER)
    else:
        os.chmod(place.journal / bad, 0)
        os.chmod(seg, 0)
    try:
        result = check_isolated(place, good, [bad, unreadable_segment])
        assert "Permission denied" in result.stderr
        stderr = daemon_delivers_and_stays(place, good, _command=UNPRIVILEGED)
        assert f"run {bad}" in stderr and "Permission denied" in stderr
    finally:
        os.chmod(place.journal / bad, 0o700)


# --- 5. journal content that used to crash the daemon -----------------------------------------


def nested_started(depth: int) -> bytes:
    """A started payload whose config nests ``depth`` maps deep: MessagePack by hand, as no
    writer makes it (the encoder stops at 511 levels; the decoder reads up to 1024)."""
    config = b"\x01"
    for _ in range(depth):
        config = b"\x81\xa1d" + config
    body = b"\x82" + codec.encode("config") + config + codec.encode("command") + codec.encode("main")
    return b"\x93" + codec.encode("started") + codec.encode(1_700_000_000_000_000) + body


@pytest.mark.parametrize("depth", [1000, 2000])
def test_config_nested_deeper_than_sinks_recurse_is_that_runs_corruption(place, depth):
    good = [whole_run(place.journal)]
    deep = new_run_uid()
    raw_run(place.journal, {0: segment(deep, 0, [nested_started(depth), metric_payload(0)])}, deep)
    good.append(whole_run(place.journal))
    result = check_isolated(place, good, [deep])
    assert "nested" in result.stderr or "undecodable" in result.stderr
    daemon_delivers_and_stays(place, good)


def test_a_seq_beyond_sqlites_integers_is_corruption(place):
    good = [whole_run(place.journal)]
    huge = new_run_uid()
    first = 2**63
    raw_run(place.journal, {first: segment(huge, first, [started_payload(), completed_payload()])}, huge)
    empty_then_huge = new_run_uid()
    raw_run(place.journal, {0: segment(empty_then_huge, 0, []),
                            first: segment(empty_then_huge, first, [started_payload(), completed_payload()])},
            empty_then_huge)
    good.append(whole_run(place.journal))
    check_isolated(place, good, [huge, empty_then_huge])
    daemon_delivers_and_stays(place, good)


def test_a_directory_at_the_next_segments_name_is_corruption(place):
    good = [whole_run(place.journal)]
    bad = new_run_uid()
    raw_run(place.journal, {0: segment(bad, 0, [started_payload(), metric_payload(0)])}, bad)
    (place.journal / bad / segment_name(2)).mkdir()
    good.append(whole_run(place.journal))
    check_isolated(place, good, [bad])
    assert place.points(bad) == 1  # the good events before the damage
    daemon_delivers_and_stays(place, good)


# --- 6. non-regular files and symlinks --------------------------------------------------------


def test_a_fifo_named_like_a_segment_hangs_nothing(place):
    good = [whole_run(place.journal)]
    first_is_fifo = raw_run(place.journal, {})
    os.mkfifo(place.journal / first_is_fifo / segment_name(0))
    next_is_fifo = new_run_uid()
    raw_run(place.journal, {0: segment(next_is_fifo, 0, [started_payload()])}, next_is_fifo)
    os.mkfifo(place.journal / next_is_fifo / segment_name(1))
    good.append(whole_run(place.journal))
    check_isolated(place, good, [first_is_fifo, next_is_fifo])
    daemon_delivers_and_stays(place, good)


def test_symlinks_out_of_the_journal_are_never_followed(place, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    good = [whole_run(place.journal)]
    linked_segment = new_run_uid()
    (outside / "segment").write_bytes(segment(linked_segment, 0, [started_payload(), completed_payload()]))
    raw_run(place.journal, {}, linked_segment)
    (place.journal / linked_segment / segment_name(0)).symlink_to(outside / "segment")
    linked_run = whole_run(outside)  # a whole run, reached through a symlinked run directory
    (place.journal / linked_run).symlink_to(outside / linked_run)
    stray_file = new_run_uid()
    (place.journal / stray_file).write_bytes(b"not a run")
    check_isolated(place, good, [linked_segment, linked_run, stray_file])
    assert linked_segment not in delivered_runs(place) and linked_run not in delivered_runs(place)


# --- 7. blobs ---------------------------------------------------------------------------------


def run_with_artifact(journal: Path, files: Path) -> tuple[str, Path]:
    model = files / "model.bin"
    model.write_bytes(b"weights" * 100)
    with JournalWriter.create(journal) as writer:
        writer.append(Kind.STARTED, {"config": {}, "command": "main", "start_time": START})
        writer.append(Kind.ARTIFACT, {"name": "model.bin", "filename": str(model), **writer.store_file(model),
                                      "metadata": None, "content_type": None})
        writer.append(Kind.COMPLETED, {"stop_time": START, "result": 1.0})
    [blob] = (journal / writer.run / "blobs").iterdir()
    return writer.run, blob


def test_open_blob_checks_the_digest_and_refuses_symlinks(place, tmp_path):
    journal = Journal(place.journal)
    flipped, flipped_blob = run_with_artifact(place.journal, tmp_path)
    data = bytearray(flipped_blob.read_bytes())
    data[3] ^= 1
    flipped_blob.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged"):
        journal.open_blob(flipped, flipped_blob.name)

    linked, linked_blob = run_with_artifact(place.journal, tmp_path)
    secret = tmp_path / "secret"
    secret.write_bytes(linked_blob.read_bytes())  # even bytes that match the digest
    linked_blob.unlink()
    linked_blob.symlink_to(secret)
    with pytest.raises(ValueError, match="symlink|not a regular file"):  # permanent for the event, not retried
        journal.open_blob(linked, linked_blob.name)

    linked_dir, blob = run_with_artifact(place.journal, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(blob.parent, elsewhere)
    blob.parent.symlink_to(elsewhere)  # the whole blob store, out of the run's directory
    with pytest.raises(ValueError):
        journal.open_blob(linked_dir, blob.name)


def test_verify_checks_blobs_and_sync_never_retries_a_refused_one(place, tmp_path):
    ok, _ = run_with_artifact(place.journal, tmp_path)
    flipped, flipped_blob = run_with_artifact(place.journal, tmp_path)
    flipped_blob.write_bytes(b"X" + flipped_blob.read_bytes()[1:])
    linked, linked_blob = run_with_artifact(place.journal, tmp_path)
    linked_blob.unlink()
    linked_blob.symlink_to("/etc/passwd")
    missing, missing_blob = run_with_artifact(place.journal, tmp_path)
    missing_blob.unlink()

    verify = journal_command(place, "verify")
    no_traceback(verify)
    assert verify.returncode == 1, verify.stdout
    lines = {line.split()[0]: line for line in verify.stdout.splitlines()}
    assert "CORRUPT" not in lines[ok]
    assert "damaged" in lines[flipped] and "symlink" in lines[linked] and "missing" in lines[missing], verify.stdout

    result = place.sync(RUNRELAY_RETRY_GIVE_UP_SECONDS="5")
    no_traceback(result)
    assert "gave up" not in result.stderr  # refused for good (dead-lettered), not retried as an outage
    assert place.status_of(ok) == "COMPLETED"
    letters = json.loads(place.runrelay("dlq", "list", "--json").stdout)
    assert sorted(letter["run"] for letter in letters) == sorted([flipped, linked, missing])
    assert "root:" not in place.database.read_bytes().decode("latin-1")


# --- 8. a run must start at seq 0 -------------------------------------------------------------


def test_a_missing_first_segment_is_corruption(place):
    good = [whole_run(place.journal)]
    headless = new_run_uid()
    raw_run(place.journal, {2: segment(headless, 2, [metric_payload(0), completed_payload()])}, headless)
    gap = new_run_uid()
    raw_run(place.journal, {0: segment(gap, 0, [started_payload()]),
                            5: segment(gap, 5, [completed_payload()])}, gap)
    check_isolated(place, good, [headless, gap])
    assert headless not in delivered_runs(place)  # never a run with no started event, COMPLETED
    assert delivered_runs(place)[gap] == "RUNNING"


# --- 10. a record from a newer writer ---------------------------------------------------------


def test_an_undecodable_first_record_is_that_runs_corruption(place):
    good = [whole_run(place.journal)]
    newer = new_run_uid()
    raw_run(place.journal, {0: segment(newer, 0, [payload("teleported", {}), completed_payload()])}, newer)
    garbage = new_run_uid()
    raw_run(place.journal, {0: segment(garbage, 0, [b"\xc1\xc1\xc1", completed_payload()])}, garbage)
    check_isolated(place, good, [newer, garbage])
    daemon_delivers_and_stays(place, good)

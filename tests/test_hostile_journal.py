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
import socket
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
    ready = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ready.bind(str(place.root / f"notify-{time.monotonic_ns()}.sock"))
    ready.settimeout(CASE_SECONDS)
    daemon = subprocess.Popen(
        [*command, sys.executable, "-m", "runrelay.daemon.cli", "daemon", *location], stderr=subprocess.PIPE,
        text=True, env={"RUNRELAY_HOME": str(place.root), "PATH": "/usr/bin:/bin", "NOTIFY_SOCKET": ready.getsockname(),
                        "RUNRELAY_DELIVERY_RESCAN_SECONDS": "0.2", **env})
    try:
        with ready:  # from READY=1 on, SIGTERM is a clean stop (before it, the process may still be importing)
            assert ready.recv(4096).startswith(b"READY=1"), "the daemon never said READY=1"
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


# --- the acceptance: a generated hostile journal beside healthy runs ---------------------------

HOSTILE_CASES = int(os.environ.get("RUNRELAY_HOSTILE_CASES", "1000"))
BAIT = "BAIT-7f3c"  # in every file outside the journal a symlink points to: never in the sink or the state
ODD_NAMES = ["x", ".seg", "0.seg", "0000000000000000000.seg", "000000000000000000000.seg", "00000000000000000001.seg.tmp",
             "0000000000000000000a.seg", ".tmp-123-abc", "writer.lock.x", " ", "-", "\udcff.seg", "blobs.old", "\n"]


class Case:
    """One generated run and what must become of it: ``named`` by status (its damage), or not."""

    def __init__(self, run: str, kind: str, named: bool, letters: bool = False):
        self.run, self.kind, self.named, self.letters = run, kind, named, letters


def _records(rng, run_count: int) -> list[bytes]:
    payloads = [started_payload({"n": run_count, "nested": {"list": [1, 2.5, None], "flag": True}})]
    payloads += [metric_payload(step) for step in range(rng.randint(2, 8))]
    return payloads + [completed_payload()]


def _split(run: str, payloads: list[bytes], parts: int) -> dict[int, bytes]:
    """The run's records in ``parts`` segments (at least one record each)."""
    cuts = sorted({0, *range(1, len(payloads))[: parts - 1]})
    bounds = [*cuts, len(payloads)]
    return {first: segment(run, first, payloads[first:end]) for first, end in zip(bounds, bounds[1:])}


def _last_record_start(data: bytes, count: int) -> int:
    """Where the last of ``count`` records of a segment starts."""
    offset = 40
    for _ in range(count - 1):
        offset += 20 + int.from_bytes(data[offset:offset + 4], "big")
    return offset


def _odd_names(rng, run_dir: Path) -> None:
    """Junk the reader must pass over: odd names beside a healthy run's segments."""
    for name in rng.sample(ODD_NAMES, rng.randint(0, 3)):
        path = run_dir / name
        choice = rng.random()
        try:
            if choice < 0.4:
                path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(0, 64))))
            elif choice < 0.6:
                os.mkfifo(path)
            elif choice < 0.8:
                path.mkdir()
            else:
                path.symlink_to("/etc/passwd")
        except (FileExistsError, ValueError, OSError):
            pass


def make_case(rng, journal: Path, outside: Path, index: int) -> Case:
    """One damaged (or torn) run, its damage chosen by ``rng``."""
    run = new_run_uid()
    payloads = _records(rng, index)
    kinds = ["flip", "truncate_old", "missing_first", "missing_middle", "fifo", "directory", "symlink_segment",
             "symlink_run", "stray_entry", "unknown_kind", "garbage", "nested", "seq_beyond", "empty_first",
             "other_run", "seq_mismatch", "torn", "malformed", "blob", "chmod"]
    if os.geteuid() == 0:
        kinds.remove("chmod")  # root reads it anyway (the unprivileged case has its own test)
    kind = rng.choice(kinds)
    parts = rng.randint(2, 3)
    if kind == "flip":  # bit flips anywhere but the newest segment's last payload (that is a torn tail)
        segments = _split(run, payloads, parts)
        firsts = sorted(segments)
        first = rng.choice(firsts)
        data = bytearray(segments[first])
        count = (firsts + [len(payloads)])[firsts.index(first) + 1] - first
        limit = _last_record_start(bytes(data), count) + 20 if first == firsts[-1] else len(data)
        for position, bit in {(rng.randrange(limit), rng.randrange(8)) for _ in range(rng.randint(1, 3))}:
            data[position] ^= 1 << bit
        segments[first] = bytes(data)
        return Case(raw_run(journal, segments, run), kind, named=True)
    if kind == "truncate_old":
        segments = _split(run, payloads, parts)
        first = sorted(segments)[0]
        segments[first] = segments[first][: rng.randrange(1, len(segments[first]))]
        return Case(raw_run(journal, segments, run), kind, named=True)
    if kind in ("missing_first", "missing_middle"):
        segments = _split(run, payloads, 3)
        del segments[sorted(segments)[0 if kind == "missing_first" else 1]]
        return Case(raw_run(journal, segments, run), kind, named=True)
    if kind in ("fifo", "directory"):
        target = rng.choice([*range(parts), len(payloads) - 1])  # in place of a segment, or at the next name
        if target == len(payloads) - 1:  # of a live run (a delivered ending is never read again)
            payloads = payloads[:-1]
        segments = _split(run, payloads, parts)
        segments.pop(target, None)
        raw_run(journal, segments, run)
        path = journal / run / segment_name(target)
        os.mkfifo(path) if kind == "fifo" else path.mkdir()
        return Case(run, kind, named=True)
    if kind == "symlink_segment":
        segments = _split(run, payloads, parts)
        target = rng.choice(sorted(segments))
        bait = outside / f"{run}-{target}"  # good records, that would put BAIT into the sink if read
        bait_payloads = [payload("metrics", {"name": BAIT, "step": seq, "value": 1.0, "timestamp": START})
                         if seq else started_payload({"bait": BAIT}) for seq in range(len(payloads))]
        bait.write_bytes(_split(run, bait_payloads, parts)[target])
        del segments[target]
        raw_run(journal, segments, run)
        (journal / run / segment_name(target)).symlink_to(bait)
        return Case(run, kind, named=True)
    if kind == "symlink_run":
        raw_run(outside, _split(run, [started_payload({"bait": BAIT}), completed_payload()], 1), run)
        (journal / run).symlink_to(outside / run)
        return Case(run, kind, named=True)
    if kind == "stray_entry":
        path = journal / run
        choice = rng.randrange(3)
        if choice == 0:
            path.write_bytes(b"not a run")
        elif choice == 1:
            os.mkfifo(path)
        else:
            path.symlink_to(outside / "nowhere")
        return Case(run, kind, named=True)
    if kind in ("unknown_kind", "garbage", "nested", "malformed"):
        where = rng.randrange(len(payloads))
        payloads[where] = {"unknown_kind": payload("teleported", {"to": "mars"}), "garbage": b"\xc1" * rng.randint(1, 9),
                           "nested": nested_started(rng.randint(401, 1200)),
                           "malformed": payload("metrics", {"name": "loss", "step": [1], "value": "x"})}[kind]
        return Case(raw_run(journal, _split(run, payloads, parts), run), kind, named=kind != "malformed",
                    letters=kind == "malformed")
    if kind == "seq_beyond":
        segments = _split(run, payloads, parts)
        beyond = rng.choice([2**63 - 1, 2**63, 2**64 - 1, 10**20 - 1])
        segments[beyond] = segment(run, beyond % 2**64, [completed_payload()]) if beyond < 2**64 else b"x"
        return Case(raw_run(journal, segments, run), kind, named=True)
    if kind == "empty_first":
        segments = {0: segment(run, 0, []), 5: segment(run, 5, payloads[:3])}
        return Case(raw_run(journal, segments, run), kind, named=True)
    if kind == "other_run":
        segments = _split(run, payloads, parts)
        target = rng.choice(sorted(segments))
        segments[target] = segment(new_run_uid(), target, payloads[target:target + 1])
        return Case(raw_run(journal, segments, run), kind, named=True)
    if kind == "seq_mismatch":
        payloads_seqs = list(range(len(payloads)))
        where = rng.randrange(1, len(payloads))
        payloads_seqs[where] += rng.choice([-1, 1, 2, 1000])
        data = encode_segment_header(run, 0) + b"".join(encode_record(seq, body) for seq, body
                                                          in zip(payloads_seqs, payloads))
        return Case(raw_run(journal, {0: data}, run), kind, named=True)
    if kind == "torn":  # a crashed writer's end: normal, never named; the records before it delivered
        segments = _split(run, payloads, parts)
        last = max(segments)
        segments[last] = segments[last][: rng.randrange(1, len(segments[last]))]
        return Case(raw_run(journal, segments, run), kind, named=False)
    if kind == "blob":  # a damaged, odd or outward blob: the artifact is dead-lettered, the run delivered
        blob_digest = "ab" * 32
        artifact = payload("artifact", {"name": "model.bin", "filename": "model.bin", "digest": blob_digest,
                                        "md5": "cd" * 16, "size": 5, "metadata": None, "content_type": None})
        raw_run(journal, _split(run, [*payloads[:-1], artifact, payloads[-1]], parts), run)
        blobs = journal / run / "blobs"
        choice = rng.randrange(4)
        if choice == 3:
            (outside / f"{run}-blobs").mkdir()
            (outside / f"{run}-blobs" / blob_digest).write_text(BAIT)
            blobs.symlink_to(outside / f"{run}-blobs")
        else:
            blobs.mkdir()
            if choice == 0:
                (blobs / blob_digest).write_text(BAIT)  # bytes with another digest
            elif choice == 1:
                os.mkfifo(blobs / blob_digest)
            else:
                (outside / f"{run}-blob").write_text(BAIT)
                (blobs / blob_digest).symlink_to(outside / f"{run}-blob")
        return Case(run, kind, named=False, letters=True)
    assert kind == "chmod"
    raw_run(journal, _split(run, payloads, parts), run)
    os.chmod(journal / run / segment_name(rng.choice([0, 1])) if rng.random() < 0.5 else journal / run, 0)
    return Case(run, kind, named=True)


def healthy_run(rng, journal: Path, files: Path) -> tuple[str, dict, int]:
    """A run by the real writer (several segments, an artifact, odd names beside); its config and points."""
    config = {"lr": rng.random(), "layers": [rng.randint(1, 64) for _ in range(3)], "name": f"run {rng.random()}"}
    points = rng.randint(0, 300)
    model = files / f"model-{rng.random()}.bin"
    model.write_bytes(os.urandom(rng.randint(0, 4096)))
    with JournalWriter.create(journal, segment_bytes=rng.choice([1024, 4096, 1 << 20])) as writer:
        writer.append(Kind.STARTED, {"config": config, "command": "main", "start_time": START})
        for step in range(points):
            writer.append(Kind.METRICS, {"name": "loss", "step": step, "value": rng.random(), "timestamp": START})
        writer.append(Kind.ARTIFACT, {"name": "model.bin", "filename": str(model), **writer.store_file(model),
                                      "metadata": None, "content_type": None})
        writer.append(Kind.COMPLETED, {"stop_time": START, "result": 1.0})
    _odd_names(rng, journal / writer.run)
    return writer.run, config, points


def reader_survives(journal: Journal, run: str) -> None:
    """Every read of one run ends, within a bound, in events or JournalCorrupt / UnknownRun."""
    def hung(signum, frame):
        raise TimeoutError(f"reading run {run} hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        journal.verify(run, blobs=True)
        journal.count(run, decode=True)
        journal.read_batch(run, 0, 1000)
        journal.bytes_after(run, journal.read_batch(run, 0, 1000).end)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _hostile_journal(place: Place, tmp_path: Path, cases: int, seed: int) -> None:
    import random

    rng = random.Random(seed)
    outside = tmp_path / "outside"
    outside.mkdir()
    files = tmp_path / "files"
    files.mkdir()
    os.mkfifo(outside / "nowhere")  # a symlink followed there would hang
    generated = [make_case(rng, place.journal, outside, index) for index in range(cases)]
    healthy = [healthy_run(rng, place.journal, files) for _ in range(max(20, cases // 20))]
    for name in rng.sample(ODD_NAMES, 5):  # junk at the top too
        try:
            (place.journal / name).write_bytes(b"junk")
        except (OSError, ValueError):
            pass

    journal = Journal(place.journal)
    started = time.monotonic()
    for run in journal.runs():
        reader_survives(journal, run)
    reading = time.monotonic() - started

    bound = {"timeout": CASE_SECONDS + 0.2 * cases}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "runrelay.daemon.cli", "sync", "--no-progress", "--journal", str(place.journal),
         "--state", str(place.state), "--sink", place.url], capture_output=True, text=True,
        env={"RUNRELAY_HOME": str(place.root), "PATH": "/usr/bin:/bin"}, **bound)
    syncing = time.monotonic() - started
    no_traceback(result)
    assert result.returncode == 1, result.stderr[-3000:]  # corrupt runs and dead letters are left undelivered

    with sqlite3.connect(place.database) as db:
        stored = {uid: (status, config and json.loads(config)) for uid, status, config in db.execute(
            "SELECT uid, status, config FROM run JOIN runrelay_run USING (run_id)")}
        points = dict(db.execute("SELECT uid, count(*) FROM metric JOIN runrelay_run USING (run_id) GROUP BY uid"))
        artifacts = {uid for (uid,) in db.execute(
            "SELECT DISTINCT uid FROM artifact JOIN runrelay_run USING (run_id)")}
    for run, config, count in healthy:  # exactly as journaled
        assert stored[run] == ("COMPLETED", config), run
        assert points.get(run, 0) == count, run
        assert run in artifacts
    for case in generated:  # each damaged run: its good records, never more
        good = _good_points(journal, case.run)
        assert points.get(case.run, 0) == good, (case.kind, case.run, result.stderr[-2000:])

    status = place.runrelay("status", "--json")
    no_traceback(status)
    [sink] = json.loads(status.stdout)["sinks"]
    named = set(sink["corrupt_runs"])
    for case in generated:
        assert (case.run in named) == case.named, (case.kind, case.run, sink["corrupt_runs"].get(case.run))
    assert not named & {run for run, _, _ in healthy}
    letters = {letter["run"] for letter in json.loads(place.runrelay("dlq", "list", "--json").stdout)}
    assert {case.run for case in generated if case.letters} <= letters
    assert not letters & {run for run, _, _ in healthy}

    for path in [place.database, *place.state.rglob("*")]:  # nothing from outside the journal was read
        if path.is_file():
            assert BAIT.encode() not in path.read_bytes(), path
    print(f"{cases} hostile runs and {len(healthy)} healthy ones: read in {reading:.1f} s, synced in "
          f"{syncing:.1f} s; kinds {sorted({case.kind for case in generated})}")


def _good_points(journal: Journal, run: str) -> int:
    """How many well-formed metric points the reader yields before any damage."""
    from runrelay.eventlog.errors import JournalCorrupt, UnknownRun

    batch_points = 0
    try:
        batch = journal.read_batch(run, 0, 1_000_000)
    except UnknownRun:
        return 0
    batch_points = len(batch.points)
    assert batch.corrupt is None or isinstance(batch.corrupt, JournalCorrupt)
    return batch_points


def test_a_hostile_journal_never_stops_delivery(place, tmp_path):
    """≥ 1,000 generated runs, each with one kind of damage or hostile value, beside healthy
    runs (seeded: RUNRELAY_HOSTILE_SEED; RUNRELAY_HOSTILE_CASES for more)."""
    _hostile_journal(place, tmp_path, HOSTILE_CASES, int(os.environ.get("RUNRELAY_HOSTILE_SEED", "8")))


@pytest.mark.slow
def test_a_large_hostile_journal_never_stops_delivery(place, tmp_path):
    _hostile_journal(place, tmp_path, 10 * HOSTILE_CASES, 88)

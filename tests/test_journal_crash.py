"""kill -9 of real writer processes at many random points: every append that returned survives.

Each child appends a deterministic mix of metrics, heartbeats (some large, so a kill can
land inside a write) and lifecycle events across small segments, reporting each seq on
a pipe once ``append`` has returned. The parent kills it at a random moment, then reads.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from runrelay.eventlog import Journal, JournalWriter, Kind

KILLS = 200
CHILD = r"""
import os, sys
sys.path.insert(0, os.environ["TESTS_DIR"])
from test_journal_crash import expected_event
from runrelay.eventlog import JournalWriter
writer = JournalWriter.create(sys.argv[1], segment_bytes=64 * 1024)
os.write(1, (writer.run + "\n").encode())
while True:
    seq = writer.next_seq
    kind, body = expected_event(seq)
    assert writer.append(kind, body) == seq
    os.write(1, b"%d\n" % seq)
"""


def expected_event(seq: int) -> tuple[Kind, dict]:
    """The event a child appends at ``seq``: the parent recomputes it to check every byte."""
    rng = random.Random(seq)
    roll = rng.random()
    if roll < 0.02:
        return Kind.HEARTBEAT, {"seq": seq, "captured_out": "o" * rng.randrange(100_000, 400_000)}
    if roll < 0.10:
        return Kind.ARTIFACT, {"seq": seq, "name": f"a{seq}", "digest": "0" * 64}
    return Kind.METRICS, {"seq": seq, "name": "loss", "step": seq, "value": rng.random(), "pad": "p" * rng.randrange(200)}


def _crash_once(journal_dir, seed: int, tests_dir: str) -> tuple[str, list[int]]:
    rng = random.Random(seed)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(journal_dir)],
        stdout=subprocess.PIPE,
        env={"TESTS_DIR": tests_dir, "PATH": "/usr/bin:/bin"},
    )
    run = child.stdout.readline().decode().strip()
    time.sleep(rng.uniform(0, 0.05))
    child.send_signal(signal.SIGKILL)
    reported = [int(line) for line in child.stdout.read().split()]
    child.wait()
    return run, reported


def test_every_returned_append_survives_kill_9(journal_dir, request):
    tests_dir = str(request.path.parent)
    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = list(pool.map(lambda seed: _crash_once(journal_dir, seed, tests_dir), range(KILLS)))
    journal = Journal(journal_dir)
    torn = 0
    for run, reported in outcomes:
        assert reported == list(range(len(reported))), "child reported out of order"
        check = journal.verify(run)
        assert check.ok, check.corrupt
        torn += check.torn is not None
        events = list(journal.events(run))
        assert [e.seq for e in events] == list(range(len(events))), "gap or duplicate"
        assert len(events) >= len(reported), f"lost {len(reported) - len(events)} returned appends"
        assert len(events) <= len(reported) + 1  # at most the append in flight at the kill
        for event in events:
            kind, body = expected_event(event.seq)
            assert (event.kind, event.body) == (kind, body), f"damaged event {event.seq}"
        # The run can be resumed after the crash, as the watchdog does to record a verdict.
        with JournalWriter.resume(journal_dir, run) as writer:
            assert writer.append(Kind.DIED, {"reason": "killed"}) == len(events)
        assert journal.verify(run).ok
    appended = sum(len(reported) for _, reported in outcomes)
    print(f"{KILLS} kills, {appended} returned appends all found, {torn} torn tails")
    assert appended > KILLS  # the children really ran

"""A bucket server killed mid-stream and restarted: the daemon waits and resumes without
exiting, the file:// sink beside it keeps flowing, and nothing is lost or doubled.

A real `runrelay daemon` delivers a journal backlog plus live runs to an s3:// (moto) or
gs:// (fake-gcs-server) sink and a file:// sink. Mid-stream the bucket server is SIGKILLed;
a run journaled during the outage must reach the directory while the server is down. Then
the server is started again. fake-gcs-server keeps its objects, so afterwards both sinks
must equal the journal run by run. moto keeps nothing across a restart (its bucket is made
again, empty): there the run journaled during the outage and every run written after the
restart must be exact, and no run may have two directories.
"""

from __future__ import annotations

import json
import random
import subprocess
import time

import pytest

from runrelay.eventlog.reader import Journal
from test_filestorage import base  # noqa: F401 - the fixture: a fresh base on each store
from test_filestorage_crash import ONLY_FULL, assert_files_match_journal, books
from test_replay_crash import Experiment, Producer, delivery_args, runrelay_env, tail, write_journal
from test_replay_outage import RETRY, stop, wait_for
from test_sink_contract import directory_read_back

SEED = 11
RUNS = 8
POINTS_PER_RUN = (2000, 4000)
LIVE_RUNS = 2
KILL_AFTER_POINTS = 3000  # the bucket's server is killed once the sink holds this many: mid-backlog
OUTAGE_SECONDS = 4.0


def holds(read_back, ends: dict[str, int]) -> bool:
    try:
        held = {book["uid"]: book["applied"] for book in books(read_back).values()}
    except Exception:  # noqa: BLE001 - the server is down or restarting: not yet
        return False
    return all(held.get(run, -1) == last for run, last in ends.items())


def points_held(read_back) -> int:
    try:
        return sum(book["points"] for book in books(read_back).values())
    except Exception:  # noqa: BLE001 - not reachable (yet)
        return 0


def journal_run(journal, files, rng: random.Random, works: int, ending: str) -> dict[str, int]:
    """A whole run journaled now: {its uid: its last seq}."""
    experiment = Experiment(journal, files, rng.randrange(2**32))
    experiment.start()
    for _ in range(works):
        experiment.work(200)
    experiment.end(ending)
    return {experiment.run: experiment.writer.next_seq - 1}


@pytest.mark.slow
@pytest.mark.parametrize("base", [pytest.param("s3", marks=ONLY_FULL), "gs"], indirect=True)
def test_a_bucket_server_killed_mid_stream_costs_nothing_and_holds_up_only_itself(base, tmp_path):
    rng = random.Random(SEED)
    journal, state, files, log = tmp_path / "journal", tmp_path / "state", tmp_path / "files", tmp_path / "daemon.log"
    directory = directory_read_back(tmp_path / "beside")
    urls = (base.url, directory.url)
    write_journal(journal, files, rng, RUNS, POINTS_PER_RUN, 1)
    stderr = open(log, "w")
    env = runrelay_env(tmp_path, **RETRY, RUNRELAY_RETRY_UNUSABLE_SECONDS="1")
    daemon = subprocess.Popen(delivery_args("daemon", journal, state, *urls), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    try:
        with Producer(journal, files, random.Random(rng.randrange(2**32)), LIVE_RUNS) as producer:
            wait_for(lambda: points_held(base) >= KILL_AFTER_POINTS, "the bucket to hold points", daemon, log)
            base.server.kill()
            down_since = time.monotonic()
            during_end = journal_run(journal, files, rng, 5, "completed")
            wait_for(lambda: holds(directory, during_end), "the directory to take the run written during the outage",
                     daemon, log)
            assert not base.server.running
            time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down_since)))
            outage = time.monotonic() - down_since
            base.server.start()
            restarted = set(Journal(journal).runs())
            wait_for(lambda: holds(base, during_end), "the bucket to take the run written during the outage",
                     daemon, log)
            after_end = journal_run(journal, files, rng, 2, "failed")  # wholly after the restart
        producer.finish()
        ends = {run: Journal(journal).verify(run).last_seq for run in Journal(journal).runs()}
        wait_for(lambda: holds(directory, ends), "the directory to hold everything", daemon, log)
        kept = base.url.startswith("gs:")  # fake-gcs-server keeps its objects across the restart
        expected = ends if kept else {**during_end, **after_end}
        wait_for(lambda: holds(base, expected), "the bucket to hold everything it can", daemon, log)
    finally:
        base.server.start()
        stop(daemon)
        stderr.close()
    assert daemon.returncode == 0, tail(log)
    beside = assert_files_match_journal(directory, journal)
    held = assert_files_match_journal(base, journal, only=None if kept else {*during_end, *after_end})
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "CRITICAL" not in text, tail(log)
    failing = [line for line in text.splitlines() if "is failing" in line or "cannot deliver" in line]
    assert failing, tail(log)
    lost = "" if kept else f"; moto lost {len(restarted - set(during_end))} runs' objects with its restart, as expected"
    print(f"\n{base.url.split(':')[0]} down {outage:.1f} s: directory beside it identical to the journal {beside}; "
          f"bucket {held}{lost}; log lines about it: {json.dumps(failing[0][-160:])}")

"""A MongoDB outage mid-stream (SecantusDB SIGKILLed and restarted; or SIGSTOPped): the daemon
waits and resumes without exiting, the SQLite sink beside it keeps flowing meanwhile, and
afterwards both hold exactly the journal's events (runs, metric points, GridFS files counted).
The journal, the producer and the SQL checks are test_replay_crash's and test_replay_outage's."""

from __future__ import annotations

import contextlib
import random
import re
import subprocess
import time
from pathlib import Path

import pymongo
import pytest

from runrelay.eventlog.reader import Journal
from test_mongo_crash import assert_mongo_matches_journal
from test_replay_crash import Experiment, Producer, assert_sink_matches_journal, delivery_args, runrelay_env, tail, write_journal
from test_replay_outage import RETRY, holds, metric_rows, status, stop, wait_for

SEED = 11
RUNS = 6
POINTS_PER_RUN = (2000, 3500)  # SecantusDB is a Python server: a smaller backlog than PostgreSQL's
LIVE_RUNS = 2
KILL_AFTER_POINTS = 3000  # the server goes down once it holds this many points: mid-backlog
OUTAGE_SECONDS = 3.0  # at least
TIMEOUT_SECONDS = 2  # the Mongo sink's timeout_seconds: a frozen server is a transient error after that


def mongo_applied(url: str) -> dict[str, int] | None:
    """Each run's applied seq in Mongo; None while the server does not answer."""
    client = pymongo.MongoClient(url, serverSelectionTimeoutMS=500, connectTimeoutMS=500, timeoutMS=2000)
    try:
        db = client.get_default_database()
        return {doc["runrelay"]["uid"]: doc["runrelay"]["applied"]
                for doc in db.runs.find({"runrelay.uid": {"$exists": True}}, {"runrelay": 1})}
    except pymongo.errors.PyMongoError:
        return None
    finally:
        client.close()


def mongo_points(url: str) -> int:
    client = pymongo.MongoClient(url, serverSelectionTimeoutMS=500, connectTimeoutMS=500, timeoutMS=5000)
    try:
        return sum(doc["runrelay"]["points"] for doc in client.get_default_database().metrics.find({}, {"runrelay": 1}))
    except pymongo.errors.PyMongoError:
        return 0
    finally:
        client.close()


def mongo_holds(url: str, ends: dict[str, int]) -> bool:
    seqs = mongo_applied(url)
    return seqs is not None and all(seqs.get(run, -1) == last for run, last in ends.items())


def everything_held(journal: Path, mongo_url: str, sqlite_url: str) -> bool:
    ends = {run: Journal(journal).verify(run).last_seq for run in Journal(journal).runs()}
    return mongo_holds(mongo_url, ends) and holds(sqlite_url, ends)


def run_during_outage(journal: Path, files: Path, rng: random.Random) -> dict[str, int]:
    """A whole run journaled while Mongo is down; its last seq by uid."""
    during = Experiment(journal, files, rng.randrange(2**32))
    during.start()
    for _ in range(4):
        during.work(200)
    during.end("completed")
    return {during.run: during.writer.next_seq - 1}


def start_daemon(tmp_path: Path, mongo_url: str, sqlite_url: str) -> tuple[subprocess.Popen, Path, object]:
    """The daemon over the journal, with the two sinks named ``mongo`` and ``local``."""
    (tmp_path / "runrelay.toml").write_text(
        f'[sinks.mongo]\nurl = "{mongo_url}"\ntimeout_seconds = {TIMEOUT_SECONDS}\n\n'
        f'[sinks.local]\nurl = "{sqlite_url}"\n')
    log = tmp_path / "daemon.log"
    stderr = open(log, "w")
    daemon = subprocess.Popen(delivery_args("daemon", tmp_path / "journal", tmp_path / "state"),
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                              env=runrelay_env(tmp_path, **RETRY))
    return daemon, log, stderr


@contextlib.contextmanager
def down(server, how: str):
    """The server SIGKILLed and started again on leaving, or SIGSTOPped and continued."""
    if how == "killed":
        server.kill()
        try:
            yield
        finally:
            server.start()
    else:
        with server.frozen():
            yield


def outage_shown(journal: Path, state: Path, home: Path):
    def check() -> dict | None:
        report = status(journal, state, home)
        return report if report["mongo"]["failing_since"] else None
    return check


@pytest.mark.parametrize("how", [
    "killed",
    "frozen 5 s",
    pytest.param("frozen 30 s", marks=pytest.mark.slow),
])
def test_mongo_down_mid_stream_daemon_waits_and_resumes_while_sqlite_keeps_flowing(how, mongo_server, mongo_url,
                                                                                      tmp_path):
    if mongo_server.external_url:
        pytest.skip("RUNRELAY_TEST_MONGO_URL: the tests do not own that server")
    rng = random.Random(SEED)
    journal, state, files = tmp_path / "journal", tmp_path / "state", tmp_path / "files"
    sqlite_url = f"sqlite:///{tmp_path / 'sink' / 'runs.sqlite'}"
    backlog = write_journal(journal, files, rng, RUNS, POINTS_PER_RUN, left_running=1)
    freeze_seconds = float(how.split()[1]) if how.startswith("frozen") else 0.0

    daemon, log, stderr = start_daemon(tmp_path, mongo_url, sqlite_url)
    try:
        with Producer(journal, files, random.Random(rng.randrange(2**32)), LIVE_RUNS) as producer:
            wait_for(lambda: mongo_points(mongo_url) >= KILL_AFTER_POINTS, "Mongo points", daemon, log)
            with down(mongo_server, how):
                down_since = time.monotonic()
                sqlite_at_outage = metric_rows(sqlite_url)
                during_end = run_during_outage(journal, files, rng)
                wait_for(lambda: holds(sqlite_url, during_end), "SQLite to take the run written during the outage",
                         daemon, log)
                report = wait_for(outage_shown(journal, state, tmp_path), "status to show the outage", daemon, log)
                assert report["local"]["failing_since"] is None, report["local"]
                assert report["mongo"]["pending_events"] >= next(iter(during_end.values())) + 1, report["mongo"]
                assert report["mongo"]["last_error"], report["mongo"]
                time.sleep(max(0.0, max(OUTAGE_SECONDS, freeze_seconds) - (time.monotonic() - down_since)))
                assert daemon.poll() is None, tail(log)
                sqlite_during_outage = metric_rows(sqlite_url) - sqlite_at_outage
                assert not mongo_holds(mongo_url, during_end)
                down_for = time.monotonic() - down_since
            assert sqlite_during_outage > 0, "SQLite took nothing while Mongo was down"
            wait_for(lambda: mongo_holds(mongo_url, during_end), "Mongo to take the run written during the outage",
                     daemon, log)
        producer.finish()
        wait_for(lambda: everything_held(journal, mongo_url, sqlite_url), "both sinks to hold everything", daemon, log)
        retries = status(journal, state, tmp_path)["mongo"]["retries"]
    finally:
        mongo_server.start()  # for the tests after this one (no-op when it runs)
        stop(daemon)
        stderr.close()
    assert daemon.returncode == 0, tail(log)

    mongo_counts = assert_mongo_matches_journal(mongo_url, journal)
    sqlite_counts = assert_sink_matches_journal(sqlite_url, journal)
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "CRITICAL" not in text, tail(log)
    failing = [line for line in text.splitlines() if "is failing" in line]
    recovered = re.findall(r"sink mongo recovered after (\d+) retries", text)
    assert len(failing) == 1 and "sink mongo is failing" in failing[0], failing
    assert len(recovered) == 1 and int(recovered[0]) == retries >= 1, (recovered, retries)
    print(f"\nMongo {how} {down_for:.1f} s from point {KILL_AFTER_POINTS}+ of a {backlog}-point backlog "
          f"(first error: {failing[0].split('run ', 1)[-1].split(': ', 1)[-1][:90]}); {retries} retries; SQLite took "
          f"{sqlite_during_outage} metric rows meanwhile; Mongo {mongo_counts}; SQLite {sqlite_counts}")


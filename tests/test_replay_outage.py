"""A PostgreSQL outage mid-stream: the daemon waits, retries and resumes without exiting, the
SQLite sink beside it keeps flowing, and neither database loses or doubles an event.

A real `runrelay daemon` delivers a journal backlog plus live runs to a PostgreSQL sink and a
SQLite sink. Mid-stream the PostgreSQL server is SIGKILLed; a run journaled during the outage
must reach SQLite while PostgreSQL is still down, and `runrelay status --json` must show the
PostgreSQL sink's pending events and last error. A few seconds later the server is started
again; once everything is delivered both databases are compared with the journal row by row.
"""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from runrelay.eventlog.reader import Journal
from runrelay.sinks.sql import SqlSink
from test_replay_crash import (
    WAIT_SECONDS,
    Experiment,
    Producer,
    assert_sink_matches_journal,
    delivery_args,
    runrelay_env,
    tail,
    write_journal,
)

SEED = 7
RUNS = 10
POINTS_PER_RUN = (4000, 8000)
LIVE_RUNS = 2
KILL_AFTER_ROWS = 5000  # PostgreSQL is killed once it holds this many metric rows: mid-backlog
OUTAGE_SECONDS = 4.0  # at least; longer if the checks during the outage take longer
POLL_SECONDS = 0.05
# Fast retries, so a few seconds' outage means many attempts (and the logs must not show each).
RETRY = {"RUNRELAY_RETRY_INITIAL_SECONDS": "0.05", "RUNRELAY_RETRY_MAX_SECONDS": "0.3",
         "RUNRELAY_RETRY_JITTER_SECONDS": "0.05"}


def wait_for(check, what: str, daemon: subprocess.Popen, log: Path):
    """Poll ``check`` until it returns something true; the daemon must stay up meanwhile."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        assert daemon.poll() is None, f"the daemon exited ({daemon.returncode}) waiting for {what}:\n{tail(log)}"
        result = check()
        if result:
            return result
        time.sleep(POLL_SECONDS)
    raise AssertionError(f"gave up waiting for {what}:\n{tail(log)}")


def applied(url: str) -> dict[str, int] | None:
    """Each run's applied seq in the sink; None while the database or its tables are missing."""
    engine = sa.create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 2}
                              if url.startswith("postgresql") else {})
    try:
        with engine.connect() as conn:
            return dict(conn.execute(sa.text("SELECT uid, applied_seq FROM runrelay_run")).all())
    except (sa.exc.OperationalError, sa.exc.ProgrammingError):
        return None
    finally:
        engine.dispose()


def metric_rows(url: str) -> int:
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT count(*) FROM metric")).scalar()
    except (sa.exc.OperationalError, sa.exc.ProgrammingError):
        return 0
    finally:
        engine.dispose()


def holds(url: str, ends: dict[str, int]) -> bool:
    """True once the sink has applied every run up to its last seq in ``ends``."""
    seqs = applied(url)
    return seqs is not None and all(seqs.get(run, -1) == last for run, last in ends.items())


def status(journal: Path, state: Path, home: Path, *urls: str) -> dict[str, dict]:
    """`runrelay status --json`, per sink."""
    result = subprocess.run([*delivery_args("status", journal, state, *urls), "--json"], capture_output=True,
                            text=True, env=runrelay_env(home), timeout=WAIT_SECONDS)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    return {sink["sink"]: {**sink, "daemon_pid": report["daemon_pid"]} for sink in report["sinks"]}


def stop(daemon: subprocess.Popen) -> None:
    """SIGTERM the daemon if it still runs; SIGKILL it if it does not end in time."""
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


def test_postgres_outage_mid_stream_daemon_waits_and_resumes_while_sqlite_keeps_flowing(
        postgres_server, postgres_url, tmp_path):
    rng = random.Random(SEED)
    journal, state, files, log = tmp_path / "journal", tmp_path / "state", tmp_path / "files", tmp_path / "daemon.log"
    sqlite_url = f"sqlite:///{tmp_path / 'sink' / 'runs.sqlite'}"
    urls = (postgres_url, sqlite_url)
    backlog = write_journal(journal, files, rng, RUNS, POINTS_PER_RUN, left_running=1)

    stderr = open(log, "w")
    daemon = subprocess.Popen(delivery_args("daemon", journal, state, *urls), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=stderr, env=runrelay_env(tmp_path, **RETRY))
    try:
        with Producer(journal, files, random.Random(rng.randrange(2**32)), LIVE_RUNS) as producer:
            wait_for(lambda: metric_rows(postgres_url) >= KILL_AFTER_ROWS, "PostgreSQL rows", daemon, log)
            postgres_server.kill()
            down_since = time.monotonic()
            at_kill = metric_rows(sqlite_url)
            assert metric_rows(postgres_url) == 0  # it is down: the helper sees no database

            # A whole run journaled during the outage reaches SQLite while PostgreSQL is down.
            during = Experiment(journal, files, rng.randrange(2**32))
            during.start()
            for _ in range(5):
                during.work(200)
            during.end("completed")
            during_end = {during.run: during.writer.next_seq - 1}
            wait_for(lambda: holds(sqlite_url, during_end), "SQLite to take the run written during the outage",
                     daemon, log)
            assert not postgres_server.running

            def outage_shown() -> dict | None:
                report = status(journal, state, tmp_path, *urls)
                return report if report[SqlSink.identity(postgres_url)]["failing_since"] else None

            report = wait_for(outage_shown, "status to show the outage", daemon, log)
            down, up = report[SqlSink.identity(postgres_url)], report[SqlSink.identity(sqlite_url)]
            assert down["daemon_pid"] == daemon.pid
            assert down["pending_events"] >= during.writer.next_seq, down  # at least the run written meanwhile
            assert down["pending_runs"] >= 1 and down["retries"] >= 1, down
            assert down["last_error"] and "OperationalError" in down["last_error"], down
            assert up["failing_since"] is None and up["last_error"] is None, up

            time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down_since)))
            assert daemon.poll() is None, tail(log)
            sqlite_during_outage = metric_rows(sqlite_url) - at_kill
            outage = time.monotonic() - down_since
            postgres_server.start()
            wait_for(lambda: holds(postgres_url, during_end), "PostgreSQL to take the run written during the outage",
                     daemon, log)
        producer.finish()

        ends = {run: Journal(journal).verify(run).last_seq for run in Journal(journal).runs()}
        for url in urls:
            wait_for(lambda: holds(url, ends), f"{url.split(':')[0]} to hold everything", daemon, log)
        retries = status(journal, state, tmp_path, *urls)[SqlSink.identity(postgres_url)]["retries"]
    finally:
        if not postgres_server.running:
            postgres_server.start()  # for the tests after this one
        stop(daemon)
        stderr.close()
    assert daemon.returncode == 0, tail(log)

    counts = {url.split(":")[0]: assert_sink_matches_journal(url, journal) for url in urls}
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "CRITICAL" not in text, tail(log)
    # One line when the outage begins, one when it ends; the attempts in between are counted.
    failing = [line for line in text.splitlines() if "is failing" in line]
    recovered = re.findall(r"recovered after (\d+) retries", text)
    assert len(failing) == 1 and postgres_url.split("@")[-1] in failing[0], failing
    assert len(recovered) == 1 and int(recovered[0]) == retries, (recovered, retries)
    warnings = [line for line in text.splitlines() if " WARNING " in line or " ERROR " in line]
    assert len(warnings) <= 2, warnings
    assert retries >= 5, f"only {retries} attempts in a {outage:.1f} s outage"
    first_error = failing[0].rsplit("Error: ", 1)[-1][:80]
    print(f"\nPostgreSQL down {outage:.1f} s from row {KILL_AFTER_ROWS}+ of a {backlog}-point backlog "
          f"(first error: {first_error}): {retries} retries, {len(failing) + len(recovered)} log lines about it; "
          f"SQLite took {sqlite_during_outage} metric rows meanwhile; both identical to the journal: {counts}")


FREEZE_SECONDS = 60.0
FROZEN_TIMEOUT_SECONDS = 5  # the PostgreSQL sink's timeout_seconds in this test


def test_a_frozen_postgres_holds_up_only_itself(postgres_server, postgres_url, tmp_path):
    """PostgreSQL SIGSTOPped (postmaster and backends) for a minute mid-stream: the kernel
    still accepts its connections, so only the sink's timeout can tell. SQLite keeps
    flowing, the PostgreSQL worker reports a transient error, and after SIGCONT both hold
    exactly the journal's events."""
    rng = random.Random(SEED)
    journal, state, files, log = tmp_path / "journal", tmp_path / "state", tmp_path / "files", tmp_path / "daemon.log"
    sqlite_url = f"sqlite:///{tmp_path / 'sink' / 'runs.sqlite'}"
    (tmp_path / "runrelay.toml").write_text(
        f'[sinks.pg]\nurl = "{postgres_url}"\ntimeout_seconds = {FROZEN_TIMEOUT_SECONDS}\n\n'
        f'[sinks.local]\nurl = "{sqlite_url}"\n')
    write_journal(journal, files, rng, RUNS // 2, POINTS_PER_RUN, left_running=1)

    stderr = open(log, "w")
    daemon = subprocess.Popen(delivery_args("daemon", journal, state), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=stderr, env=runrelay_env(tmp_path, **RETRY))
    try:
        wait_for(lambda: metric_rows(postgres_url) >= KILL_AFTER_ROWS, "PostgreSQL rows", daemon, log)
        with postgres_server.frozen():
            frozen_at = time.monotonic()
            during = Experiment(journal, files, rng.randrange(2**32))
            during.start()
            for _ in range(5):
                during.work(200)
            during.end("completed")
            during_end = {during.run: during.writer.next_seq - 1}
            wait_for(lambda: holds(sqlite_url, during_end), "SQLite to take a run written during the freeze",
                     daemon, log)

            def freeze_shown() -> dict | None:
                report = status(journal, state, tmp_path)
                return report if report["pg"]["failing_since"] else None

            report = wait_for(freeze_shown, "status to show the frozen sink", daemon, log)
            reported_after = time.monotonic() - frozen_at
            assert reported_after < FREEZE_SECONDS, "the freeze was reported only after it ended"
            assert report["local"]["failing_since"] is None, report["local"]
            assert report["pg"]["condition"] == "retrying", report["pg"]
            time.sleep(max(0.0, FREEZE_SECONDS - (time.monotonic() - frozen_at)))
            assert daemon.poll() is None, tail(log)

        ends = {run: Journal(journal).verify(run).last_seq for run in Journal(journal).runs()}
        for url in (postgres_url, sqlite_url):
            wait_for(lambda: holds(url, ends), f"{url.split(':')[0]} to hold everything", daemon, log)
    finally:
        stop(daemon)
        stderr.close()
    assert daemon.returncode == 0, tail(log)
    counts = {url.split(":")[0]: assert_sink_matches_journal(url, journal) for url in (postgres_url, sqlite_url)}
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, tail(log)
    print(f"\nPostgreSQL frozen {FREEZE_SECONDS:.0f} s: shown failing in status {reported_after:.1f} s in "
          f"(timeout_seconds={FROZEN_TIMEOUT_SECONDS}); both identical to the journal: {counts}")

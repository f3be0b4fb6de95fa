"""Dead runs on this host: real processes killed, stopped and exiting; the verdict delivered."""

from __future__ import annotations

import os
import sqlite3
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from runrelay.daemon.verdicts import DeathWatch, Host
from runrelay.eventlog.events import Kind
from runrelay.eventlog.fold import fold
from runrelay.eventlog.reader import Journal
from runrelay.eventlog.recorder import Recorder, process_info, start_ticks, utc_now
from runrelay.eventlog.writer import JournalWriter

# A run in a child process: it prints its uid once the start is journaled, beats, logs a
# point each 10 ms and then does as told (sleep on, or exit without an ending).
PRODUCER = textwrap.dedent("""
    import os, sys, time
    from runrelay.eventlog.recorder import Recorder
    run = Recorder.start(journal_dir=sys.argv[1], heartbeat_seconds=0.05)
    print(run.uid, flush=True)
    for step in range(int(sys.argv[2])):
        run.log_metric("loss", 1.0 / (step + 1))
        time.sleep(0.01)
    if sys.argv[3] == "exit":
        os._exit(0)  # as when Sacred swallows the ending: the process leaves without one
    time.sleep(600)
""")


class Clock:
    """The watch's clock, moved by hand: stalls without sleeping."""

    def __init__(self):
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def journal(tmp_path) -> Journal:
    return Journal(tmp_path / "journal")


def start_producer(journal: Journal, points: int = 5, then: str = "sleep") -> tuple[subprocess.Popen, str]:
    child = subprocess.Popen([sys.executable, "-c", PRODUCER, str(journal.root), str(points), then],
                             stdout=subprocess.PIPE, text=True)
    return child, child.stdout.readline().strip()


def wait_for_a_heartbeat(journal: Journal, run: str) -> None:
    deadline = time.monotonic() + 10
    while not any(event.kind is Kind.HEARTBEAT for event in journal.events(run)):
        assert time.monotonic() < deadline, "the producer never beat"
        time.sleep(0.02)


def died_events(journal: Journal, run: str) -> list:
    return [event for event in journal.events(run) if event.kind is Kind.DIED]


def test_a_killed_experiment_is_judged_dead_and_the_verdict_journaled_once(journal):
    child, run = start_producer(journal)
    watch = DeathWatch(journal)
    try:
        wait_for_a_heartbeat(journal, run)
        assert watch.survey() == []  # alive: nothing to say
    finally:
        child.kill()
        child.wait()
    [verdict] = watch.survey()
    assert (verdict.run, verdict.condition) == (run, "dead")
    assert f"process {child.pid} is gone" in verdict.reason
    assert watch.record(verdict)
    [died] = died_events(journal, run)
    assert died.body["status"] == "DIED" and died.body["reason"] == verdict.reason
    assert died.body["last_heartbeat"] is not None  # the last beat before the kill
    assert watch.survey() == []  # judged: never again
    assert DeathWatch(journal).survey() == []  # nor by a new watch (the verdict is in the journal)


def test_a_run_whose_process_exits_without_an_ending_is_dead_with_that_reason(journal):
    child, run = start_producer(journal, then="exit")
    child.wait()
    [verdict] = DeathWatch(journal).survey()
    assert verdict.condition == "dead"
    assert "without an ending" in verdict.reason


def test_a_stopped_process_is_stalled_never_dead_and_running_again_after_sigcont(journal):
    child, run = start_producer(journal, points=100_000)
    clock = Clock()
    watch = DeathWatch(journal, stalled_seconds=30, clock=clock)
    try:
        os.kill(child.pid, signal.SIGSTOP)
        time.sleep(0.1)  # whatever was in flight lands
        assert watch.survey() == []  # first look: the clock starts now
        clock.now += 29
        assert watch.survey() == []
        clock.now += 2
        [verdict] = watch.survey()
        assert (verdict.run, verdict.condition) == (run, "stalled")
        assert verdict.silent_seconds == pytest.approx(31, abs=1)  # since its last write, just before the first look
        os.kill(child.pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while watch.survey() and time.monotonic() < deadline:  # it writes again
            time.sleep(0.05)
        assert watch.survey() == []
        assert died_events(journal, run) == []
    finally:
        child.kill()
        child.wait()


def closed_run(journal: Journal, **process) -> str:
    """A run started with the given process fields whose writer then went away without an ending."""
    with JournalWriter.create(journal.root) as writer:
        writer.append(Kind.STARTED, {"ex_info": {"name": "x"}, "command": "main", "host_info": {},
                                     "start_time": utc_now(), "config": {}, "meta_info": {}, "sources": [],
                                     "process": {**process_info(), **process}})
    return writer.run


def test_a_pid_reused_by_another_process_means_dead(journal):
    other = subprocess.Popen(["sleep", "60"])
    try:
        run = closed_run(journal, pid=other.pid, start_ticks=start_ticks(other.pid) - 1)
        [verdict] = DeathWatch(journal).survey()
        assert verdict.run == run and verdict.condition == "dead"
        assert "now belongs to another process" in verdict.reason
    finally:
        other.kill()
        other.wait()


def test_a_changed_boot_id_means_dead(journal):
    closed_run(journal, boot_id="00000000-0000-0000-0000-000000000000")
    [verdict] = DeathWatch(journal).survey()
    assert "rebooted" in verdict.reason


def test_queued_runs_and_other_hosts_runs_are_never_judged(journal):
    with JournalWriter.create(journal.root) as writer:  # Sacred -q: queued, then the process leaves
        writer.append(Kind.QUEUED, {"ex_info": {"name": "x"}, "command": "main", "host_info": {},
                                    "queue_time": utc_now(), "config": {}, "meta_info": {}, "sources": []})
    closed_run(journal, host="another-host")
    assert DeathWatch(journal).survey() == []


def test_ended_runs_are_left_alone(journal):
    with Recorder.start(journal_dir=journal.root) as run:
        run.log_metric("loss", 0.5)
    assert DeathWatch(journal).survey() == []


def test_a_writer_that_comes_back_wins_over_the_verdict(journal):
    run = closed_run(journal)
    watch = DeathWatch(journal)
    [verdict] = watch.survey()
    with JournalWriter.resume(journal.root, run) as writer:  # back before the verdict is written
        assert not watch.record(verdict)
        writer.append(Kind.COMPLETED, {"stop_time": utc_now(), "result": None})
    assert died_events(journal, run) == []


@pytest.mark.parametrize("runs", [100, pytest.param(1000, marks=pytest.mark.slow)])
def test_healthy_runs_beating_for_ten_simulated_minutes_get_no_verdict(journal, runs):
    clock = Clock()
    watch = DeathWatch(journal, stalled_seconds=60, clock=clock)
    writers = [JournalWriter.create(journal.root) for _ in range(runs)]
    try:
        for writer in writers:
            writer.append(Kind.STARTED, {"ex_info": {"name": "x"}, "command": "main", "host_info": {},
                                         "start_time": utc_now(), "config": {}, "meta_info": {}, "sources": [],
                                         "process": process_info()})
        for _beat in range(60):  # a beat each 10 s for 10 minutes
            clock.now += 10
            for writer in writers:
                writer.append(Kind.HEARTBEAT, {"beat_time": utc_now(), "info": {}, "result": None})
            assert watch.survey() == []
    finally:
        for writer in writers:
            writer.close()
    assert sum(len(died_events(journal, writer.run)) for writer in writers) == 0


def test_host_identity_is_what_producers_record():
    here = Host.this()
    assert here.name == process_info()["host"]
    assert here.boot_id == Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def test_the_daemon_delivers_a_killed_runs_verdict_to_its_sink(tmp_path, journal):
    from test_daemon_process import Daemon, wait_for

    database = tmp_path / "runs.sqlite"
    daemon = Daemon(journal.root, tmp_path / "state", f"sqlite:///{database}")
    child, run = start_producer(journal)
    try:
        wait_for_a_heartbeat(journal, run)
    finally:
        child.kill()
        child.wait()

    def row():
        with sqlite3.connect(database) as db:
            return db.execute("SELECT status, stop_time, heartbeat, fail_trace, death_reason FROM run JOIN "
                              "runrelay_run ON runrelay_run.run_id = run.run_id WHERE uid = ? AND status = 'DIED'",
                              (run,)).fetchone()

    status, stop_time, heartbeat, fail_trace, reason = wait_for(row, "the verdict in SQLite")
    assert daemon.stop()[0] == 0
    [died] = died_events(journal, run)
    assert stop_time == heartbeat  # the last beat before the kill
    assert reason == died.body["reason"] and f"process {child.pid} is gone" in reason
    assert reason in fail_trace


@pytest.mark.parametrize("judge", ["true", "false"])
def test_sync_judges_a_killed_run_once_before_delivering_unless_told_not_to(tmp_path, journal, judge):
    from test_daemon_process import runrelay

    database = tmp_path / "runs.sqlite"
    child, run = start_producer(journal)
    wait_for_a_heartbeat(journal, run)
    child.kill()
    child.wait()
    synced = runrelay("sync", "--no-progress", "--journal", str(journal.root), "--state", str(tmp_path / "state"),
                      "--sink", f"sqlite:///{database}", home=tmp_path, RUNRELAY_DEAD_RUNS_JUDGE=judge)
    assert synced.returncode == 0, synced.stderr
    with sqlite3.connect(database) as db:
        [(status,)] = db.execute("SELECT status FROM run").fetchall()
    assert (status, len(died_events(journal, run))) == (("DIED", 1) if judge == "true" else ("RUNNING", 0))


def test_status_names_stalled_and_dead_runs_of_this_host(tmp_path, journal):
    from test_daemon_process import runrelay

    child, stopped = start_producer(journal)
    try:
        wait_for_a_heartbeat(journal, stopped)
        os.kill(child.pid, signal.SIGSTOP)
        dead = closed_run(journal, pid=2**22 + 1)  # beyond pid_max: no such process
        time.sleep(0.6)
        shown = runrelay("status", "--journal", str(journal.root), home=tmp_path,
                         RUNRELAY_DEAD_RUNS_STALLED_SECONDS="0.5")  # the stopped one has been silent that long
        assert shown.returncode == 0, shown.stderr
        assert f"STALLED  {stopped}: nothing written for" in shown.stdout
        assert f"DEAD     {dead}: process {2**22 + 1} is gone without an ending" in shown.stdout
    finally:
        child.kill()
        child.wait()


def test_a_killed_sacred_experiment_gets_one_died_verdict_after_all_it_journaled(journal):
    experiment = Path(__file__).parent / "experiments" / "endless_experiment.py"
    read_fd, write_fd = os.pipe()
    child = subprocess.Popen([sys.executable, str(experiment), "-j", str(journal.root), "-b", "0.05", "with",
                              f"report_fd={write_fd}", "pause=0.01"], pass_fds=[write_fd],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_fd)
    with os.fdopen(read_fd) as reports:
        reports.readline()  # under way
        child.kill()
        child.wait()
    [run] = journal.runs()
    watch = DeathWatch(journal)
    [verdict] = watch.survey()
    assert watch.record(verdict)
    events = list(journal.events(run))
    assert events[-1].kind is Kind.DIED and [e.kind for e in events].count(Kind.DIED) == 1
    assert fold(events).status == "DIED"

"""Central verdicts in SQL sinks: a silent host's running runs marked dead once, undone when it returns.

The runs are journaled as host "node-1" (tests/sinkkit.py) with heartbeats in 2024: stale
for any watchdog clock of today.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import sqlalchemy as sa

from runrelay.daemon.watchdog import HostReports, Watchdog, utc
from runrelay.eventlog import JournalWriter, Kind
from sinkkit import Delivery, append_steps, at, beat, lifecycle, open_sink, write_run
from test_sql_sink import files, in_threads, journal, run_row, sink, url  # noqa: F401 - fixtures and helpers

HOST = "node-1"
SILENT = 300.0


def running_run(sink, journal, files) -> tuple[str, Delivery]:
    """A run delivered up to its last heartbeat, its ending not yet journaled (seqs 0-8)."""
    run = write_run(journal, lifecycle(files)[:-1])
    delivery = Delivery(journal, run)
    delivery.apply(sink)
    return run, delivery


def watchdog(sinks, now: float | None = None) -> Watchdog:
    return Watchdog(sinks, host_silent_seconds=SILENT, stale_seconds=SILENT, status="DIED",
                    clock=(lambda: now) if now is not None else time.time)


def test_a_silent_hosts_running_run_is_marked_dead_with_the_reason(sink, url, journal, files):
    run, _ = running_run(sink, journal, files)
    ended = write_run(journal, lifecycle(files))
    Delivery(journal, ended).apply(sink)
    assert watchdog([sink]).once() == 1  # node-1 never reported; the ended run is left alone
    row = run_row(url, run)
    assert (row.status, row.stop_time) == ("DIED", at(5))  # stop_time: the last heartbeat
    assert row.death_reason.startswith(f"host {HOST} went silent (never reported); last heartbeat 2024-05-01")
    assert row.fail_trace == f"runrelay judged the run dead: {row.death_reason}\n"
    assert run_row(url, ended).status == "COMPLETED"
    assert watchdog([sink]).once() == 0  # once


def test_a_host_that_reports_keeps_its_runs(sink, url, journal, files):
    run, _ = running_run(sink, journal, files)
    now = time.time()
    reports = HostReports(HOST, [sink], every_seconds=10, clock=lambda: now - SILENT + 5)
    reports.report()
    assert watchdog([sink], now).once() == 0  # reported 295 s ago: alive
    assert watchdog([sink], now + 10).once() == 1  # 305 s: silent
    assert run_row(url, run).status == "DIED"


def test_three_watchdogs_at_once_write_each_verdict_once(url, journal, files):
    first = open_sink(url, journal)
    runs = [running_run(first, journal, files)[0] for _ in range(5)]
    sinks = [first, *(open_sink(url, journal) for _ in range(2))]
    ready = threading.Barrier(len(sinks))
    written = []

    def judge(sink):
        ready.wait()
        written.append(watchdog([sink]).once())

    in_threads(judge, sinks)
    assert sum(written) == len(runs)
    assert {run_row(url, run).status for run in runs} == {"DIED"}


@pytest.mark.parametrize("comes_back_with", ["a heartbeat", "its ending"])
def test_the_runs_real_history_wins_when_its_host_comes_back(sink, url, journal, files, comes_back_with):
    run, delivery = running_run(sink, journal, files)
    assert watchdog([sink]).once() == 1
    with JournalWriter.resume(journal.root, run) as writer:
        writer.append(*beat(600, "back\n"))
        if comes_back_with == "its ending":
            writer.append(Kind.COMPLETED, {"stop_time": at(601), "result": 0.25})
    delivery.apply(sink)
    row = run_row(url, run)
    expected = ("COMPLETED", at(601)) if comes_back_with == "its ending" else ("RUNNING", None)
    assert (row.status, row.stop_time) == expected
    assert (row.fail_trace, row.death_reason, row.heartbeat) == (None, None, at(600))


def test_a_verdict_is_not_written_over_a_change_made_meanwhile(sink, url, journal, files):
    run, delivery = running_run(sink, journal, files)
    [silent] = sink.silent_runs(utc(time.time()), utc(time.time()))
    with JournalWriter.resume(journal.root, run) as writer:  # the host delivers a beat between the watchdog's read and write
        writer.append(*beat(600, "back\n"))
    delivery.apply(sink)
    assert not sink.mark_dead(silent, "DIED", "host went silent")
    assert run_row(url, run).status == "RUNNING"



def test_a_stopped_hosts_daemon_its_runs_marked_once_by_three_watchdogs_then_its_real_ending(tmp_path, journal,
                                                                                             files):
    from test_daemon_process import Daemon, runrelay, wait_for

    database = tmp_path / "runs.sqlite"
    url = f"sqlite:///{database}"
    host = {"RUNRELAY_DEAD_RUNS_HOST": HOST, "RUNRELAY_DEAD_RUNS_REPORT_SECONDS": "0.2"}
    quick = {"RUNRELAY_WATCHDOG_HOST_SILENT_SECONDS": "2", "RUNRELAY_WATCHDOG_STALE_SECONDS": "2"}
    writer = JournalWriter.create(journal.root)  # node-1's live experiment: it holds its run's lock throughout
    append_steps(writer, lifecycle(files)[:-1])
    state = tmp_path / "state"
    daemon = Daemon(journal.root, state, url, **host)
    try:
        wait_for(lambda: delivered(url, writer.run, "heartbeat") == at(5), "the run delivered")
        assert "died" not in runrelay("watchdog", "--once", "--sink", url, home=tmp_path, **quick).stderr
    finally:
        assert daemon.stop()[0] == 0  # the host goes silent
    time.sleep(2.5)
    watchdogs = [subprocess.Popen([sys.executable, "-m", "runrelay.daemon.cli", "watchdog", "--once", "--sink", url],
                                  stderr=subprocess.PIPE, text=True, env={"PATH": "/usr/bin:/bin",
                                  "RUNRELAY_HOME": str(tmp_path), **quick}) for _ in range(3)]
    logs = [watchdog.communicate(timeout=60)[1] for watchdog in watchdogs]
    assert [watchdog.returncode for watchdog in watchdogs] == [0, 0, 0], logs
    assert sum(log.count(f"run {writer.run} died: host {HOST} went silent") for log in logs) == 1, logs
    assert run_row(url, writer.run).status == "DIED"

    writer.append(*beat(600, "back\n"))  # the host comes back; its run goes on and ends
    writer.append(Kind.COMPLETED, {"stop_time": at(601), "result": 0.25})
    writer.close()
    daemon = Daemon(journal.root, state, url, **host)
    try:
        wait_for(lambda: delivered(url, writer.run, "status") == "COMPLETED", "the real ending")
    finally:
        assert daemon.stop()[0] == 0
    row = run_row(url, writer.run)
    assert (row.stop_time, row.fail_trace, row.death_reason) == (at(601), None, None)


def delivered(url: str, run: str, column: str):
    """The run's column once the daemon has written it (None before its tables and row exist)."""
    try:
        return getattr(run_row(url, run), column)
    except (sa.exc.OperationalError, IndexError):
        return None

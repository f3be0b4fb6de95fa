"""Central verdicts in every sink (SQLite, PostgreSQL, MariaDB, MongoDB, FileStorage on
file://, s3:// on moto, gs:// on fake-gcs-server): a silent host's running runs marked dead
once, undone when it returns.

The runs are journaled as host "node-1" (tests/sinkkit.py) with heartbeats in 2024: stale
for any watchdog clock of today.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid

import pymongo
import pytest
import sqlalchemy as sa

from runrelay.daemon.watchdog import HostReports, Watchdog, utc
from runrelay.eventlog import Journal, JournalWriter, Kind
from runrelay.sinks.filestorage import TIME_FORMAT
from sinkkit import Delivery, append_steps, at, beat, lifecycle, make_files, open_sink, started, write_run
from servers import GcpStorageEmulator, start_or_skip
from test_sink_contract import bucket_read_back, directory_read_back
from test_sql_sink import DIALECTS, in_threads, run_row

HOST = "node-1"
SILENT = 300.0

BUCKET_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
              "STORAGE_EMULATOR_HOST")


class SqlRuns:
    """The run fields a verdict touches, as an SQL sink holds them (the trace as its lines)."""

    def __init__(self, url: str):
        self.url = url

    def run(self, uid: str) -> dict:
        row = run_row(self.url, uid)
        return {"status": row.status, "heartbeat": row.heartbeat, "stop_time": row.stop_time,
                "fail_trace": None if row.fail_trace is None else row.fail_trace.splitlines(keepends=True),
                "death": row.death_reason}


class MongoRuns:
    """The run fields a verdict touches, as the Mongo sink holds them."""

    def __init__(self, url: str):
        self.url = url

    def run(self, uid: str) -> dict:
        client = pymongo.MongoClient(self.url, serverSelectionTimeoutMS=5000, timeoutMS=20000)
        try:
            document = client.get_default_database().runs.find_one({"runrelay.uid": uid})
        finally:
            client.close()
        return {"status": document["status"], "heartbeat": document.get("heartbeat"),
                "stop_time": document.get("stop_time"), "fail_trace": document.get("fail_trace"),
                "death": document["runrelay"].get("death")}


class FileStorageRuns:
    """The same fields of a FileStorage sink's run.json, its times parsed."""

    def __init__(self, read_back):
        self.url, self.read = read_back.url, read_back.read

    def run(self, uid: str) -> dict:
        run_id = json.loads(self.read(f"_runrelay/runs/{uid}.json"))["id"]
        document = json.loads(self.read(f"{run_id}/run.json"))

        def time_of(name):
            return None if document.get(name) is None else dt.datetime.strptime(document[name], TIME_FORMAT)

        return {"status": document["status"], "heartbeat": time_of("heartbeat"), "stop_time": time_of("stop_time"),
                "fail_trace": document.get("fail_trace"), "death": document["runrelay"].get("death")}


def store_for(name: str, request, tmp_path, monkeypatch):
    """A fresh store of the sink ``name``, with its reader; a bucket's sinks reach the server
    through the usual environment (bucket_read_back sets it)."""
    if name == "sqlite":
        return SqlRuns(f"sqlite:///{tmp_path / 'db' / 'runs.db'}")
    if name in DIALECTS:
        return SqlRuns(request.getfixturevalue(f"{name}_url"))
    if name == "mongo":
        return MongoRuns(request.getfixturevalue("mongo_url"))
    if name == "file":
        return FileStorageRuns(directory_read_back(tmp_path / "runs"))
    server = request.getfixturevalue("moto_server" if name == "s3" else "gcs_server")
    return FileStorageRuns(bucket_read_back(name, server, monkeypatch, f"runs-{uuid.uuid4().hex[:8]}"))


BUCKETS = ["file", "s3", "gs"]


@pytest.fixture(params=[*DIALECTS, "mongo", *BUCKETS])
def store(request, tmp_path, monkeypatch):
    return store_for(request.param, request, tmp_path, monkeypatch)


@pytest.fixture
def journal(journal_dir) -> Journal:
    return Journal(journal_dir)


@pytest.fixture
def files(tmp_path):
    return make_files(tmp_path / "experiment")


@pytest.fixture
def sink(store, journal):
    sink = open_sink(store.url, journal)
    yield sink
    sink.close()


def running_run(sink, journal, files) -> tuple[str, Delivery]:
    """A run delivered up to its last heartbeat, its ending not yet journaled (seqs 0-8)."""
    run = write_run(journal, lifecycle(files)[:-1])
    delivery = Delivery(journal, run)
    delivery.apply(sink)
    return run, delivery


def watchdog(sinks, now: float | None = None) -> Watchdog:
    return Watchdog(sinks, host_silent_seconds=SILENT, stale_seconds=SILENT, status="DIED",
                    clock=(lambda: now) if now is not None else time.time)


def same_time(left: dt.datetime, right: dt.datetime) -> bool:
    return abs(left - right) < dt.timedelta(milliseconds=1)  # MongoDB keeps milliseconds


@pytest.mark.parametrize("name", BUCKETS)
def test_each_filestorage_store_honours_conditional_writes(name, request, tmp_path, monkeypatch, journal):
    sink = open_sink(store_for(name, request, tmp_path, monkeypatch).url, journal)
    try:
        assert sink.central_problem() is None
    finally:
        sink.close()


def test_a_store_that_ignores_preconditions_is_named_once_and_left_out(journal, files, caplog):
    server = GcpStorageEmulator()
    try:
        start_or_skip(server)
        sink = open_sink(f"gs://{server.bucket}/runs", journal, endpoint=f"http://127.0.0.1:{server.port}")
        try:
            running_run(sink, journal, files)
            judge = watchdog([sink])
            with caplog.at_level(logging.WARNING, logger="runrelay.watchdog"):
                assert (judge.once(), judge.once()) == (0, 0)
        finally:
            sink.close()
    finally:
        server.cleanup()
    assert [record.getMessage() for record in caplog.records] == [
        "sink test cannot take central verdicts: the store wrote over a newer version in a conditional write "
        "(it ignores the precondition): left out"]


def test_a_silent_hosts_running_run_is_marked_dead_with_the_reason(sink, store, journal, files):
    run, _ = running_run(sink, journal, files)
    ended = write_run(journal, lifecycle(files))
    Delivery(journal, ended).apply(sink)
    assert watchdog([sink]).once() == 1  # node-1 never reported; the ended run is left alone
    found = store.run(run)
    assert found["status"] == "DIED"
    assert same_time(found["heartbeat"], at(5)) and found["stop_time"] == found["heartbeat"]  # the last heartbeat
    assert found["death"].startswith(f"host {HOST} went silent (never reported); last heartbeat 2024-05-01")
    assert found["fail_trace"] == [f"runrelay judged the run dead: {found['death']}\n"]
    assert store.run(ended)["status"] == "COMPLETED"
    assert watchdog([sink]).once() == 0  # once


def test_a_host_that_reports_keeps_its_runs(sink, store, journal, files):
    run, _ = running_run(sink, journal, files)
    now = time.time()
    HostReports(HOST, [sink], every_seconds=10, clock=lambda: now - SILENT + 5).report()
    assert watchdog([sink], now).once() == 0  # reported 295 s ago: alive
    assert watchdog([sink], now + 10).once() == 1  # 305 s: silent
    assert store.run(run)["status"] == "DIED"


def test_three_watchdogs_at_once_write_each_verdict_once(store, journal, files):
    first = open_sink(store.url, journal)
    runs = [running_run(first, journal, files)[0] for _ in range(3)]
    sinks = [first, *(open_sink(store.url, journal) for _ in range(2))]
    ready = threading.Barrier(len(sinks))
    written = []

    def judge(sink):
        ready.wait()
        written.append(watchdog([sink]).once())

    in_threads(judge, sinks)
    assert sum(written) == len(runs)
    assert {store.run(run)["status"] for run in runs} == {"DIED"}


@pytest.mark.parametrize("comes_back_with", ["a heartbeat", "its ending"])
def test_the_runs_real_history_wins_when_its_host_comes_back(sink, store, journal, files, comes_back_with):
    run, delivery = running_run(sink, journal, files)
    assert watchdog([sink]).once() == 1
    with JournalWriter.resume(journal.root, run) as writer:
        writer.append(*beat(600, "back\n"))
        if comes_back_with == "its ending":
            writer.append(Kind.COMPLETED, {"stop_time": at(601), "result": 0.25})
    delivery.apply(sink)
    found = store.run(run)
    status, stop_time = ("COMPLETED", at(601)) if comes_back_with == "its ending" else ("RUNNING", None)
    assert found["status"] == status
    assert stop_time is None and found["stop_time"] is None or same_time(found["stop_time"], stop_time)
    assert (found["fail_trace"], found["death"]) == (None, None)
    assert same_time(found["heartbeat"], at(600))


def test_a_batch_read_before_the_mark_and_written_after_it_withdraws_it(sink, store, journal, files):
    run, delivery = running_run(sink, journal, files)
    with JournalWriter.resume(journal.root, run) as writer:
        writer.append(Kind.METRICS, {"name": "loss", "step": 3, "value": 0.1, "timestamp": at(6)})
    batch = delivery.batch()  # the host's daemon has it in hand (a batch without a heartbeat) ...
    assert watchdog([sink]).once() == 1  # ... when the watchdog marks the run
    sink.apply(batch)
    assert (store.run(run)["status"], store.run(run)["death"]) == ("RUNNING", None)


def test_a_verdict_is_not_written_over_a_change_made_meanwhile(sink, store, journal, files):
    run, delivery = running_run(sink, journal, files)
    [silent] = sink.silent_runs(utc(time.time()), utc(time.time()))
    with JournalWriter.resume(journal.root, run) as writer:  # a beat between the watchdog's read and write
        writer.append(*beat(600, "back\n"))
    delivery.apply(sink)
    assert not sink.mark_dead(silent, "DIED", "host went silent")
    assert store.run(run)["status"] == "RUNNING"


@pytest.mark.parametrize("sinks", [("sqlite", "mongo", "gs"), ("file", "s3")])
def test_a_stopped_hosts_daemon_its_runs_marked_once_by_three_watchdogs_then_its_real_ending(
        request, tmp_path, monkeypatch, journal, files, sinks):
    """Two hosts, each its own journal and daemon identity: node-1's daemon stops (its run
    goes on, unseen), node-2's keeps reporting; three watchdog processes at once mark
    node-1's run once in each sink and leave node-2's; node-1 comes back and every sink
    shows its real ending."""
    from test_daemon_process import Daemon, wait_for

    stores = {name: store_for(name, request, tmp_path, monkeypatch) for name in sinks}
    env = {name: value for name, value in os.environ.items() if name in BUCKET_ENV}
    urls = [found.url for found in stores.values()]
    quick = {"RUNRELAY_WATCHDOG_HOST_SILENT_SECONDS": "2", "RUNRELAY_WATCHDOG_STALE_SECONDS": "2"}
    hosts = {}
    for host in ("node-1", "node-2"):
        root = tmp_path / host
        writer = JournalWriter.create(root / "journal")  # the host's live experiment holds its run's lock throughout
        process = {"host": host, "boot_id": "boot", "pid": 1, "start_ticks": 1}
        append_steps(writer, [started(files, process=process), *lifecycle(files)[1:-1]])
        hosts[host] = (root, writer)
    daemons = {host: Daemon(root / "journal", root / "state", *urls, RUNRELAY_DEAD_RUNS_HOST=host,
                            RUNRELAY_DEAD_RUNS_REPORT_SECONDS="0.2", **env) for host, (root, _) in hosts.items()}
    try:
        for host, (_, writer) in hosts.items():
            for found in stores.values():
                wait_for(lambda: delivered(found, writer.run, "heartbeat"), f"{host}'s run delivered")
        assert daemons["node-1"].stop()[0] == 0  # node-1 goes silent
        time.sleep(2.5)
        watchdogs = [subprocess.Popen(
            [sys.executable, "-m", "runrelay.daemon.cli", "watchdog", "--once", *(f"--sink={url}" for url in urls)],
            stderr=subprocess.PIPE, text=True,
            env={"PATH": "/usr/bin:/bin", "RUNRELAY_HOME": str(tmp_path), **env, **quick}) for _ in range(3)]
        logs = [watchdog.communicate(timeout=60)[1] for watchdog in watchdogs]
        assert [watchdog.returncode for watchdog in watchdogs] == [0, 0, 0], logs
        silent_run, live_run = hosts["node-1"][1].run, hosts["node-2"][1].run
        assert sum(log.count(f"run {silent_run} died: host node-1 went silent") for log in logs) == len(urls), logs
        assert f"run {live_run} died" not in "".join(logs)
        assert {found.run(silent_run)["status"] for found in stores.values()} == {"DIED"}
        assert {found.run(live_run)["status"] for found in stores.values()} == {"RUNNING"}

        root, writer = hosts["node-1"]  # node-1 comes back; its run goes on and ends
        writer.append(*beat(600, "back\n"))
        writer.append(Kind.COMPLETED, {"stop_time": at(601), "result": 0.25})
        writer.close()
        daemons["node-1"] = Daemon(root / "journal", root / "state", *urls, RUNRELAY_DEAD_RUNS_HOST="node-1",
                                   RUNRELAY_DEAD_RUNS_REPORT_SECONDS="0.2", **env)
        for found in stores.values():
            wait_for(lambda: delivered(found, silent_run, "status") == "COMPLETED", "the real ending")
            ending = found.run(silent_run)
            assert (ending["fail_trace"], ending["death"]) == (None, None)
            assert same_time(ending["stop_time"], at(601))
    finally:
        hosts["node-2"][1].close()
        for daemon in daemons.values():
            if daemon.process.poll() is None:
                assert daemon.stop()[0] == 0


def delivered(store, run: str, field: str):
    """The run's field once the daemon has written it (None before)."""
    try:
        return store.run(run)[field]
    except (TypeError, KeyError, AttributeError, IndexError, sa.exc.OperationalError):
        return None

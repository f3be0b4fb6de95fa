"""`runrelay daemon` as a real process, every command's --help, and user errors."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from runrelay.daemon.state import StateStore
from runrelay.eventlog.events import Kind
from runrelay.eventlog.reader import Journal
from runrelay.eventlog.writer import JournalWriter
from runrelay.sinks.sql import SqlSink

WAIT_SECONDS = 60.0  # a generous bound for things that take milliseconds; never asserted on
POLL_SECONDS = 0.02
ENV = {"PATH": "/usr/bin:/bin"}


def runrelay(*args: str, home: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runrelay.daemon.cli", *args], capture_output=True, text=True,
                          env={**ENV, "RUNRELAY_HOME": str(home), **env}, timeout=WAIT_SECONDS)


class Daemon:
    """`runrelay daemon` in a subprocess, started once it tells systemd's notify socket READY=1."""

    def __init__(self, journal: Path, state: Path, *sinks: str, **env: str):
        journal.mkdir(parents=True, exist_ok=True)  # a journal given by name must exist
        command = [sys.executable, "-m", "runrelay.daemon.cli", "daemon", "--journal", str(journal), "--state", str(state)]
        for url in sinks:
            command += ["--sink", url]
        self.notifications = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        address = state.parent / f"notify-{time.monotonic_ns()}.sock"
        self.notifications.bind(str(address))
        self.notifications.settimeout(WAIT_SECONDS)
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={
            **ENV, "RUNRELAY_HOME": str(state.parent), "NOTIFY_SOCKET": str(address), **env})
        self.pid = self.process.pid
        try:
            ready = self.notification()
        except OSError:  # never got ready: say why, leave nothing running
            self.process.kill()
            raise AssertionError(f"the daemon did not start: {self.process.communicate()[1]}") from None
        assert ready.startswith("READY=1\nSTATUS=delivering to")

    def notification(self) -> str:
        return self.notifications.recv(4096).decode()

    def stop(self) -> tuple[int, str]:
        """SIGTERM; returns the exit code and stderr, and checks that systemd heard STOPPING=1."""
        self.process.send_signal(signal.SIGTERM)
        _, stderr = self.process.communicate(timeout=WAIT_SECONDS)
        self.notifications.setblocking(False)
        heard = []
        while True:
            try:
                heard.append(self.notification())
            except BlockingIOError:
                break
        self.notifications.close()
        assert "STOPPING=1" in heard
        return self.process.returncode, stderr


def wait_for(check, what: str):
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        try:
            result = check()
        except sqlite3.OperationalError:  # the sink has not created its tables yet
            result = None
        if result:
            return result
        time.sleep(POLL_SECONDS)
    raise AssertionError(f"gave up waiting for {what}")


def points(database: Path) -> int:
    with sqlite3.connect(database) as db:
        return db.execute("SELECT count(*) FROM metric").fetchone()[0]


def write_points(writer: JournalWriter, first: int, count: int) -> None:
    for step in range(first, first + count):
        writer.append(Kind.METRICS, {"name": "loss", "step": step, "value": 0.5, "timestamp": None})


def test_sigterm_finishes_saves_cursors_and_exits_0(tmp_path):
    journal, state, database = tmp_path / "journal", tmp_path / "state", tmp_path / "runs.sqlite"
    daemon = Daemon(journal, state, f"sqlite:///{database}")
    try:
        with JournalWriter.create(journal) as writer:  # a live run, appended while the daemon runs
            writer.append(Kind.STARTED, {"config": {}, "command": "main"})
            write_points(writer, 0, 100)
            wait_for(lambda: points(database) == 100, "the live run's points")
            write_points(writer, 100, 50)
            writer.append(Kind.COMPLETED, {"result": 1})
            run = writer.run
        wait_for(lambda: points(database) == 150, "the rest of the run")
    finally:
        code, stderr = daemon.stop()
    assert code == 0, stderr
    assert "stopping (signal SIGTERM)" in stderr and "stopped; cursors saved" in stderr
    store = StateStore.open(state)
    cursor = store.cursors(f"sqlite:///{database}")[run]
    store.close()
    assert (cursor.position.seq, cursor.done) == (152, True)

    again = Daemon(journal, state, f"sqlite:///{database}")  # a restart delivers only what is new
    try:
        with JournalWriter.create(journal) as writer:
            writer.append(Kind.STARTED, {"config": {}, "command": "main"})
            write_points(writer, 0, 10)
            writer.append(Kind.COMPLETED, {"result": 2})
        wait_for(lambda: points(database) == 160, "the second run")
    finally:
        code, stderr = again.stop()
    assert code == 0, stderr
    assert points(database) == 160


def test_a_dead_sink_does_not_hold_up_another_and_shutdown_is_not_held_by_retries(tmp_path):
    journal, state, database = tmp_path / "journal", tmp_path / "state", tmp_path / "runs.sqlite"
    dead = "postgresql+psycopg://relay:hunter2@127.0.0.1:9/runs"
    daemon = Daemon(journal, state, dead, f"sqlite:///{database}", RUNRELAY_RETRY_MAX_SECONDS="300")
    try:
        with JournalWriter.create(journal) as writer:
            writer.append(Kind.STARTED, {"config": {}, "command": "main"})
            write_points(writer, 0, 20)
            writer.append(Kind.COMPLETED, {"result": 1})
        wait_for(lambda: points(database) == 20, "the healthy sink")
        status = runrelay("status", "--json", "--journal", str(journal), "--state", str(state), "--sink", dead,
                          home=tmp_path)
        report = json.loads(status.stdout)
        assert report["daemon_pid"] == daemon.pid
        [sink] = report["sinks"]
        assert sink["sink"] == "postgresql://relay@127.0.0.1:9/runs"
        assert sink["pending_events"] == 22
    finally:
        code, stderr = daemon.stop()
    assert code == 0, stderr
    assert stderr.count("is failing, retrying with backoff") == 1
    assert "hunter2" not in stderr


def test_a_sink_outage_is_retried_and_logged_once_each_way(tmp_path, postgres_server, postgres_url):
    journal, state = tmp_path / "journal", tmp_path / "state"
    database = postgres_url.replace("postgresql+psycopg://", "postgresql://")

    def pg_points() -> int:
        with psycopg.connect(database) as db:
            return db.execute("SELECT count(*) FROM metric").fetchone()[0]

    def failing_since():
        store = StateStore.open_readonly(state)
        try:
            return store.health(SqlSink.identity(postgres_url)).failing_since
        finally:
            store.close()

    def pg_run(count: int) -> None:
        with JournalWriter.create(journal) as writer:
            writer.append(Kind.STARTED, {"config": {}, "command": "main"})
            write_points(writer, 0, count)
            writer.append(Kind.COMPLETED, {"result": 1})

    daemon = Daemon(journal, state, postgres_url, RUNRELAY_RETRY_INITIAL_SECONDS="0.05",
                    RUNRELAY_RETRY_MAX_SECONDS="0.5", RUNRELAY_RETRY_JITTER_SECONDS="0.05")
    try:
        pg_run(30)
        wait_for(lambda: _quietly(pg_points) == 30, "delivery before the outage")
        postgres_server.kill()
        pg_run(40)  # written while the database is down
        wait_for(failing_since, "the daemon to notice the outage")
        postgres_server.start()
        wait_for(lambda: _quietly(pg_points) == 70, "delivery after the outage")
    finally:
        code, stderr = daemon.stop()
    assert code == 0, stderr
    assert stderr.count("is failing, retrying with backoff") == 1
    assert stderr.count("recovered after") == 1
    assert pg_points() == 70


def _quietly(query):
    """The query's answer, or None while the server is down or the sink's tables are not made yet."""
    try:
        return query()
    except (psycopg.OperationalError, psycopg.errors.UndefinedTable):
        return None


def test_debug_logs_are_runrelays_own(tmp_path):
    journal, state, database = tmp_path / "journal", tmp_path / "state", tmp_path / "runs.sqlite"
    daemon = Daemon(journal, state, f"sqlite:///{database}", RUNRELAY_LOG_LEVEL="DEBUG")
    try:
        with JournalWriter.create(journal) as writer:
            writer.append(Kind.STARTED, {"config": {}, "command": "main"})
            write_points(writer, 0, 50)
        wait_for(lambda: points(database) == 50, "the points")
    finally:
        code, stderr = daemon.stop()
    assert code == 0, stderr
    loggers = {line.split()[3].rstrip(":") for line in stderr.splitlines() if len(line.split()) > 3}
    assert loggers and all(name.startswith("runrelay") for name in loggers), loggers


def test_a_second_delivering_process_is_refused(tmp_path):
    journal, state = tmp_path / "journal", tmp_path / "state"
    daemon = Daemon(journal, state, f"sqlite:///{tmp_path / 'runs.sqlite'}")
    try:
        second = runrelay("sync", "--journal", str(journal), "--state", str(state), home=tmp_path)
        assert second.returncode == 2
        assert f"another runrelay (pid {daemon.pid}) is delivering" in second.stderr
    finally:
        code, stderr = daemon.stop()
    assert code == 0, stderr


def test_systemd_hears_watchdog_pings(tmp_path):
    daemon = Daemon(tmp_path / "journal", tmp_path / "state", f"sqlite:///{tmp_path / 'runs.sqlite'}",
                    WATCHDOG_USEC="100000")
    try:
        assert daemon.notification() == "WATCHDOG=1"
    finally:
        code, stderr = daemon.stop()
    assert code == 0, stderr


def test_a_sink_that_cannot_be_used_stops_only_itself_said_once(tmp_path):
    journal, state, database = tmp_path / "journal", tmp_path / "state", tmp_path / "runs.sqlite"
    (tmp_path / "a-file").touch()
    broken = f"sqlite:///{tmp_path / 'a-file' / 'runs.sqlite'}"
    daemon = Daemon(journal, state, broken, f"sqlite:///{database}", RUNRELAY_RETRY_UNUSABLE_SECONDS="0.2")
    try:
        with JournalWriter.create(journal) as writer:
            writer.append(Kind.STARTED, {"config": {}, "command": "main"})
            write_points(writer, 0, 20)
            writer.append(Kind.COMPLETED, {"result": 1})
        wait_for(lambda: points(database) == 20, "the healthy sink")
        time.sleep(1)  # several re-checks of the broken sink
        status = runrelay("status", "--json", "--journal", str(journal), "--state", str(state), "--sink", broken,
                          home=tmp_path)
        [sink] = json.loads(status.stdout)["sinks"]
        assert sink["condition"] == "unusable"
        assert "cannot create the database file" in sink["last_error"]
    finally:
        code, stderr = daemon.stop()
    assert code == 0, stderr
    assert stderr.count("cannot deliver") == 1, stderr  # said once, re-checked quietly
    assert "Traceback" not in stderr


def test_sync_says_why_a_sink_can_never_work_and_delivers_the_others(tmp_path, postgres_url):
    journal, state, database = tmp_path / "journal", tmp_path / "state", tmp_path / "runs.sqlite"
    unknown = postgres_url.rsplit("/", 1)[0] + "/no_such_database"
    with JournalWriter.create(journal) as writer:
        writer.append(Kind.STARTED, {"config": {}, "command": "main"})
        write_points(writer, 0, 20)
        writer.append(Kind.COMPLETED, {"result": 1})
    began = time.monotonic()
    result = runrelay("sync", "--no-progress", "--journal", str(journal), "--state", str(state),
                      "--sink", unknown, "--sink", f"sqlite:///{database}", home=tmp_path)
    took = time.monotonic() - began
    assert result.returncode == 1, result.stderr
    assert points(database) == 20
    assert result.stderr.count('database "no_such_database" does not exist') == 1, result.stderr
    assert "Traceback" not in result.stderr
    print(f"\nsync with an unknown PostgreSQL database beside SQLite: exit 1 after {took:.2f} s")


def test_dlq_retry_while_the_daemon_runs_redrives_through_it(tmp_path):
    journal, state, database = tmp_path / "journal", tmp_path / "state", tmp_path / "runs.sqlite"
    model = tmp_path / "model.bin"
    model.write_bytes(b"weights")
    daemon = Daemon(journal, state, f"sqlite:///{database}")
    try:
        with JournalWriter.create(journal) as writer:
            writer.append(Kind.STARTED, {"config": {}, "command": "main"})
            stored = writer.store_file(model)
            blob = Journal(journal).blob(writer.run, stored["digest"])
            saved = blob.read_bytes()
            blob.unlink()  # damaged: the artifact is dead-lettered
            writer.append(Kind.ARTIFACT, {"name": "model.bin", "filename": str(model), **stored})
            write_points(writer, 0, 20)
            writer.append(Kind.COMPLETED, {"result": 1})
        wait_for(lambda: points(database) == 20, "the run's points")
        listed = wait_for(lambda: json.loads(runrelay("dlq", "list", "--json", "--journal", str(journal),
                                                      "--state", str(state), home=tmp_path).stdout), "the letter")
        assert [letter["seq"] for letter in listed] == [1]

        blob.write_bytes(saved)  # restored
        retried = runrelay("dlq", "retry", "--all", "--journal", str(journal), "--state", str(state), home=tmp_path)
        assert retried.returncode == 0, retried.stderr
        assert retried.stdout == "re-delivered 1 dead letter(s)\n"
        with sqlite3.connect(database) as db:
            assert db.execute("SELECT filename, content FROM artifact").fetchall() == [("model.bin", b"weights")]
            assert db.execute("SELECT status FROM run").fetchall() == [("COMPLETED",)]  # nothing rolled back
            assert db.execute("SELECT applied_seq FROM runrelay_run").fetchall() == [(22,)]
        assert points(database) == 20
    finally:
        code, stderr = daemon.stop()
    assert code == 0, stderr
    assert "took dead letter 1" in stderr, stderr  # the daemon re-drove it, not the command


COMMANDS = [
    [], ["daemon"], ["sync"], ["status"], ["dlq"], ["dlq", "list"], ["dlq", "retry"], ["dlq", "drop"], ["demo"],
    ["journal"], ["journal", "ls"], ["journal", "cat"], ["journal", "verify"], ["exec"], ["watchdog"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: " ".join(command) or "runrelay")
def test_every_command_has_help_with_an_example(command, tmp_path):
    result = runrelay(*command, "--help", home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "example" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["sync", "--sink", "redis://localhost/0"], "no sink for 'redis://localhost/0' (known schemes:"),
    (["sync", "--journal", "/etc/hostname"], "the journal /etc/hostname is not a directory"),
    (["status", "--journal", "/nonexistent/journal"], "no journal at /nonexistent/journal"),
    (["dlq", "retry", "--all", "7"], "give dead letter ids or --all"),
    (["exec", "--name", "x"], "exec: give the command after --"),
    (["exec", "--config", "lr", "--", "true"], "exec: --config 'lr': expected KEY=VALUE"),
])
def test_user_errors_are_one_line_and_exit_2(args, message, tmp_path):
    result = runrelay(*args, home=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


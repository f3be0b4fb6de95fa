"""runrelay.durable(observer): the experiment feeds the observer, the daemon feeds the rest.

Real processes throughout: Sacred experiments in subprocesses, killed with SIGKILL; the
daemon as a process; the observers' own stores (TinyDB files, an HTTP server owned by the
test, a file of calls). Counts are of what the wrapped observer received.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from runrelay.eventlog import Journal, Kind
from test_daemon_process import Daemon, runrelay, wait_for

EXPERIMENTS = Path(__file__).parent / "experiments"
EXPERIMENT = EXPERIMENTS / "durable_experiment.py"
WAIT_SECONDS = 60.0  # a generous bound for what takes a second; never asserted on
KILLS = int(os.environ.get("RUNRELAY_DURABLE_KILLS", "10"))
ENV = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(EXPERIMENTS)}


def start_experiment(journal: Path, spec: str, *config: str, report_fd: int | None = None, **env: str):
    """The experiment as a process, beating every 0.2 s and capturing sys.stdout (Sacred's fd
    capture may miss the last lines); with ``report_fd``, it reports each call that returned."""
    assignments = [*config, *([f"report_fd={report_fd}"] if report_fd is not None else [])]
    return subprocess.Popen([sys.executable, str(EXPERIMENT), str(journal), spec, "--capture=sys", "--beat-interval=0.2", "with",
                             *assignments],
                            pass_fds=[report_fd] if report_fd is not None else [], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**ENV, **env})


def run_experiment(journal: Path, spec: str, *config: str, **env: str) -> str:
    process = start_experiment(journal, spec, *config, **env)
    _, stderr = process.communicate(timeout=WAIT_SECONDS)
    assert process.returncode == 0, stderr
    return stderr


def daemon_config(tmp_path: Path, sinks: dict[str, tuple[str, dict]]) -> Path:
    """A config file with one observer sink per name: (class as module:Class, its args)."""
    lines = [f'journal = "{tmp_path / "journal"}"', f'state = "{tmp_path / "state"}"', "[delivery]", "rescan_seconds = 0.2", "batch_wait_seconds = 0.01",
             "[retry]", "initial_seconds = 0.05", "max_seconds = 0.5", "[dead_runs]", "poll_seconds = 0.1"]
    for name, (target, args) in sinks.items():
        table = ", ".join(f"{key} = {json.dumps(value)}" for key, value in args.items())
        lines += [f"[sinks.{name}]", f'url = "observer://{target}"', f"args = {{ {table} }}"]
    path = tmp_path / "runrelay.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def start_daemon(tmp_path: Path, config: Path) -> Daemon:
    return Daemon(tmp_path / "journal", tmp_path / "state", RUNRELAY_CONFIG=str(config),
                  PYTHONPATH=str(EXPERIMENTS))


def fed_by_a_daemon(tmp_path: Path, sinks: dict[str, tuple[str, dict]], check, what: str):
    """Start a daemon with these observer sinks, wait for ``check``, stop it cleanly."""
    daemon = start_daemon(tmp_path, daemon_config(tmp_path, sinks))
    try:
        return wait_for(check, what)
    finally:
        code, log = daemon.stop()
        assert code == 0, log


def plain_and_wrapped(tmp_path: Path, kind: str, drain: str) -> tuple[Path, Path]:
    """One run of the experiment with Sacred's observer alone, one with it wrapped."""
    plain, wrapped = tmp_path / "plain", tmp_path / "wrapped"
    config = ("seed=7", "steps=12", f"workdir={tmp_path}")
    run_experiment(tmp_path / "unused", f"plain-{kind}:{plain}", *config)
    run_experiment(tmp_path / "journal", f"{kind}:{wrapped}", *config, RUNRELAY_TEST_DRAIN=drain)
    return plain, wrapped


def calls(path: Path) -> list[dict]:
    """The calls the observer logged, but for a line still being written."""
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]


def tinydb_runs(path: Path) -> list[dict]:
    from sacred.observers import TinyDbReader

    return TinyDbReader(str(path)).runs.all()


def comparable(run: dict) -> dict:
    """A TinyDB run without what differs between two runs of one experiment: ids, times,
    the Sacred run id in the captured output, file handles (their content is compared)."""
    def file_entry(entry):
        *names, md5, handle = entry
        return [*(os.path.basename(name) for name in names), md5, handle.read()]

    run = dict(run)
    for key in ("_id", "start_time", "stop_time", "heartbeat"):
        run.pop(key)
    run["captured_out"] = "\n".join(line for line in run["captured_out"].splitlines() if "run with ID" not in line)
    run["experiment"] = {**run["experiment"], "sources": [file_entry(s) for s in run["experiment"]["sources"]]}
    run["artifacts"] = [file_entry(a) for a in run["artifacts"]]
    return run


# --- TinyDbObserver ------------------------------------------------------------------------


@pytest.mark.parametrize("drain", ["5", "0"], ids=["fed_in_process", "fed_by_the_daemon"])
def test_a_completed_run_reads_as_the_plain_tinydb_observer_writes_it(tmp_path, drain):
    plain, wrapped = plain_and_wrapped(tmp_path, "tinydb", drain)
    fed_by_a_daemon(tmp_path, {"TinyDbObserver": ("sacred.observers:TinyDbObserver", {"path": str(wrapped)})},
                    lambda: [run for run in tinydb_runs(wrapped) if run["status"] == "COMPLETED"], "the completed run")
    [expected], [got] = tinydb_runs(plain), tinydb_runs(wrapped)
    assert comparable(got) == comparable(expected)
    assert [name for name, *_ in got["artifacts"]] == ["model-0.txt", "model-5.txt", "model-10.txt"]


def killed_mid_run(tmp_path: Path, spec: str) -> list[str]:
    """The experiment killed once it has journaled five artifacts; what it had reported."""
    read_fd, write_fd = os.pipe()
    process = start_experiment(tmp_path / "journal", spec, "steps=100000", "artifact_every=3", "pause=0.002",
                               f"workdir={tmp_path}", report_fd=write_fd)
    os.close(write_fd)
    with os.fdopen(read_fd) as reports:
        reported = []
        while len([line for line in reported if line.startswith("artifact")]) < 5:
            reported.append(reports.readline())
        time.sleep(random.uniform(0, 0.3))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=WAIT_SECONDS)
        reported += reports.read().splitlines(keepends=True)
    return reported


def test_a_killed_run_reaches_tinydb_with_every_artifact_that_had_returned(tmp_path):
    database = tmp_path / "runs_db"
    reported = killed_mid_run(tmp_path, f"tinydb:{database}")
    artifacts = [line.split()[1] for line in reported if line.startswith("artifact")]
    [run] = fed_by_a_daemon(tmp_path, {"TinyDbObserver": ("sacred.observers:TinyDbObserver", {"path": str(database)})},
                            lambda: [run for run in tinydb_runs(database) if run["status"] == "DIED"], "the dead run")
    stored = {name: handle.read().decode() for name, _, _, handle in run["artifacts"]}
    assert set(artifacts) <= set(stored)
    assert all(stored[name] == f"weights at step {name[6:-4]}\n" for name in stored)
    # None twice, but for the call in flight at the kill (TinyDB stored it, the record had not
    # been saved yet: the daemon feeds it again) — the window docs/durable.md states.
    assert len(run["artifacts"]) - len(stored) <= 1
    [uid] = Journal(tmp_path / "journal").runs()
    beats = [event.body for event in Journal(tmp_path / "journal").events(uid) if event.kind is Kind.HEARTBEAT]
    assert run["info"] == (beats[-1]["info"] if beats else {})  # the last beat that had returned


# --- user-written observers ------------------------------------------------------------------


class Webhook:
    """A local HTTP server that records each JSON body posted to it."""

    def __init__(self, port: int = 0):
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_webhook_gets_each_completion_once_across_a_daemon_restart(tmp_path):
    hook = Webhook()
    config = daemon_config(tmp_path, {"WebhookObserver": ("durable_observers:WebhookObserver", {"url": hook.url})})
    try:
        daemon = start_daemon(tmp_path, config)
        run_experiment(tmp_path / "journal", f"webhook:{hook.url}", "seed=1", "steps=3", RUNRELAY_TEST_DRAIN="0")
        wait_for(lambda: hook.received, "the first completion")
        assert daemon.stop()[0] == 0
        run_experiment(tmp_path / "journal", f"webhook:{hook.url}", "seed=2", "steps=3", RUNRELAY_TEST_DRAIN="0")
        run_experiment(tmp_path / "journal", f"webhook:{hook.url}", "seed=3", "steps=3")  # fed in process
        daemon = start_daemon(tmp_path, config)
        wait_for(lambda: len(hook.received) >= 3, "the other completions")
        assert daemon.stop()[0] == 0
        daemon = start_daemon(tmp_path, config)  # and again: nothing is sent twice
        time.sleep(1)
        assert daemon.stop()[0] == 0
    finally:
        hook.close()
    assert sorted(post["run"] for post in hook.received) == ["durable-1", "durable-2", "durable-3"]
    assert all(post["result"] == 3 for post in hook.received)


def test_a_backend_down_at_start_fails_nothing_and_gets_the_run_once_it_is_up(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"  # nothing listens there yet
    stderr = run_experiment(tmp_path / "journal", f"webhook:{url}", "seed=4", "steps=3", RUNRELAY_TEST_DRAIN="1")
    assert "Completed after" in stderr
    daemon = start_daemon(tmp_path, daemon_config(tmp_path, {
        "WebhookObserver": ("durable_observers:WebhookObserver", {"url": url})}))
    try:
        time.sleep(0.5)  # the daemon tries, and is refused
        hook = Webhook(port)
        try:
            wait_for(lambda: hook.received, "the completion")
        finally:
            hook.close()
    finally:
        assert daemon.stop()[0] == 0
    assert hook.received == [{"run": "durable-4", "result": 3}]


def test_an_event_the_observer_always_refuses_is_a_dead_letter_and_the_rest_arrives(tmp_path):
    log = tmp_path / "calls.jsonl"
    daemon = start_daemon(tmp_path, daemon_config(tmp_path, {
        "RaisingObserver": ("durable_observers:RaisingObserver", {"path": str(log)})}))
    try:
        run_experiment(tmp_path / "journal", f"raising:{log}", "steps=20", "poison_at=7", f"workdir={tmp_path}")
        wait_for(lambda: [call for call in calls(log) if call["call"] == "completed"], "the completion")
        letters = json.loads(runrelay("dlq", "list", "--json", "--config", str(tmp_path / "runrelay.toml"),
                                      home=tmp_path, PYTHONPATH=str(EXPERIMENTS)).stdout)
    finally:
        assert daemon.stop()[0] == 0
    assert [(letter["kind"], letter["reason"].split(":")[0]) for letter in letters] == [
        ("artifact", "RaisingObserver.artifact_event raised ValueError")]
    got = calls(log)
    assert sorted(call["name"] for call in got if call["call"] == "artifact") == [
        "model-0.txt", "model-10.txt", "model-15.txt", "model-5.txt"]
    assert sorted(step for call in got if call["call"] == "metrics" for _, step in call["points"]) == list(range(20))


def kill_and_count(tmp_path: Path, log: Path, attempt: int, rng: random.Random) -> tuple[bool, int, int]:
    """One experiment killed at a random point while the daemon runs; every call that had
    returned reaches the observer, and no event twice except those of one call in flight.
    Whether both fed the run (the experiment first, the daemon after), how many starts, metric
    points and artifacts were fed in all, how many of them twice."""
    read_fd, write_fd = os.pipe()
    process = start_experiment(tmp_path / "journal", f"counting:{log}", "steps=100000", "artifact_every=4",
                               f"pause={rng.choice([0, 0.001, 0.005])}", f"workdir={tmp_path}", f"seed={attempt}",
                               report_fd=write_fd)
    os.close(write_fd)
    with os.fdopen(read_fd) as reports:
        reported = [reports.readline()]  # under way
        time.sleep(rng.uniform(0, 1.0))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=WAIT_SECONDS)
        reported += reports.read().splitlines()

    def starts():
        return [call for call in calls(log) if call["call"] == "started" and call["config"]["seed"] == attempt]

    def verdict():  # the observer's run id is its own: a run of this attempt that got its verdict
        ids = {call["run"] for call in starts()}
        return [call for call in calls(log) if call["run"] in ids and call["call"] == "interrupted"]

    [ended] = wait_for(verdict, "the dead run's verdict")
    run, started = ended["run"], starts()
    if len(started) == 2:  # started_event was the call in flight: the experiment's, then the daemon's
        orphan = started[0]
        assert orphan["pid"] == process.pid and started[1]["pid"] != process.pid, attempt
        assert [call for call in calls(log) if call["run"] == orphan["run"]] == [orphan], attempt
    assert len(started) in (1, 2) and started[-1]["run"] == run, attempt
    got = [call for call in calls(log) if call["run"] == run]
    metrics = [(call["pid"], tuple(point)) for call in got if call["call"] == "metrics" for point in call["points"]]
    artifacts = [(call["pid"], call["name"]) for call in got if call["call"] == "artifact"]
    total, repeated = len(started), len(started) - 1
    for kind, items in (("metric", metrics), ("artifact", artifacts)):
        fed = [item for _, item in items]
        total += len(fed)
        returned = {tuple(line.split()[1:]) if kind == "metric" else line.split()[1]
                    for line in reported if line.startswith(kind)}
        returned = {(name, int(step)) for name, step in returned} if kind == "metric" else returned
        fed = [(name, int(step)) for name, step in fed] if kind == "metric" else fed
        assert returned <= set(fed), (attempt, kind, sorted(returned - set(fed))[:5])
        twice = {item for item in fed if fed.count(item) > 1}
        repeated += len(twice)
        assert all(fed.count(item) == 2 for item in twice), attempt
        if twice:  # fed by the experiment, then again by the daemon: one call was in flight
            in_process = [call for call in got if call["pid"] == process.pid and call["call"] in ("metrics", "artifact")]
            last = in_process[-1]
            last_items = ({(name, step) for name, step in last.get("points", [])} if kind == "metric"
                          else {last.get("name")})
            assert twice <= last_items, (attempt, kind, sorted(twice)[:5])
    assert [call["call"] for call in got].count("started") == 1
    assert [call["status"] for call in got if call["call"] == "interrupted"] == ["DIED"]
    feeders = [call["pid"] for call in got]
    assert feeders == sorted(feeders, key=lambda pid: pid != process.pid)  # never the experiment after the daemon
    return len(set(feeders)) == 2, total, repeated


def hand_off(tmp_path: Path, kills: int) -> None:
    log = tmp_path / "calls.jsonl"
    daemon = start_daemon(tmp_path, daemon_config(tmp_path, {
        "CountingObserver": ("durable_observers:CountingObserver", {"path": str(log)})}))
    rng = random.Random(1234)
    try:
        outcomes = [kill_and_count(tmp_path, log, attempt, rng) for attempt in range(kills)]
    finally:
        assert daemon.stop()[0] == 0
    handed_over = sum(both for both, _, _ in outcomes)
    print(f"{kills} kills: {handed_over} handed over mid-feed; {sum(total for _, total, _ in outcomes)} starts, metric "
          f"points and artifacts fed, {sum(repeated for _, _, repeated in outcomes)} of them twice (the call in flight)")
    assert handed_over >= kills // 2  # most kills come mid-run, with the experiment feeding


def test_kill_9_at_random_points_hands_every_event_over_once(tmp_path):
    hand_off(tmp_path, KILLS)


@pytest.mark.slow
def test_kill_9_at_a_hundred_random_points_hands_every_event_over_once(tmp_path):
    hand_off(tmp_path, max(KILLS, 100))


# --- FileStorageObserver ------------------------------------------------------------------------


def run_files(run_dir: Path) -> dict:
    """A FileStorage run directory without what differs between two runs of one experiment."""
    files = {path.relative_to(run_dir).as_posix(): path.read_text() for path in run_dir.rglob("*") if path.is_file()}
    run = json.loads(files.pop("run.json"))
    for key in ("start_time", "stop_time", "heartbeat"):
        run.pop(key)
    files["cout.txt"] = "\n".join(line for line in files["cout.txt"].splitlines() if "run with ID" not in line)
    metrics = json.loads(files.pop("metrics.json"))
    return {**files, "run.json": run, "metrics.json": {name: (series["steps"], series["values"])
                                                       for name, series in metrics.items()}}


@pytest.mark.parametrize("drain", ["5", "0"], ids=["fed_in_process", "fed_by_the_daemon"])
def test_a_completed_run_reads_as_the_plain_file_storage_observer_writes_it(tmp_path, drain):
    plain, wrapped = plain_and_wrapped(tmp_path, "filestorage", drain)
    fed_by_a_daemon(tmp_path, {"FileStorageObserver": ("sacred.observers:FileStorageObserver",
                                                       {"basedir": str(wrapped)})},
                    lambda: "COMPLETED" in (wrapped / "1" / "run.json").read_text(), "the completed run")
    expected, got = run_files(plain / "1"), run_files(wrapped / "1")
    assert got == expected
    assert {"model-0.txt", "model-5.txt", "model-10.txt", "info.json"} <= set(got)
    assert sorted(os.listdir(wrapped / "_sources")) == sorted(os.listdir(plain / "_sources"))


def test_a_killed_run_reaches_file_storage_with_every_metric_and_artifact_that_had_returned(tmp_path):
    basedir = tmp_path / "runs"
    reported = killed_mid_run(tmp_path, f"filestorage:{basedir}")
    fed_by_a_daemon(tmp_path, {"FileStorageObserver": ("sacred.observers:FileStorageObserver",
                                                       {"basedir": str(basedir)})},
                    lambda: '"DIED"' in (basedir / "1" / "run.json").read_text(), "the dead run")
    run = json.loads((basedir / "1" / "run.json").read_text())
    artifacts = [line.split()[1] for line in reported if line.startswith("artifact")]
    assert set(artifacts) <= set(run["artifacts"])
    assert all((basedir / "1" / name).read_text() == f"weights at step {name[6:-4]}\n" for name in run["artifacts"])
    steps = json.loads((basedir / "1" / "metrics.json").read_text())["loss"]["steps"]
    returned = {int(line.split()[2]) for line in reported if line.startswith("metric")}
    assert returned <= set(steps)
    twice = sorted(step for step in set(steps) if steps.count(step) > 1)
    # none twice but one stretch of points: the log_metrics call in flight at the kill
    assert all(steps.count(step) == 2 for step in twice)
    assert twice == (list(range(twice[0], twice[-1] + 1)) if twice else []), twice
    assert len(run["artifacts"]) - len(set(run["artifacts"])) <= 1  # or the artifact call in flight


# --- SqlObserver ---------------------------------------------------------------------------------


def sql_runs(url: str) -> list[dict]:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as db:
            runs = [dict(row._mapping) for row in db.execute(sa.text("SELECT * FROM run"))]
            for run in runs:
                run["artifacts"] = sorted(row[0] for row in db.execute(sa.text(
                    "SELECT filename FROM artifact WHERE run_id = :id"), {"id": run["run_id"]}))
            return runs
    except (sa.exc.ProgrammingError, sa.exc.OperationalError):  # no tables yet
        return []
    finally:
        engine.dispose()


def comparable_sql_run(run: dict) -> dict:
    """A SqlObserver run row without what differs between two runs: ids, times, the Sacred
    run id in the captured output."""
    run = {key: value for key, value in run.items() if key not in ("id", "run_id") and not key.endswith("_time")
           and key != "heartbeat"}
    run["captured_out"] = "\n".join(line for line in run["captured_out"].splitlines() if "run with ID" not in line)
    return run


@pytest.mark.parametrize("drain", ["5", "0"], ids=["fed_in_process", "fed_by_the_daemon"])
def test_a_completed_run_reads_as_the_plain_sql_observer_writes_it(tmp_path, drain):
    plain, wrapped = f"sqlite:///{tmp_path / 'plain.sqlite'}", f"sqlite:///{tmp_path / 'wrapped.sqlite'}"
    config = ("seed=7", "steps=12", f"workdir={tmp_path}")
    run_experiment(tmp_path / "unused", f"plain-sql:{plain}", *config)
    run_experiment(tmp_path / "journal", f"sql:{wrapped}", *config, RUNRELAY_TEST_DRAIN=drain)
    fed_by_a_daemon(tmp_path, {"SqlObserver": ("sacred.observers:SqlObserver", {"url": wrapped})},
                    lambda: [run for run in sql_runs(wrapped) if run["status"] == "COMPLETED"], "the completed run")
    [expected], [got] = sql_runs(plain), sql_runs(wrapped)
    assert comparable_sql_run(got) == comparable_sql_run(expected)
    assert got["artifacts"] == ["model-0.txt", "model-10.txt", "model-5.txt"]


def test_a_killed_run_reaches_the_sql_observer_with_every_artifact_that_had_returned(tmp_path):
    url = f"sqlite:///{tmp_path / 'runs.sqlite'}"
    reported = killed_mid_run(tmp_path, f"sql:{url}")
    [run] = fed_by_a_daemon(tmp_path, {"SqlObserver": ("sacred.observers:SqlObserver", {"url": url})},
                            lambda: [run for run in sql_runs(url) if run["status"] == "DIED"], "the dead run")
    artifacts = [line.split()[1] for line in reported if line.startswith("artifact")]
    assert set(artifacts) <= set(run["artifacts"])
    assert len(run["artifacts"]) - len(set(run["artifacts"])) <= 1  # or the artifact call in flight


def test_sql_observer_on_a_database_down_at_start_gets_the_run_once_it_is_up(tmp_path, postgres_server,
                                                                           postgres_url):
    postgres_server.stop()
    try:
        stderr = run_experiment(tmp_path / "journal", f"sql:{postgres_url}", "steps=12", f"workdir={tmp_path}",
                                RUNRELAY_TEST_DRAIN="1")
        assert "Completed after" in stderr
        daemon = start_daemon(tmp_path, daemon_config(tmp_path, {
            "SqlObserver": ("sacred.observers:SqlObserver", {"url": postgres_url})}))
    finally:
        postgres_server.start()
    try:
        [run] = wait_for(lambda: [run for run in sql_runs(postgres_url) if run["status"] == "COMPLETED"],
                         "the completed run")
    finally:
        code, log = daemon.stop()
        assert code == 0, log
    assert json.loads(run["info"]) == {"step": 11} and run["result"] == 12
    assert run["artifacts"] == ["model-0.txt", "model-10.txt", "model-5.txt"]
    assert "step 11" in run["captured_out"]

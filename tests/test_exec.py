"""`runrelay exec`: real commands as runs, delivered into SQLite with `runrelay sync`."""

from __future__ import annotations

import json
import re
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from runrelay.eventlog import Journal, Kind
from runrelay.eventlog.command import ConfigProblem, RunJournal, _Protocol, _RunState, build_config
from runrelay.eventlog.fold import fold
from runrelay.eventlog.lineproto import MAX_LINE_BYTES, File, Info, Metric, ProtocolError, Result, Sync, parse_line
from runrelay.eventlog.writer import writer_alive

WAIT_SECONDS = 60.0  # a bound for things that take milliseconds; never asserted on


class Place:
    """A journal and a SQLite sink in one temp dir, driven by the CLI as a user drives it."""

    def __init__(self, root: Path):
        self.root = root
        self.journal = root / "journal"
        self.database = root / "runs.sqlite"
        self.env = {"RUNRELAY_HOME": str(root), "PATH": os.environ["PATH"]}

    def exec_args(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "runrelay.daemon.cli", "exec", "--journal", str(self.journal), *args]

    def exec(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.exec_args(*args), capture_output=True, text=True, env=self.env,
                              cwd=self.root, timeout=WAIT_SECONDS)

    def start(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(self.exec_args(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.env, cwd=self.root)

    def sync(self) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "runrelay.daemon.cli", "sync", "--no-progress", "--journal", str(self.journal),
             "--state", str(self.root / "state"), "--sink", f"sqlite:///{self.database}"],
            capture_output=True, text=True, env=self.env, timeout=WAIT_SECONDS)
        assert result.returncode == 0, result.stderr

    def run_uid(self) -> str:
        (run,) = Journal(self.journal).runs()
        return run

    def state(self):
        journal = Journal(self.journal)
        return fold(list(journal.events(self.run_uid())))

    def query(self, sql: str) -> list[tuple]:
        with sqlite3.connect(self.database) as db:
            return db.execute(sql).fetchall()

    def script(self, name: str, text: str) -> Path:
        path = self.root / name
        path.write_text(textwrap.dedent(text))
        path.chmod(0o755)
        return path


@pytest.fixture
def place(tmp_path):
    return Place(tmp_path)


def wait_for_file(path: Path) -> str:
    deadline = time.monotonic() + WAIT_SECONDS
    while not (path.exists() and path.read_text().endswith("\n")):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)
    return path.read_text().strip()


RECORDER_SCRIPT = """\
import os
from runrelay import Recorder

with Recorder.start(config={"from_script": True}, heartbeat_seconds=0.05) as run:
    print("training", os.environ["RUNRELAY_RUN"] == run.uid)
    for step in range(5):
        run.log_metric("loss", 1.0 / (step + 1))
    run.log_metric("acc", float("nan"))
    with open("model.bin", "wb") as model:
        model.write(b"weights")
    run.add_artifact("model.bin")
    os.remove("model.bin")  # copied by the wrapper before add_artifact returned
    run.info["epochs"] = 5
    run.result = 0.75
"""


def test_a_python_script_using_the_recorder_arrives_in_sqlite(place):
    place.script("train.py", RECORDER_SCRIPT)
    result = place.exec("--config", "lr=0.01", "--config", "model.layers=[64, 32]", "--name", "mnist",
                        "--", sys.executable, "train.py")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "training True\n"  # teed unchanged
    place.sync()
    assert place.query("SELECT status, result, captured_out FROM run") == [("COMPLETED", 0.75, "training True\n")]
    (config, info), = place.query("SELECT config, info FROM run")
    assert json.loads(config) == {"lr": 0.01, "model": {"layers": [64, 32]}}
    assert json.loads(info) == {"epochs": 5, "recorder_config": {"from_script": True}}
    assert place.query("SELECT name FROM experiment") == [("mnist",)]
    assert place.query("SELECT name, step, value, nonfinite FROM metric ORDER BY name, step") == [
        ("acc", 0, None, "nan"), *[("loss", step, 1.0 / (step + 1), None) for step in range(5)]]
    assert place.query("SELECT filename, content FROM artifact") == [("model.bin", b"weights")]
    state = place.state()
    assert len(Journal(place.journal).runs()) == 1  # the script's Recorder opened no second run
    assert state.process["pid"] != os.getpid()  # the wrapper's own process


PROTOCOL_SCRIPT = """\
#!/bin/sh
echo "to stdout"
echo "metric loss 0.5" >&"$RUNRELAY_FD"
echo "metric loss 0.25" >&"$RUNRELAY_FD"
echo "metric 'val acc' 0.9 100" >&"$RUNRELAY_FD"
echo "metric loss not-a-number" >&"$RUNRELAY_FD"
echo "teleport now" >&"$RUNRELAY_FD"
printf 'metric \\377 1\\n' >&"$RUNRELAY_FD"
echo "info note '\\"first try\\"'" >&"$RUNRELAY_FD"
echo "info broken {" >&"$RUNRELAY_FD"
echo "result 0.5" >&"$RUNRELAY_FD"
echo "weights" > model.bin
echo "artifact model.bin" >&"$RUNRELAY_FD"
echo "artifact /dev/zero" >&"$RUNRELAY_FD"
echo "artifact missing.bin" >&"$RUNRELAY_FD"
echo "artifact /proc/self/mem" >&"$RUNRELAY_FD"
echo "sync 1" >&"$RUNRELAY_FD"
read -r reply <&"$RUNRELAY_FD"
echo "reply: $reply"
echo "log line" > out.log
echo "something went wrong" >&2
{ printf 'info big "'; head -c 1000000 /dev/zero | tr '\\0' a; echo; } >&"$RUNRELAY_FD"
{ head -c 1100000 /dev/zero | tr '\\0' a; echo; } >&"$RUNRELAY_FD"
printf 'metric last 1' >&"$RUNRELAY_FD"
exit 3
"""


def test_a_shell_script_using_the_protocol_arrives_in_sqlite_and_bad_lines_are_skipped(place):
    place.script("train.sh", PROTOCOL_SCRIPT)
    result = place.exec("--artifact", "*.log", "--", "./train.sh")
    assert result.returncode == 3  # the command's own status
    assert result.stdout == "to stdout\nreply: ok 1\n"
    skipped = [line for line in result.stderr.splitlines() if "skipped" in line]
    assert len(skipped) == 8, result.stderr
    assert "not a number" in skipped[0] and "unknown message 'teleport'" in skipped[1]
    assert "not UTF-8" in skipped[2] and "not JSON" in skipped[3]
    assert "/dev/zero is not a regular file" in skipped[4] and "missing.bin" in skipped[5]
    assert "an unclosed quote" in skipped[6] and "longer than 1048576 bytes" in skipped[7]
    assert "Traceback" not in result.stderr
    assert re.search(r"artifact not kept: run \S+: could not store '/proc/self/mem'", result.stderr)  # a read fails
    place.sync()
    (status, out, info, run_result), = place.query("SELECT status, captured_out, info, result FROM run")
    assert status == "FAILED" and run_result == 0.5
    assert place.state().fail_trace[-2:] == ("something went wrong\n", "exited with status 3\n")
    assert out.startswith("to stdout\n") and "something went wrong\n" in out
    assert json.loads(info) == {"note": "first try"}
    assert place.query("SELECT name, step, value FROM metric ORDER BY name, step") == [
        ("last", 0, 1.0), ("loss", 0, 0.5), ("loss", 1, 0.25), ("val acc", 100, 0.9)]
    assert sorted(place.query("SELECT filename, content FROM artifact")) == [
        ("model.bin", b"weights\n"), ("out.log", b"log line\n")]


SLEEPER = """\
#!/bin/sh
{trap}
echo alive
echo "metric loss 1" >&"$RUNRELAY_FD"
echo $$ > pid
while :; do sleep 0.05; done
"""


def test_kill_9_of_the_command_fails_the_run_naming_the_signal(place):
    place.script("sleeper.sh", SLEEPER.format(trap=""))
    wrapper = place.start("--", "./sleeper.sh")
    os.kill(int(wait_for_file(place.root / "pid")), signal.SIGKILL)
    assert wrapper.wait(WAIT_SECONDS) == 128 + signal.SIGKILL
    place.sync()
    assert place.query("SELECT status FROM run") == [("FAILED",)]
    assert place.state().fail_trace[-1] == "killed by signal SIGKILL (9)\n"
    assert place.query("SELECT value FROM metric") == [(1.0,)]


def test_sigterm_to_the_wrapper_is_passed_on_and_interrupts_the_run(place):
    place.script("sleeper.sh", SLEEPER.format(trap=""))
    wrapper = place.start("--", "./sleeper.sh")
    wait_for_file(place.root / "pid")
    wrapper.send_signal(signal.SIGTERM)
    assert wrapper.wait(WAIT_SECONDS) == 128 + signal.SIGTERM
    place.sync()
    assert place.query("SELECT status FROM run") == [("SIGTERM",)]


def test_a_command_that_ignores_sigterm_is_killed_after_the_grace_time(place):
    place.script("stubborn.sh", SLEEPER.format(trap="trap '' TERM"))
    wrapper = place.start("--kill-after", "0.2", "--", "./stubborn.sh")
    wait_for_file(place.root / "pid")
    wrapper.send_signal(signal.SIGTERM)
    assert wrapper.wait(WAIT_SECONDS) == 128 + signal.SIGKILL
    assert "outlived SIGTERM by 0.2 s; sending SIGKILL" in wrapper.stderr.read()
    assert place.state().status == "SIGTERM"  # stopped on request: interrupted, not failed


def test_kill_9_of_the_wrapper_leaves_the_run_without_an_ending_and_its_lock_free(place):
    place.script("sleeper.sh", SLEEPER.format(trap=""))
    wrapper = place.start("--heartbeat", "0.05", "--", "./sleeper.sh")
    child = int(wait_for_file(place.root / "pid"))
    try:
        run_dir = Journal(place.journal).run_dir(place.run_uid())
        assert writer_alive(run_dir)
        deadline = time.monotonic() + WAIT_SECONDS
        while place.state().captured_out != "alive\n":  # journaled by the wrapper's heartbeats, mid-run
            assert time.monotonic() < deadline, "no heartbeat carried the output"
            time.sleep(0.02)
        wrapper.kill()
        wrapper.wait(WAIT_SECONDS)
        assert not writer_alive(run_dir)  # the command, still running, never held the lock
        os.kill(child, 0)
    finally:
        os.kill(child, signal.SIGKILL)
    state = place.state()
    assert state.status == "RUNNING" and state.process["pid"] == wrapper.pid


def test_without_a_usable_journal_the_command_still_runs_and_its_status_comes_back(place):
    place.journal.write_text("not a directory")
    place.script("job.sh", "#!/bin/sh\necho metric loss 1 >&\"$RUNRELAY_FD\"\necho done\nexit 4\n")
    result = place.exec("--", "./job.sh")
    assert result.returncode == 4 and result.stdout == "done\n"
    assert "cannot journal this run" in result.stderr and "running the command unrecorded" in result.stderr


def test_a_command_that_cannot_be_found_exits_127_and_fails_the_run(place):
    result = place.exec("--", "./no-such-command")
    assert result.returncode == 127
    assert "cannot run './no-such-command'" in result.stderr
    state = place.state()
    assert state.status == "FAILED" and "No such file" in state.fail_trace[0]


def test_a_python_script_killed_by_sigint_is_interrupted(place):
    place.script("loop.py", "import os, time\nopen('pid', 'w').write(f'{os.getpid()}\\n')\ntime.sleep(60)\n")
    wrapper = place.start("--", sys.executable, "loop.py")
    os.kill(int(wait_for_file(place.root / "pid")), signal.SIGINT)
    assert wrapper.wait(WAIT_SECONDS) == 128 + signal.SIGINT
    state = place.state()
    assert state.status == "INTERRUPTED" and [e.kind for e in Journal(place.journal).events(place.run_uid())][-1] \
        is Kind.INTERRUPTED


@pytest.mark.parametrize("line, message", [
    (b"metric loss 0.5 3", Metric("loss", 0.5, 3)),
    (b"metric 'a b' 7", Metric("a b", 7, None)),
    (b"metric x -inf", Metric("x", float("-inf"), None)),
    (b"metric x " + b"9" * 30, Metric("x", 1e30, None)),
    (b"artifact out/m.pt model.pt", File(Kind.ARTIFACT, "out/m.pt", "model.pt")),
    (b"resource data.csv", File(Kind.RESOURCE, "data.csv", None)),
    (b"info best '{\"epoch\": 3}'", Info("best", {"epoch": 3})),
    (b"result 0.9", Result(0.9)),
    (b"sync 12", Sync("12")),
    (b"   ", None),
])
def test_protocol_lines_parse(line, message):
    assert parse_line(line) == message


@pytest.mark.parametrize("line, reason", [
    (b"metric loss", "metric takes 2 to 3 word(s), got 1"),
    (b"metric loss 1 2.5", "is not a 64-bit integer"),
    (b"metric loss 1 99999999999999999999", "is not a 64-bit integer"),
    (b"metric loss 1e", "is not a number"),
    (b"metric '' 1", "metric name must be"),
    (b"metric 'a\tb' 1", "metric name must be"),
    (b"metric 'unclosed 1", "cannot split into words"),
    (b"artifact x ../etc", "is not a plain file name"),
    (b"info k " + b"[" * 100000, "not JSON"),
    (b"\xff", "not UTF-8"),
    (b"drop table", "unknown message 'drop'"),
])
def test_bad_protocol_lines_are_refused_with_the_reason(line, reason):
    with pytest.raises(ProtocolError, match=None) as refused:
        parse_line(line)
    assert reason in str(refused.value)


def test_config_from_files_then_assignments(tmp_path):
    (tmp_path / "c.json").write_text('{"lr": 0.1, "model": {"layers": 2, "act": "relu"}}')
    (tmp_path / "c.toml").write_text('seed = 1\n[model]\nlayers = 3\n')
    config = build_config([tmp_path / "c.json", tmp_path / "c.toml"], ["model.layers=4", "name=run a", "x=[1]"])
    assert config == {"lr": 0.1, "seed": 1, "model": {"layers": 4, "act": "relu"}, "name": "run a", "x": [1]}
    for files, assignments, problem in [
        ([], ["novalue"], "expected KEY=VALUE"), ([], ["lr=1", "lr.x=2"], "lr is already a value"),
        ([tmp_path / "missing.json"], [], "No such file"), ([tmp_path / "c.toml.json"], [], "No such file"),
    ]:
        with pytest.raises(ConfigProblem, match=problem):
            build_config(files, assignments)
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ConfigProblem, match="not an object"):
        build_config([tmp_path / "list.json"], [])


def test_sigint_to_the_wrapper_reaches_a_python_script_once_and_interrupts_the_run(place):
    place.script("loop.py", """\
        import os, time
        open("pid", "w").write(f"{os.getpid()}\\n")
        try:
            time.sleep(60)
        except KeyboardInterrupt:
            print("cleaning up", flush=True)
            time.sleep(0.2)  # a second interrupt would land here
            print("cleaned up", flush=True)
            raise
        """)
    wrapper = place.start("--", sys.executable, "loop.py")
    wait_for_file(place.root / "pid")
    wrapper.send_signal(signal.SIGINT)
    assert wrapper.wait(WAIT_SECONDS) == 128 + signal.SIGINT
    assert wrapper.stdout.read() == "cleaning up\ncleaned up\n"
    state = place.state()
    assert state.status == "INTERRUPTED" and state.captured_out.startswith("cleaning up\ncleaned up\n")


@pytest.mark.parametrize("chunk", [64 * 1024, 4 * MAX_LINE_BYTES], ids=["in reads", "in one read"])
def test_an_over_long_line_is_skipped_however_it_arrives(chunk, capsys):
    state = _RunState()
    protocol = _Protocol(None, RunJournal(None), state)
    data = b"result 1\n" + b"a" * (MAX_LINE_BYTES + 10) + b"\nresult 2\ninfo k\n"
    for start in range(0, len(data), chunk):
        protocol.feed(data[start:start + chunk])
    protocol.feed(b"")
    assert state.result == 2
    assert capsys.readouterr().err.splitlines() == [
        f"runrelay exec: protocol line 2 skipped: longer than {MAX_LINE_BYTES} bytes: {b'a' * 80!r}",
        "runrelay exec: protocol line 4 skipped: info takes 2 word(s), got 1: b'info k'"]

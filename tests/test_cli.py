"""The `runrelay` command as a user runs it: the journal commands, the shared options, the demo."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import runrelay as runrelay_package
from runrelay.eventlog import JournalWriter, Kind

RUNRELAY = str(Path(sys.executable).parent / "runrelay")
FIXTURES = Path(__file__).parent / "fixtures" / "journal"
FIXTURE_RUN = "0190a1b2-c3d4-7e5f-8a6b-7c8d9e0f1a2b"


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """A fresh $RUNRELAY_HOME, and no other runrelay setting from the environment."""
    for name in [name for name in os.environ if name.startswith("RUNRELAY_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("RUNRELAY_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def runrelay(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([RUNRELAY, *args], capture_output=True, text=True, timeout=60)


def make_run(journal_dir) -> str:
    with JournalWriter.create(journal_dir) as writer:
        writer.append(Kind.STARTED, {"config": {"lr": 0.1}})
        writer.append(Kind.METRICS, {"name": "loss", "step": 0, "value": math.nan, "timestamp": None})
        writer.append(Kind.COMPLETED, {"result": 3})
    return writer.run


def test_cat_prints_one_json_object_per_event(journal_dir):
    run = make_run(journal_dir)
    done = runrelay("journal", "cat", run[:13], "--journal", str(journal_dir))
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(e["seq"], e["kind"]) for e in lines] == [(0, "started"), (1, "metrics"), (2, "completed")]
    assert set(lines[0]) == {"run", "seq", "kind", "time", "body"} and lines[0]["run"] == run
    assert lines[0]["time"].endswith("+00:00") and math.isnan(lines[1]["body"]["value"])


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_a_state_lock_that_is_not_a_file_is_refused_in_one_line(journal_dir, tmp_path, kind):
    make_run(journal_dir)
    state = tmp_path / "state"
    state.mkdir()
    outside = tmp_path / "outside"
    outside.write_text("untouched")
    if kind == "fifo":
        os.mkfifo(state / "delivery.lock")  # opening it for reading would hang without O_NONBLOCK
    else:
        (state / "delivery.lock").symlink_to(outside)
    options = ["--journal", str(journal_dir), "--state", str(state)]
    done = runrelay("sync", *options, "--sink", f"sqlite:///{tmp_path / 'runs.db'}", "--no-progress")
    word = "a FIFO" if kind == "fifo" else "a symlink"
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"delivery.lock is {word}, not a regular file" in done.stderr
    assert outside.read_text() == "untouched"  # never written through the link
    assert runrelay("status", *options, "--json").returncode in (0, 1)  # and status does not hang on it


def test_ls_lists_runs_with_status(journal_dir):
    run = make_run(journal_dir)
    done = runrelay("journal", "ls", "--json", "--journal", str(journal_dir))
    assert json.loads(done.stdout) == {"run": run, "status": "COMPLETED", "events": 3, "malformed": 0, "journal": "ok"}
    listed = runrelay("journal", "ls", "--journal", str(journal_dir))
    assert listed.stdout.split() == [run, "COMPLETED", "3", "events"]


def test_ls_counts_malformed_events_and_goes_on(journal_dir):
    with JournalWriter.create(journal_dir) as writer:
        writer.append(Kind.STARTED, {"config": "not a mapping"})
        writer.append(Kind.COMPLETED, {"result": 3})
    done = runrelay("journal", "ls", "--json", "--journal", str(journal_dir))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) | {"run": None} == {"run": None, "status": "COMPLETED", "events": 2,
                                                       "malformed": 1, "journal": "ok"}


@pytest.mark.parametrize("command", [["ls"], ["verify"], ["cat", "0190"]])
def test_a_missing_journal_is_one_line_and_exit_2(command, tmp_path):
    done = runrelay("journal", *command, "--journal", str(tmp_path / "nowhere"))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and f"no journal at {tmp_path / 'nowhere'}" in done.stderr


def test_the_journal_commands_honour_the_config_file(journal_dir, tmp_path):
    run = make_run(journal_dir)
    config = tmp_path / "runrelay.toml"
    config.write_text(f'journal = "{journal_dir}"\n')
    done = runrelay("journal", "ls", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == run
    assert runrelay("journal", "verify", run[:8], "--config", str(config)).returncode == 0
    config.write_text('journal = "/nonexistent/journal"\n')
    missing = runrelay("journal", "ls", "--config", str(config))
    assert missing.returncode == 2 and "no journal at /nonexistent/journal" in missing.stderr


def test_verify_passes_a_torn_tail_and_fails_corruption(tmp_path):
    for case, code in [("clean", 0), ("torn_payload", 0), ("flipped_payload_middle", 1)]:
        shutil.copytree(FIXTURES / case, tmp_path / case)
        done = runrelay("journal", "verify", "--journal", str(tmp_path / case))
        assert done.returncode == code, (case, done.stdout, done.stderr)
    assert "torn tail" in runrelay("journal", "verify", "--journal", str(tmp_path / "torn_payload")).stdout
    corrupt = runrelay("journal", "verify", FIXTURE_RUN, "--journal", str(tmp_path / "flipped_payload_middle"))
    assert "CORRUPT" in corrupt.stdout and "00000000000000000000.seg byte 449" in corrupt.stdout


def test_unknown_run_is_one_line_and_exit_2(journal_dir):
    make_run(journal_dir)
    done = runrelay("journal", "cat", "ffff", "--journal", str(journal_dir))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "no run matching" in done.stderr


def test_journal_help_explains():
    for command in ("ls", "cat", "verify"):
        done = runrelay("journal", command, "--help")
        assert done.returncode == 0 and "example:" in done.stdout


def test_version():
    done = runrelay("--version")
    assert done.returncode == 0 and done.stdout == f"runrelay {runrelay_package.__version__}\n"


@pytest.mark.parametrize("command", [[], ["dlq"], ["journal"]], ids=lambda command: " ".join(command) or "runrelay")
def test_a_command_without_its_subcommand_prints_help_and_exits_2(command):
    done = runrelay(*command)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"usage: runrelay {' '.join(command)}".rstrip()) and "example" in done.stderr


@pytest.mark.parametrize("args, code", [
    (["journal", "ls"], 141), (["journal", "cat", "RUN"], 141), (["status"], 141),
    (["--help"], 0),  # argparse itself passes over a failed write of the help
])
def test_output_into_a_closed_pipe_ends_quietly(args, code, journal_dir):
    run = make_run(journal_dir)
    args = [run if arg == "RUN" else arg for arg in args]
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line
    with os.fdopen(write_end, "wb") as stdout:
        done = subprocess.run([RUNRELAY, *args, "--journal", str(journal_dir)], stdout=stdout,
                              stderr=subprocess.PIPE, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (code, "")


WRITER = """
import sys
from runrelay.eventlog import JournalWriter, Kind
writer = JournalWriter.create(sys.argv[1])
writer.append(Kind.STARTED, {})
print(writer.run, flush=True)
sys.stdin.readline()
writer.append(Kind.METRICS, {"name": "loss", "step": 0, "value": 0.5, "timestamp": None})
import os; os._exit(9)  # gone without an ending, as a killed run is
"""


def live_run(journal_dir) -> tuple[subprocess.Popen, str]:
    """A run whose writer is alive, waiting for a line on stdin to log a point and die."""
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(journal_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    return writer, writer.stdout.readline().strip()


def test_cat_follow_ends_when_the_runs_writer_is_gone(journal_dir):
    writer, run = live_run(journal_dir)
    follow = subprocess.Popen([RUNRELAY, "journal", "cat", run, "--follow", "--journal", str(journal_dir)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert json.loads(follow.stdout.readline())["kind"] == "started"  # following the live run
    writer.communicate("go\n", timeout=60)
    rest, stderr = follow.communicate(timeout=60)
    assert follow.returncode == 0, stderr
    assert [json.loads(line)["kind"] for line in rest.splitlines()] == ["metrics"]


def test_ctrl_c_ends_cat_follow_quietly(journal_dir):
    writer, run = live_run(journal_dir)
    follow = subprocess.Popen([RUNRELAY, "journal", "cat", run, "--follow", "--journal", str(journal_dir)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    follow.stdout.readline()
    follow.send_signal(signal.SIGINT)
    _, stderr = follow.communicate(timeout=60)
    writer.communicate("go\n", timeout=60)
    assert (follow.returncode, stderr) == (128 + signal.SIGINT, "")


def test_the_demo_runs_and_runs_again_in_its_own_directory_only(tmp_path):
    directory = tmp_path / "demo"
    for _ in range(2):  # the second time, it replaces what the first made
        result = runrelay("demo", "--dir", str(directory))
        assert result.returncode == 0, result.stderr
        rows = [line.split() for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
        assert [(row[2], row[3]) for row in rows] == [("COMPLETED", "50"), ("FAILED", "50"), ("DIED", "50")]
        assert str(directory / "runs.sqlite") in result.stdout

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    refused = runrelay("demo", "--dir", str(other))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert f"{other} is not empty and no earlier demo made it" in refused.stderr
    assert (other / "notes.txt").read_text() == "keep me"

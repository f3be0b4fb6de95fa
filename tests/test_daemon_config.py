"""The daemon's configuration: layers, defaults, and validation that reports everything at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from runrelay.daemon.config import ConfigError, load


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_every_problem_is_reported_at_once_each_with_a_hint(tmp_path):
    config = _write(tmp_path / "runrelay.toml", """
log_level = "LOUD"
sinks = ["mongo://db/runs", "sqlite:///${RUNRELAY_TEST_UNSET_VARIABLE}/runs.sqlite"]

[retry]
max_second = 5

[delivery]
batch_events = "lots"

[retri]
initial_seconds = 1
""")
    with pytest.raises(ConfigError) as caught:
        load(config, environ={"RUNRELAY_HOME": str(tmp_path), "RUNRELAY_SHUTDOWN_SECONDS": "-1"})
    problems = caught.value.problems
    assert len(problems) == 7, problems
    text = "\n".join(problems)
    assert "unknown key 'retry.max_second' (did you mean retry.max_seconds?)" in text
    assert "unknown key 'retri' (did you mean retry?)" in text
    assert "log_level: expected one of DEBUG, INFO, WARNING, ERROR, got 'LOUD'" in text
    assert "delivery.batch_events: expected a number, got 'lots'" in text
    assert "$RUNRELAY_SHUTDOWN_SECONDS: shutdown_seconds: expected a number of seconds above 0" in text
    assert "no sink for 'mongo://db/runs' (known schemes:" in text
    assert "${RUNRELAY_TEST_UNSET_VARIABLE}, which is not set in the environment" in text


def test_a_misspelt_sink_scheme_gets_a_suggestion(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load(None, {"sinks": ["postgres+psycopg://db/runs"]}, environ={"RUNRELAY_HOME": str(tmp_path)})
    assert caught.value.problems == [
        "--sink: no sink for 'postgres+psycopg://db/runs' (did you mean postgresql+psycopg://?)"
    ]


def test_defaults_follow_runrelay_home(tmp_path):
    config = load(environ={"RUNRELAY_HOME": str(tmp_path)})
    assert config.journal == tmp_path / "journal"
    assert config.state == tmp_path / "state"
    assert config.sinks == (f"sqlite:///{tmp_path / 'runs.sqlite'}",)
    assert config.delivery.batch_events == 5000
    assert config.source is None


def test_file_then_environment_then_flags(tmp_path):
    _write(tmp_path / "runrelay.toml", """
journal = "/from/file/journal"
state = "/from/file/state"
sinks = ["sqlite:////from/file.sqlite"]
[retry]
max_seconds = 7
""")
    environ = {"RUNRELAY_HOME": str(tmp_path), "RUNRELAY_STATE": "/from/env/state",
               "RUNRELAY_SINKS": "sqlite:////a.sqlite, sqlite:////b.sqlite", "RUNRELAY_RETRY_MAX_SECONDS": "9"}
    config = load(None, {"state": Path("/from/flag/state")}, environ=environ)
    assert config.source == str(tmp_path / "runrelay.toml")
    assert config.journal == Path("/from/file/journal")
    assert config.state == Path("/from/flag/state")
    assert config.sinks == ("sqlite:////a.sqlite", "sqlite:////b.sqlite")
    assert config.retry.max_seconds == 9.0


def test_passwords_come_from_the_environment_and_are_never_shown(tmp_path):
    environ = {"RUNRELAY_HOME": str(tmp_path), "PGPASS": "s3cret"}
    config = load(None, {"sinks": ["postgresql+psycopg://relay:${PGPASS}@db/runs"]}, environ=environ)
    assert config.sinks == ("postgresql+psycopg://relay:s3cret@db/runs",)
    assert config.redacted_sinks == ["postgresql+psycopg://relay:***@db/runs"]
    assert "s3cret" not in repr(config)


def test_a_bad_config_is_one_line_per_problem_and_exit_2(tmp_path):
    config = _write(tmp_path / "bad.toml", 'sinks = "sqlite:///x"\nbatch_size = 3\n[delivery]\nrescan_seconds = 0\n')
    result = subprocess.run(
        [sys.executable, "-m", "runrelay.daemon.cli", "status", "--config", str(config)],
        capture_output=True, text=True, env={"RUNRELAY_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=60,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 2, lines
    assert all(line.startswith("runrelay: config: bad.toml: ") for line in lines)
    assert "unknown key 'batch_size'" in result.stderr
    assert "delivery.rescan_seconds: expected a number of seconds above 0" in result.stderr


def test_a_missing_config_file_is_a_user_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "runrelay.daemon.cli", "status", "--config", str(tmp_path / "nope.toml")],
        capture_output=True, text=True, env={"RUNRELAY_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=60,
    )
    assert result.returncode == 2
    assert "config file not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_relative_sqlite_path_is_pinned_to_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load(None, {"sinks": ["sqlite:///runs.sqlite", "sqlite:////abs/runs.sqlite"]},
                  environ={"RUNRELAY_HOME": str(tmp_path)})
    assert config.sinks == (f"sqlite:///{tmp_path / 'runs.sqlite'}", "sqlite:////abs/runs.sqlite")


def test_redacted_urls_hide_every_password_form():
    from runrelay.sinks.base import redact

    assert redact("postgresql+psycopg://bob:p/ss@db/runs") == "postgresql+psycopg://bob:***@db/runs"
    assert redact("postgresql://bob@db/runs?password=hunter2&x=1") == "postgresql://bob@db/runs?password=***&x=1"
    assert redact("mysql+pymysql://root@127.0.0.1:3306/db") == "mysql+pymysql://root@127.0.0.1:3306/db"
    assert redact("sqlite:////var/lib/runrelay/runs.sqlite") == "sqlite:////var/lib/runrelay/runs.sqlite"

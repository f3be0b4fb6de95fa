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
    assert "no sink for 'mongo://db/runs' (did you mean mongodb://?)" in text
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
    assert [(sink.name, sink.url) for sink in config.sinks] == [
        (f"sqlite:///{tmp_path / 'runs.sqlite'}", f"sqlite:///{tmp_path / 'runs.sqlite'}")]
    assert not config.sinks_given and not config.journal_given
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
    assert [sink.url for sink in config.sinks] == ["sqlite:////a.sqlite", "sqlite:////b.sqlite"]
    assert config.retry.max_seconds == 9.0


def test_passwords_come_from_the_environment_and_are_never_shown(tmp_path):
    environ = {"RUNRELAY_HOME": str(tmp_path), "PGPASS": "s3cret"}
    config = load(None, {"sinks": ["postgresql+psycopg://relay:${PGPASS}@db/runs"]}, environ=environ)
    assert [sink.url for sink in config.sinks] == ["postgresql+psycopg://relay:s3cret@db/runs"]
    assert config.sink_names == ["postgresql://relay@db:5432/runs"]
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
    assert config.sink_names == [f"sqlite:///{tmp_path / 'runs.sqlite'}", "sqlite:////abs/runs.sqlite"]


def test_named_sinks_with_options_and_the_name_as_their_key(tmp_path):
    _write(tmp_path / "runrelay.toml", """
[sinks.main]
url = "sqlite:////data/runs.sqlite"
[sinks.pg]
url = "postgresql://relay@db/runs"
timeout_seconds = 5
""")
    config = load(None, environ={"RUNRELAY_HOME": str(tmp_path)})
    assert config.sink_names == ["main", "pg"]
    assert config.sinks[1].options == {"timeout_seconds": 5.0}
    picked = load(None, {"sinks": ["pg"]}, environ={"RUNRELAY_HOME": str(tmp_path)})
    assert picked.sink_names == ["pg"] and picked.sinks_given
    named = load(None, {"sinks": ["archive=sqlite:////x.sqlite"]}, environ={"RUNRELAY_HOME": str(tmp_path)})
    assert named.sink_names == ["archive"]


def test_two_spellings_of_one_database_are_one_sink_and_an_option_does_not_rename_it(tmp_path):
    environ = {"RUNRELAY_HOME": str(tmp_path)}
    mysql = load(None, {"sinks": ["mysql://root@db/runs"]}, environ=environ).sink_names
    pymysql = load(None, {"sinks": ["mysql+pymysql://root@db:3306/runs?charset=utf8mb4"]}, environ=environ).sink_names
    assert mysql == pymysql == ["mysql://root@db:3306/runs"]
    with pytest.raises(ConfigError, match="are the same sink"):
        load(None, {"sinks": ["mysql://root@db/runs", "mariadb+pymysql://root@db/runs"]}, environ=environ)


def test_sink_problems_found_without_io_name_the_fix(tmp_path):
    _write(tmp_path / "runrelay.toml", """
[sinks.pg]
url = "postgresql://relay@db/runs"
timeout = 5
[sinks.mem]
url = "sqlite://"
""")
    with pytest.raises(ConfigError) as caught:
        load(None, {"sinks": ["pg", "typo"]}, environ={"RUNRELAY_HOME": str(tmp_path)})
    problems = " | ".join(caught.value.problems)
    assert "sink pg: unknown option 'timeout' (this sink takes timeout_seconds)" in problems
    assert "sink mem: url: an SQLite sink needs a file" in problems


def test_redacted_urls_hide_every_password_form():
    from runrelay.sinks.base import redact

    assert redact("postgresql+psycopg://bob:p/ss@db/runs") == "postgresql+psycopg://bob:***@db/runs"
    assert redact("postgresql://bob@db/runs?password=hunter2&x=1") == "postgresql://bob@db/runs?password=***&x=1"
    assert redact("mysql+pymysql://root@127.0.0.1:3306/db") == "mysql+pymysql://root@127.0.0.1:3306/db"
    assert redact("sqlite:////var/lib/runrelay/runs.sqlite") == "sqlite:////var/lib/runrelay/runs.sqlite"

"""The daemon's configuration: one typed tree, every default named here, validated at once.

Layers, later wins: built-in defaults < TOML file < environment < command-line flags.
The file is ``--config FILE``, else ``$RUNRELAY_CONFIG``, else ``runrelay.toml`` in
``$RUNRELAY_HOME`` (or ``$XDG_CONFIG_HOME/runrelay``) when it exists. Every key can be set
from the environment as ``RUNRELAY_`` + the key in capitals with dots as underscores
(``retry.max_seconds`` -> ``RUNRELAY_RETRY_MAX_SECONDS``); ``RUNRELAY_SINKS`` is
comma-separated. Sinks are named (``[sinks.NAME]`` tables with a ``url`` and the backend's
options); a sink given by URL alone is named after what the URL names. Nothing is read at
import time. docs/configuration.md lists every key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from runrelay.eventlog.location import default_journal_dir, runrelay_home
from runrelay.sinks.base import SinkConfigError, redact
from runrelay.sinks.registry import backend, schemes

CONFIG_FILE_NAME = "runrelay.toml"
STATE_DIR_NAME = "state"
DEFAULT_SINK_FILE = "runs.sqlite"
ENV_PREFIX = "RUNRELAY_"

DEFAULT_BATCH_EVENTS = 5000
DEFAULT_BATCH_WAIT_SECONDS = 0.02  # lag p99 goal is 100 ms; 0.1 s put it right at the edge
DEFAULT_RESCAN_SECONDS = 5.0
DEFAULT_RETRY_INITIAL_SECONDS = 0.5
DEFAULT_RETRY_MAX_SECONDS = 30.0
DEFAULT_RETRY_MULTIPLIER = 2.0
DEFAULT_RETRY_JITTER_SECONDS = 1.0
DEFAULT_RETRY_GIVE_UP_SECONDS = 60.0
DEFAULT_RETRY_UNUSABLE_SECONDS = 60.0
DEFAULT_SHUTDOWN_SECONDS = 10.0
DEFAULT_DEAD_RUNS_POLL_SECONDS = 1.0  # a full look; a writer lock closed is seen at once (inotify)
DEFAULT_DEAD_RUNS_STALLED_SECONDS = 60.0  # Sacred beats every 10 s
DEFAULT_DEAD_RUNS_STATUS = "DIED"
DEFAULT_DEAD_RUNS_REPORT_SECONDS = 10.0
DEFAULT_WATCHDOG_HOST_SILENT_SECONDS = 300.0
DEFAULT_WATCHDOG_STALE_SECONDS = 300.0
DEFAULT_WATCHDOG_EVERY_SECONDS = 60.0
DEFAULT_LOG_LEVEL = "INFO"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(Exception):
    """The configuration has problems; ``problems`` lists every one, each with a hint."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for transient sink errors: capped exponential with jitter.

    The daemon retries until it stops; one-shot commands (sync, dlq retry) give up
    after ``give_up_seconds``.
    """

    initial_seconds: float = DEFAULT_RETRY_INITIAL_SECONDS
    max_seconds: float = DEFAULT_RETRY_MAX_SECONDS
    multiplier: float = DEFAULT_RETRY_MULTIPLIER
    jitter_seconds: float = DEFAULT_RETRY_JITTER_SECONDS
    give_up_seconds: float = DEFAULT_RETRY_GIVE_UP_SECONDS
    unusable_seconds: float = DEFAULT_RETRY_UNUSABLE_SECONDS  # re-check a sink that cannot work as given


@dataclass(frozen=True)
class Delivery:
    batch_events: int = DEFAULT_BATCH_EVENTS
    batch_wait_seconds: float = DEFAULT_BATCH_WAIT_SECONDS
    rescan_seconds: float = DEFAULT_RESCAN_SECONDS


@dataclass(frozen=True)
class DeadRuns:
    judge: bool = True
    poll_seconds: float = DEFAULT_DEAD_RUNS_POLL_SECONDS
    stalled_seconds: float = DEFAULT_DEAD_RUNS_STALLED_SECONDS
    status: str = DEFAULT_DEAD_RUNS_STATUS
    host: str = field(default_factory=socket.gethostname)  # what this host's runs record (process.host); its daemon reports under it
    report_seconds: float = DEFAULT_DEAD_RUNS_REPORT_SECONDS


@dataclass(frozen=True)
class WatchdogSettings:
    host_silent_seconds: float = DEFAULT_WATCHDOG_HOST_SILENT_SECONDS
    stale_seconds: float = DEFAULT_WATCHDOG_STALE_SECONDS
    every_seconds: float = DEFAULT_WATCHDOG_EVERY_SECONDS


@dataclass(frozen=True)
class SinkConfig:
    """One configured sink: its name keys cursors, health, dead letters and logs."""

    name: str
    url: str = field(repr=False)  # may hold a password: never print it
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    journal: Path
    state: Path
    sinks: tuple[SinkConfig, ...]
    delivery: Delivery = Delivery()
    retry: RetryPolicy = RetryPolicy()
    dead_runs: DeadRuns = DeadRuns()
    watchdog: WatchdogSettings = WatchdogSettings()
    shutdown_seconds: float = DEFAULT_SHUTDOWN_SECONDS
    log_level: str = DEFAULT_LOG_LEVEL
    source: str | None = None  # the config file used, if any
    journal_given: bool = True  # False: the default location, which the daemon may create
    sinks_given: bool = True  # False: the built-in default sink

    @property
    def sink_names(self) -> list[str]:
        return [sink.name for sink in self.sinks]


# --- value parsers: return the typed value or raise ValueError with a hint ------------------


def _path(value: Any) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ValueError("expected a directory path")
    return Path(value).expanduser().absolute()


def _positive_int(value: Any) -> int:
    if isinstance(value, str):
        value = _number_text(value, int)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"expected a whole number above 0, got {value!r}")
    return value


def _seconds(minimum_exclusive: bool) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        if isinstance(value, str):
            value = _number_text(value, float)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise ValueError(f"expected a number of seconds, got {value!r}")
        if value < 0 or (minimum_exclusive and value == 0):
            raise ValueError(f"expected a number of seconds {'above' if minimum_exclusive else 'of at least'} 0, "
                             f"got {value!r}")
        return float(value)

    return parse


def _multiplier(value: Any) -> float:
    if isinstance(value, str):
        value = _number_text(value, float)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value < float("inf"):
        raise ValueError(f"expected a growth factor of at least 1, got {value!r}")
    return float(value)


def _number_text(text: str, kind: type) -> Any:
    try:
        return kind(text.strip())
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None


def _flag(value: Any) -> bool:
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return value.strip().lower() in ("true", "1", "yes", "on")
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


_STATUS = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")


def _status(value: Any) -> str:
    if not isinstance(value, str) or not _STATUS.match(value) or value in ("RUNNING", "QUEUED"):
        raise ValueError(f"expected an ending status in capitals (letters, digits, '_', at most 64), e.g. DIED or "
                         f"FAILED, got {value!r}")
    return value


def _host(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value.strip()) <= 255:
        raise ValueError(f"expected a host name (at most 255 characters), got {value!r}")
    return value.strip()


def _log_level(value: Any) -> str:
    if not isinstance(value, str) or value.upper() not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return value.upper()


_SINK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_NAMED_URL = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]{0,63})=(?P<url>[\w+.-]+://.*)$")


def _sink_tables(value: Any) -> list[tuple[str | None, Any, dict]]:
    """(name or None, url, options) per sink, from a list of URLs (each may be ``NAME=URL``,
    as on the command line and in $RUNRELAY_SINKS) or from ``[sinks.NAME]`` tables."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, dict):
        tables = []
        for name, table in value.items():
            if not _SINK_NAME.match(name):
                raise ValueError(f"sink name {name!r}: use letters, digits, '_', '-' and '.' (at most 64)")
            if not isinstance(table, dict) or not isinstance(table.get("url"), str):
                raise ValueError(f'[sinks.{name}] needs url = "..." (e.g. url = "sqlite:////var/lib/runrelay/runs.sqlite")')
            tables.append((name, table["url"], {key: item for key, item in table.items() if key != "url"}))
    elif isinstance(value, list) and all(isinstance(url, str) for url in value):
        named = [_NAMED_URL.match(url) for url in value]
        tables = [(match["name"], match["url"], {}) if match else (None, url, {}) for match, url in zip(named, value)]
    else:
        raise ValueError('expected sink URLs, e.g. sinks = ["sqlite:////var/lib/runrelay/runs.sqlite"], '
                         'or [sinks.NAME] tables with a url')
    if not tables:
        raise ValueError("no sinks: give at least one sink URL (see `runrelay --help` for the schemes)")
    return tables


_SETTINGS: dict[str, Callable[[Any], Any]] = {
    "journal": _path,
    "state": _path,
    "sinks": _sink_tables,
    "log_level": _log_level,
    "shutdown_seconds": _seconds(True),
    "delivery.batch_events": _positive_int,
    "delivery.batch_wait_seconds": _seconds(False),
    "delivery.rescan_seconds": _seconds(True),
    "retry.initial_seconds": _seconds(True),
    "retry.max_seconds": _seconds(True),
    "retry.multiplier": _multiplier,
    "retry.jitter_seconds": _seconds(False),
    "retry.give_up_seconds": _seconds(True),
    "retry.unusable_seconds": _seconds(True),
    "dead_runs.judge": _flag,
    "dead_runs.poll_seconds": _seconds(True),
    "dead_runs.stalled_seconds": _seconds(True),
    "dead_runs.status": _status,
    "dead_runs.host": _host,
    "dead_runs.report_seconds": _seconds(True),
    "watchdog.host_silent_seconds": _seconds(True),
    "watchdog.stale_seconds": _seconds(True),
    "watchdog.every_seconds": _seconds(True),
}


def _known_names() -> list[str]:
    """Every key, plus the section names (a misspelt ``[retri]`` table is one unknown key)."""
    return [*_SETTINGS, *sorted({key.split(".")[0] for key in _SETTINGS if "." in key})]


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper().replace(".", "_")


# --- locations ------------------------------------------------------------------------------


def home_dir(environ: Mapping[str, str]) -> Path:
    return runrelay_home(environ)


def default_state_dir(environ: Mapping[str, str]) -> Path:
    """``$RUNRELAY_HOME/state``, else ``$XDG_STATE_HOME/runrelay``, else ``~/.local/state/runrelay``."""
    if environ.get("RUNRELAY_HOME"):
        return home_dir(environ) / STATE_DIR_NAME
    state_home = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home).expanduser() / "runrelay"


def default_config_file(environ: Mapping[str, str]) -> Path:
    if environ.get("RUNRELAY_CONFIG"):
        return Path(environ["RUNRELAY_CONFIG"]).expanduser()
    if environ.get("RUNRELAY_HOME"):
        return home_dir(environ) / CONFIG_FILE_NAME
    config_home = environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home).expanduser() / "runrelay" / CONFIG_FILE_NAME


def defaults(environ: Mapping[str, str]) -> dict[str, Any]:
    """Every key's built-in default (the paths depend on the environment)."""
    home = home_dir(environ)
    return {
        "journal": default_journal_dir(environ),
        "state": default_state_dir(environ),
        "sinks": [f"sqlite:///{home / DEFAULT_SINK_FILE}"],
        "log_level": DEFAULT_LOG_LEVEL,
        "shutdown_seconds": DEFAULT_SHUTDOWN_SECONDS,
        "delivery.batch_events": DEFAULT_BATCH_EVENTS,
        "delivery.batch_wait_seconds": DEFAULT_BATCH_WAIT_SECONDS,
        "delivery.rescan_seconds": DEFAULT_RESCAN_SECONDS,
        "retry.initial_seconds": DEFAULT_RETRY_INITIAL_SECONDS,
        "retry.max_seconds": DEFAULT_RETRY_MAX_SECONDS,
        "retry.multiplier": DEFAULT_RETRY_MULTIPLIER,
        "retry.jitter_seconds": DEFAULT_RETRY_JITTER_SECONDS,
        "retry.give_up_seconds": DEFAULT_RETRY_GIVE_UP_SECONDS,
        "retry.unusable_seconds": DEFAULT_RETRY_UNUSABLE_SECONDS,
        "dead_runs.judge": True,
        "dead_runs.poll_seconds": DEFAULT_DEAD_RUNS_POLL_SECONDS,
        "dead_runs.stalled_seconds": DEFAULT_DEAD_RUNS_STALLED_SECONDS,
        "dead_runs.status": DEFAULT_DEAD_RUNS_STATUS,
        "dead_runs.host": socket.gethostname(),  # what producers record
        "dead_runs.report_seconds": DEFAULT_DEAD_RUNS_REPORT_SECONDS,
        "watchdog.host_silent_seconds": DEFAULT_WATCHDOG_HOST_SILENT_SECONDS,
        "watchdog.stale_seconds": DEFAULT_WATCHDOG_STALE_SECONDS,
        "watchdog.every_seconds": DEFAULT_WATCHDOG_EVERY_SECONDS,
    }


# --- loading --------------------------------------------------------------------------------


def load(
    config_file: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the configuration from every layer; raise ConfigError listing every problem.

    ``overrides`` are command-line values by key (``{"journal": ..., "sinks": [...]}``);
    None values are ignored. Command-line sinks are URLs (``NAME=URL`` to name one), which
    replace the configured sinks, or names, which pick among them.
    """
    env = dict(os.environ if environ is None else environ)
    raw: dict[str, tuple[Any, str]] = {key: (value, "default") for key, value in defaults(env).items()}
    problems: list[str] = []
    path = Path(config_file).expanduser() if config_file else default_config_file(env)
    used_file = None
    if config_file or env.get("RUNRELAY_CONFIG") or path.is_file():
        table, file_problems = _read_toml(path)
        problems += file_problems
        used_file = str(path) if not file_problems else None
        raw.update({key: (value, path.name) for key, value in table.items()})
    for key in _SETTINGS:
        if env.get(env_name(key)):
            raw[key] = (env[env_name(key)], f"${env_name(key)}")
    overrides = dict(overrides or {})
    picked = [item for item in overrides.get("sinks") or [] if "://" not in item]
    if picked:
        if len(picked) < len(overrides["sinks"]):
            problems.append("--sink: give sink URLs (they replace the configured sinks) or the names of configured "
                            "sinks (to pick among them), not both")
        overrides["sinks"] = None
    for key, value in overrides.items():
        if value is not None:
            raw[key] = (value, "--" + {"sinks": "sink"}.get(key, key).replace("_", "-"))
    config = validate(raw, env, problems, used_file)
    return _picked(config, picked, raw["sinks"][1]) if picked else config


def _picked(config: Config, names: list[str], origin: str) -> Config:
    """Only the configured sinks named."""
    unknown = [name for name in names if name not in config.sink_names]
    if unknown:
        raise ConfigError([f"--sink: no sink named {name!r} in {origin} (configured: "
                           f"{', '.join(config.sink_names)}; a sink URL needs its scheme://)" for name in unknown])
    return dataclasses.replace(config, sinks=tuple(sink for sink in config.sinks if sink.name in names),
                               sinks_given=True)


def _read_toml(path: Path) -> tuple[dict[str, Any], list[str]]:
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except FileNotFoundError:
        return {}, [f"{path}: config file not found (create it, or drop --config / $RUNRELAY_CONFIG)"]
    except OSError as error:
        return {}, [f"{path}: cannot read the config file: {error.strerror}"]
    except tomllib.TOMLDecodeError as error:
        return {}, [f"{path}: not valid TOML: {error}"]
    return _flatten(document), []


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"retry": {"max_seconds": 5}}`` -> ``{"retry.max_seconds": 5}``; unknown tables stay whole."""
    flat: dict[str, Any] = {}
    for name, value in table.items():
        key = prefix + name
        if isinstance(value, dict) and any(known.startswith(key + ".") for known in _SETTINGS):
            flat.update(_flatten(value, key + "."))
        else:
            flat[key] = value
    return flat


def validate(
    raw: Mapping[str, tuple[Any, str]],
    environ: Mapping[str, str] | None = None,
    problems: list[str] | None = None,
    source: str | None = None,
) -> Config:
    """Check every key and value; raise ConfigError naming all the problems at once."""
    env = os.environ if environ is None else environ
    problems = list(problems or [])
    values: dict[str, Any] = {}
    for key, (value, origin) in raw.items():
        parse = _SETTINGS.get(key)
        if parse is None:
            close = difflib.get_close_matches(key, _known_names(), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else f"known keys: {', '.join(_SETTINGS)}"
            problems.append(f"{origin}: unknown key {key!r} ({hint})")
            continue
        try:
            values[key] = parse(value)
        except ValueError as error:
            problems.append(f"{origin}: {key}: {error}")
    if "sinks" in values:
        values["sinks"] = _check_sinks(values["sinks"], raw["sinks"][1], env, problems)
    if values.get("retry.max_seconds", 1) < values.get("retry.initial_seconds", 0):
        problems.append(f"{raw['retry.max_seconds'][1]}: retry.max_seconds must be at least retry.initial_seconds")
    if problems:
        raise ConfigError(problems)
    return Config(
        journal=values["journal"],
        state=values["state"],
        sinks=tuple(values["sinks"]),
        journal_given=raw["journal"][1] != "default",
        sinks_given=raw["sinks"][1] != "default",
        delivery=Delivery(*(values[f"delivery.{name}"] for name in ("batch_events", "batch_wait_seconds",
                                                                    "rescan_seconds"))),
        retry=RetryPolicy(*(values[f"retry.{name}"] for name in ("initial_seconds", "max_seconds", "multiplier",
                                                                 "jitter_seconds", "give_up_seconds",
                                                                 "unusable_seconds"))),
        dead_runs=DeadRuns(*(values[f"dead_runs.{name}"] for name in ("judge", "poll_seconds", "stalled_seconds",
                                                                       "status", "host", "report_seconds"))),
        watchdog=WatchdogSettings(*(values[f"watchdog.{name}"] for name in ("host_silent_seconds", "stale_seconds",
                                                                            "every_seconds"))),
        shutdown_seconds=values["shutdown_seconds"],
        log_level=values["log_level"],
        source=source,
    )


_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _check_sinks(tables: list, origin: str, environ: Mapping[str, str], problems: list[str]) -> list[SinkConfig]:
    """Each sink checked by its backend without I/O, named, and no two naming one database."""
    sinks: list[SinkConfig] = []
    identities: dict[str, str] = {}
    for name, url, options in tables:
        checked = _check_sink(name, url, options, origin, environ, problems)
        if checked is None:
            continue
        sink, identity = checked
        if identity in identities or sink.name in (known.name for known in sinks):
            other = identities.get(identity, sink.name)
            problems.append(f"{origin}: sinks {other!r} and {sink.name!r} are the same sink ({identity}): keep one")
            continue
        identities[identity] = sink.name
        sinks.append(sink)
    return sinks


def _check_sink(name: str | None, url: str, options: dict, origin: str, environ: Mapping[str, str],
                problems: list[str]) -> tuple[SinkConfig, str] | None:
    """Expand ``${VAR}`` references (keep passwords out of config files), then let the
    backend check the URL and options; the sink's name defaults to what the URL names."""
    where = f"{origin}: sink {name}" if name else origin
    missing = [variable for variable in _ENV_REFERENCE.findall(url) if variable not in environ]
    if missing:
        problems.append(f"{where}: {redact(url)} uses ${{{missing[0]}}}, which is not set in the environment")
        return None
    url = _ENV_REFERENCE.sub(lambda match: environ[match.group(1)], url)
    scheme, sep, _ = url.partition("://")
    if not sep or scheme.lower() not in schemes():
        close = difflib.get_close_matches(scheme.lower(), schemes(), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]}://?" if close and sep else f"known schemes: {', '.join(schemes())}"
        problems.append(f"{where}: no sink for {redact(url)!r} ({hint})")
        return None
    try:
        identity = backend(url).identity(url)
    except SinkConfigError as error:
        problems.append(f"{where}: {redact(url) if name is None else 'url'}: {error}")
        return None
    try:
        parsed = backend(url).check_options(options)
    except SinkConfigError as error:
        problems.append(f"{where}: {error}")
        return None
    return SinkConfig(name or identity, url, parsed), identity

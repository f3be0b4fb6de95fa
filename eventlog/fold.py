"""The pure fold of a run's events into its current state.

This is the one place that knows what a run looks like; every sink shares it. A sink
reads ``RunState`` (and a batch's metric points), never raw event bodies. Folding is
deterministic and does no I/O, and skips events at or below the state's ``last_seq``, so
folding a replayed batch changes nothing.

Journal content is untrusted input: each kind's folder checks every body field a sink
reads before it builds anything, and raises ``MalformedEvent`` for a body that does not fit.
``fold_event`` never changes the state it is given: it returns a new one (copy on write,
shallow: folders replace fields, never mutate the values in them), so a refused event
leaves no trace and a state can be kept as it was before a batch for free.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable

from runrelay.eventlog.events import UNFINISHED, Event, Kind, Status

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_MD5 = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class RunState:
    """A run as Sacred's observers would record it, plus what runrelay adds.

    Metric points are not part of it: they reach a sink with each batch (``Points``), so
    the state stays small however long the run is. Artifacts, resources and sources are
    lists of dicts; artifacts and resources carry the ``seq`` of the event that added them.
    """

    run: str
    last_seq: int = -1
    status: str | None = None
    sacred_id: int | str | None = None  # the _id Sacred settled on, when it was not the run uid
    command: str | None = None
    experiment: dict = field(default_factory=dict)
    host: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    queue_time: dt.datetime | None = None
    start_time: dt.datetime | None = None
    heartbeat: dt.datetime | None = None
    stop_time: dt.datetime | None = None
    result: Any = None
    captured_out: str = ""
    fail_trace: tuple[str, ...] | None = None
    artifacts: tuple[dict, ...] = ()
    resources: tuple[dict, ...] = ()
    sources: tuple[dict, ...] = ()
    process: dict | None = None
    death: dict | None = None  # the watchdog's verdict while it stands

    @property
    def finished(self) -> bool:
        return self.status not in UNFINISHED

    @property
    def ended(self) -> bool:
        """A real ending (completed, failed, interrupted) stands: nothing more will come."""
        return self.finished and self.death is None


_DESCRIBED = frozenset({"status", "sacred_id", "command", "experiment", "host", "meta", "config", "sources"})
_ENDED = frozenset({"status", "stop_time"})
REVIVED = frozenset({"status", "stop_time", "fail_trace", "death"})

# Which RunState fields each kind of event sets (SQL maps them to columns, Mongo to $set
# keys). An event after a standing death verdict also sets REVIVED (the verdict is withdrawn).
SETS: dict[Kind, frozenset[str]] = {
    Kind.QUEUED: _DESCRIBED | {"queue_time"},
    Kind.STARTED: _DESCRIBED | {"start_time", "process"},
    Kind.HEARTBEAT: frozenset({"heartbeat", "info", "result", "captured_out"}),
    Kind.METRICS: frozenset(),
    Kind.RESOURCE: frozenset({"resources"}),
    Kind.ARTIFACT: frozenset({"artifacts"}),
    Kind.COMPLETED: _ENDED | {"result"},
    Kind.INTERRUPTED: _ENDED,
    Kind.FAILED: _ENDED | {"fail_trace"},
    Kind.DIED: _ENDED | {"fail_trace", "death"},
}
STATE_FIELDS = tuple(f.name for f in fields(RunState))
_ADDED_OUTPUT = "captured_out added"  # a folder's change: output to add to captured_out


class MalformedEvent(ValueError):
    """An event whose body does not fit its kind (journal content is untrusted input)."""

    def __init__(self, run: str, seq: int, kind: Kind, problem: str):
        super().__init__(f"run {run} seq {seq} ({kind.value}): malformed body: {problem}")
        self.seq = seq


def fold(events: Iterable[Event], state: RunState | None = None) -> RunState:
    """Fold events (in seq order) on top of ``state``; events already folded are skipped."""
    folding = None
    for event in events:
        folding = folding or Folding(RunState(event.run) if state is None else state)
        folding.add(event)
    if folding is None and state is None:
        raise ValueError("cannot fold an empty stream without a starting state")
    return state if folding is None else folding.state


def fold_event(state: RunState, event: Event) -> RunState:
    """The state after ``event``; raise MalformedEvent when its body does not fit its kind."""
    if event.seq <= state.last_seq:
        return state  # replayed: already folded
    changes = _changes(state, event)
    if _ADDED_OUTPUT in changes:
        changes["captured_out"] = state.captured_out + changes.pop(_ADDED_OUTPUT)
    return dataclasses.replace(state, last_seq=event.seq, **changes)


class Folding:
    """Events folded one by one on top of a state, as ``fold_event`` folds them, but the
    output each heartbeat adds is joined to the run's captured output once, when ``state``
    is read, not copied at every heartbeat (quadratic in a long run's output)."""

    def __init__(self, state: RunState):
        self._state = state
        self._added: list[str] = []  # output added since self._state

    @property
    def state(self) -> RunState:
        if self._added:
            output = self._state.captured_out + "".join(self._added)
            self._state, self._added = dataclasses.replace(self._state, captured_out=output), []
        return self._state

    def add(self, event: Event) -> frozenset[str]:
        """Fold ``event``; returns the fields it set. MalformedEvent leaves the folding as it was."""
        state = self._state
        if event.seq <= state.last_seq:
            return frozenset()  # replayed: already folded
        changes = _changes(state, event)
        if _ADDED_OUTPUT in changes:
            self._added.append(changes.pop(_ADDED_OUTPUT))
        elif "captured_out" in changes:
            self._added = []  # replaced
        self._state = dataclasses.replace(state, last_seq=event.seq, **changes)
        revived = state.death is not None and event.kind is not Kind.DIED
        return SETS[event.kind] | REVIVED if revived else SETS[event.kind]


def _changes(state: RunState, event: Event) -> dict:
    """The fields ``event`` replaces (output a heartbeat adds under ``_ADDED_OUTPUT``)."""
    try:
        changes = _FOLDERS[event.kind](state, event.body, event.seq)
    except (TypeError, AttributeError, KeyError, ValueError, IndexError) as error:
        raise MalformedEvent(event.run, event.seq, event.kind, f"{type(error).__name__}: {error}") from None
    if state.death is not None and event.kind is not Kind.DIED:
        changes = {"death": None, "status": Status.RUNNING.value, "stop_time": None, "fail_trace": None,
                   **changes}  # withdrawn
    return changes


def passed(state: RunState, seq: int) -> RunState:
    """The state once events through ``seq`` that set nothing (metric points, refused
    events) are folded."""
    return state if seq <= state.last_seq else dataclasses.replace(state, last_seq=seq)


def metric_point(event: Event) -> tuple[int, str, int, int | float, dt.datetime]:
    """(seq, name, step, value, timestamp) of a well-formed metric event; MalformedEvent if not."""
    try:
        return (event.seq, *_point(event.body))
    except (TypeError, KeyError, ValueError) as error:
        raise MalformedEvent(event.run, event.seq, event.kind, f"{type(error).__name__}: {error}") from None


def snapshot(state: RunState) -> dict:
    """The state as plain data (for ``eventlog.codec``)."""
    return {name: getattr(state, name) for name in STATE_FIELDS}


def from_snapshot(data: Any) -> RunState:
    """The state ``snapshot`` saved; anything else is a ValueError."""
    if not isinstance(data, dict) or set(data) != set(STATE_FIELDS):
        raise ValueError("not a run state snapshot")
    tuples = {name: tuple(data[name]) for name in ("artifacts", "resources", "sources") if data[name] is not None}
    if data["fail_trace"] is not None:
        tuples["fail_trace"] = tuple(data["fail_trace"])
    return RunState(**{**data, **tuples})


# --- the folders: check, then return the fields to replace ------------------------------------


def _queued(state: RunState, body: dict, seq: int) -> dict:
    return {**_described(body), "status": Status.QUEUED.value, "queue_time": _time(body, "queue_time")}


def _started(state: RunState, body: dict, seq: int) -> dict:
    process = _optional(body, "process", dict)
    if process is not None:
        _optional(process, "pid", int)
        _optional(process, "start_ticks", int)
        _optional(process, "host", str)
        _optional(process, "boot_id", str)
    return {**_described(body), "status": Status.RUNNING.value, "start_time": _time(body, "start_time"),
            "process": process}


def _described(body: dict) -> dict:
    experiment, host = _mapping(body, "ex_info"), _mapping(body, "host_info")
    _optional(experiment, "name", str)
    _optional(experiment, "base_dir", str)
    _optional(experiment, "mainfile", str)
    for pair in _list(experiment, "sources"):
        name, md5 = _untupled(pair, "ex_info.sources")
        _checked(name, str, "ex_info.sources name")
        _checked(md5, str, "ex_info.sources md5")
    for requirement in _list(experiment, "dependencies"):
        _checked(requirement, str, "ex_info.dependencies")
    for repository in _list(experiment, "repositories"):
        _checked(repository, dict, "ex_info.repositories")
    for key in ("hostname", "cpu", "python_version"):
        _optional(host, key, str)
    if host.get("os") is not None:
        for part in _untupled(host["os"], "host_info.os"):
            _checked(part, str, "host_info.os")
    meta = _mapping(body, "meta_info")
    if meta.get("priority") is not None:
        _checked(meta["priority"], (int, float), "meta_info.priority")
    _optional(meta, "comment", str)
    sacred_id = body.get("sacred_id")
    if sacred_id is not None:
        _checked(sacred_id, (int, str), "sacred_id")
    return {
        "experiment": experiment, "host": host, "meta": meta, "config": _mapping(body, "config"),
        "command": _optional(body, "command", str), "sacred_id": sacred_id,
        "sources": tuple(_file(source, "name") for source in _list(body, "sources")),
    }


def _heartbeat(state: RunState, body: dict, seq: int) -> dict:
    if "captured_out" in body:
        output = {"captured_out": _checked(body["captured_out"], str, "captured_out")}
    else:
        output = {_ADDED_OUTPUT: _checked(body.get("captured_out_append", ""), str, "captured_out_append")}
    return {"heartbeat": _time(body, "beat_time"), "info": _mapping(body, "info"), "result": body.get("result"),
            **output}


def _metrics(state: RunState, body: dict, seq: int) -> dict:
    _point(body)  # points reach sinks through the batch, not the state
    return {}


def _point(body: dict) -> tuple[str, int, int | float, dt.datetime | None]:
    name, step, value = body["name"], body["step"], body["value"]
    if not isinstance(name, str) or not name:
        raise TypeError(f"metric name {name!r} is not a non-empty string")
    if isinstance(step, float) and step.is_integer():
        step = int(step)
    if type(step) is not int:
        raise TypeError(f"metric {name!r}: step {step!r} is not an integer")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"metric {name!r}: value {value!r} is not a number")
    timestamp = body.get("timestamp")
    if timestamp is not None and not isinstance(timestamp, dt.datetime):
        raise TypeError(f"metric {name!r}: timestamp {timestamp!r} is not a datetime")
    if timestamp is not None and timestamp.tzinfo is not None:
        timestamp = timestamp.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return name, step, value, timestamp


def _resource(state: RunState, body: dict, seq: int) -> dict:
    return {"resources": (*state.resources, {**_file(body, "filename"), "seq": seq})}


def _artifact(state: RunState, body: dict, seq: int) -> dict:
    entry = _file(body, "name")
    _optional(body, "filename", str)
    _optional(body, "content_type", str)
    entry.update({"filename": body.get("filename"), "content_type": body.get("content_type"),
                  "metadata": body.get("metadata"), "seq": seq})
    return {"artifacts": (*state.artifacts, entry)}


def _file(body: Any, name_key: str) -> dict:
    """A file copied into the blob store: its name, SHA-256 digest, md5 and size."""
    _checked(body, dict, "file")
    name = _checked(body[name_key], str, name_key)
    digest, md5 = _checked(body["digest"], str, "digest"), _checked(body["md5"], str, "md5")
    if not _DIGEST.match(digest):
        raise ValueError(f"digest {digest!r} is not a SHA-256 hex digest")
    if not _MD5.match(md5):
        raise ValueError(f"md5 {md5!r} is not an md5 hex digest")
    size = body.get("size")
    if size is not None and (type(size) is not int or size < 0):
        raise ValueError(f"size {size!r} is not a byte count")
    return {name_key: name, "digest": digest, "md5": md5, "size": size}


def _completed(state: RunState, body: dict, seq: int) -> dict:
    return {"status": Status.COMPLETED.value, "stop_time": _time(body, "stop_time"), "result": body.get("result")}


def _interrupted(state: RunState, body: dict, seq: int) -> dict:
    status = _checked(body.get("status") or Status.INTERRUPTED.value, str, "status")
    return {"status": status, "stop_time": _time(body, "interrupt_time")}


def _failed(state: RunState, body: dict, seq: int) -> dict:
    trace = body.get("fail_trace")
    if trace is not None:
        trace = tuple(_checked(line, str, "fail_trace") for line in _checked(trace, list, "fail_trace"))
    return {"status": Status.FAILED.value, "stop_time": _time(body, "fail_time"), "fail_trace": trace}


def _died(state: RunState, body: dict, seq: int) -> dict:
    status = _checked(body.get("status") or Status.DIED.value, str, "status")
    reason = _optional(body, "reason", str)
    last_heartbeat = _time(body, "last_heartbeat")
    _time(body, "detected_time")
    if state.finished and state.death is None:
        return {}  # a real ending already stands; a late verdict changes nothing
    return {"status": status, "stop_time": last_heartbeat or state.heartbeat or state.start_time,
            "fail_trace": death_trace(reason), "death": body}


def death_trace(reason: str | None) -> tuple[str, ...]:
    """A death verdict's ``fail_trace``: where readers show why a run ended."""
    return (f"runrelay judged the run dead: {reason or 'no reason given'}\n",)


# --- checks ----------------------------------------------------------------------------------


def _mapping(body: dict, key: str) -> dict:
    return _checked(body.get(key) or {}, dict, key)


def _list(body: dict, key: str) -> list:
    return _checked(body.get(key) or [], list, key)


def _optional(body: dict, key: str, kind: type) -> Any:
    value = body.get(key)
    return None if value is None else _checked(value, kind, key)


def _time(body: dict, key: str) -> dt.datetime | None:
    return _optional(body, key, dt.datetime)


def _checked(value: Any, kind: type | tuple[type, ...], key: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool):  # True is an int to Python, not to us
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise TypeError(f"{key} is a {type(value).__name__}, expected {expected}")
    return value


def _untupled(value: Any, key: str) -> list:
    """A tuple in ``flatten``'s form ({"py/tuple": [...]}) or a plain list."""
    if isinstance(value, dict) and value.keys() == {"py/tuple"}:
        value = value["py/tuple"]
    return _checked(value, list, key)


_FOLDERS: dict[Kind, Callable[[RunState, dict, int], dict]] = {
    Kind.QUEUED: _queued,
    Kind.STARTED: _started,
    Kind.HEARTBEAT: _heartbeat,
    Kind.METRICS: _metrics,
    Kind.RESOURCE: _resource,
    Kind.ARTIFACT: _artifact,
    Kind.COMPLETED: _completed,
    Kind.INTERRUPTED: _interrupted,
    Kind.FAILED: _failed,
    Kind.DIED: _died,
}
assert set(_FOLDERS) == set(Kind) == set(SETS)

"""The pure fold of a run's events into its current state.

This is the one place that knows what a run looks like; every sink shares it.
``fold_event`` is deterministic and does no I/O, so a sink can fold a batch on top
of a state it folded before and get the same answer as folding everything once.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, fields
from typing import Any, Iterable

from runrelay.eventlog.events import Event, Kind

DIED = "DIED"


@dataclass
class RunState:
    """A run as Sacred's observers would record it, plus what runrelay adds."""

    run: str
    last_seq: int = -1
    status: str | None = None
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
    fail_trace: list[str] | None = None
    # name -> {"steps": [...], "values": [...], "timestamps": [...]}, as Sacred's metrics.json
    metrics: dict[str, dict[str, list]] = field(default_factory=dict)
    artifacts: list[dict] = field(default_factory=list)
    resources: list[dict] = field(default_factory=list)
    sources: list[dict] = field(default_factory=list)
    process: dict | None = None
    death: dict | None = None  # the watchdog's verdict while it stands
    # False: metric events only advance last_seq (for sinks that append points as rows)
    track_metrics: bool = True

    @property
    def finished(self) -> bool:
        return self.status not in (None, "QUEUED", "RUNNING")


def snapshot(state: RunState) -> dict:
    """The state as plain data (for ``eventlog.codec``), without metric history."""
    return {f.name: getattr(state, f.name) for f in fields(RunState) if f.name not in ("metrics", "track_metrics")}


def from_snapshot(data: dict) -> RunState:
    """The state ``snapshot`` saved, with ``track_metrics`` off; unknown keys are an error."""
    names = {f.name for f in fields(RunState)} - {"metrics", "track_metrics"}
    if not isinstance(data, dict) or set(data) != names:
        raise ValueError("not a run state snapshot")
    return RunState(**data, track_metrics=False)


def fold(events: Iterable[Event], state: RunState | None = None) -> RunState:
    """Fold events (in seq order) on top of ``state``; events already folded are skipped."""
    for event in events:
        if state is None:
            state = RunState(event.run)
        fold_event(state, event)
    if state is None:
        raise ValueError("cannot fold an empty stream without a starting state")
    return state


class MalformedEvent(ValueError):
    """An event whose body does not fit its kind (journal content is untrusted input)."""

    def __init__(self, event: Event, problem: str):
        super().__init__(f"run {event.run} seq {event.seq} ({event.kind.value}): malformed body: {problem}")
        self.seq = event.seq


def fold_event(state: RunState, event: Event) -> RunState:
    """Fold one event; raise MalformedEvent, leaving ``state`` as it was, when its body
    does not fit its kind (each folder checks before it changes anything)."""
    if event.seq <= state.last_seq:
        return state  # replayed: already folded
    body = event.body
    if state.death is not None and event.kind is not Kind.DIED:
        _revive(state)
    try:
        _FOLDERS[event.kind](state, body)
    except (TypeError, AttributeError, KeyError, ValueError) as error:
        raise MalformedEvent(event, f"{type(error).__name__}: {error}") from None
    state.last_seq = event.seq
    return state


def _revive(state: RunState) -> None:
    """Later events of a run judged dead win: the verdict is withdrawn."""
    state.death = None
    state.status = "RUNNING"
    state.stop_time = None


def _queued(state: RunState, body: dict) -> None:
    _describe(state, body)
    state.status = "QUEUED"
    state.queue_time = body.get("queue_time")


def _started(state: RunState, body: dict) -> None:
    _describe(state, body)
    state.status = "RUNNING"
    state.start_time = body.get("start_time")
    state.process = body.get("process")


def _describe(state: RunState, body: dict) -> None:
    experiment, host = _mapping(body, "ex_info"), _mapping(body, "host_info")
    meta, config = _mapping(body, "meta_info"), _mapping(body, "config")
    sources = [_checked(source, dict, "sources") for source in _checked(body.get("sources") or [], list, "sources")]
    state.experiment, state.host, state.meta, state.config, state.sources = experiment, host, meta, config, sources
    state.command = body.get("command")


def _mapping(body: dict, key: str) -> dict:
    return _checked(body.get(key) or {}, dict, key)


def _checked(value, kind: type, key: str):
    if not isinstance(value, kind):
        raise TypeError(f"{key} is a {type(value).__name__}, expected a {kind.__name__}")
    return value


def _heartbeat(state: RunState, body: dict) -> None:
    info = _mapping(body, "info")
    if "captured_out" in body:
        captured_out = _checked(body["captured_out"], str, "captured_out")
    else:
        captured_out = state.captured_out + _checked(body.get("captured_out_append", ""), str, "captured_out_append")
    state.heartbeat, state.info, state.result, state.captured_out = body.get("beat_time"), info, body.get("result"), captured_out


def _metrics(state: RunState, body: dict) -> None:
    _checked(body["name"], str, "name")
    if not state.track_metrics:
        return
    series = state.metrics.setdefault(body["name"], {"steps": [], "values": [], "timestamps": []})
    series["steps"].append(body["step"])
    series["values"].append(body["value"])
    series["timestamps"].append(body["timestamp"])


def _resource(state: RunState, body: dict) -> None:
    state.resources.append(_files(body, "filename"))


def _artifact(state: RunState, body: dict) -> None:
    state.artifacts.append(_files(body, "name"))


def _files(body: dict, name: str) -> dict:
    """Artifacts and resources: a name and a blob digest, both text."""
    for key in (name, "digest"):
        _checked(body[key], str, key)
    return body


def _completed(state: RunState, body: dict) -> None:
    state.status = "COMPLETED"
    state.stop_time = body.get("stop_time")
    state.result = body.get("result")


def _interrupted(state: RunState, body: dict) -> None:
    state.status = _checked(body.get("status") or "INTERRUPTED", str, "status")
    state.stop_time = body.get("interrupt_time")


def _failed(state: RunState, body: dict) -> None:
    state.status = "FAILED"
    state.stop_time = body.get("fail_time")
    state.fail_trace = body.get("fail_trace")


def _died(state: RunState, body: dict) -> None:
    if state.finished and state.death is None:
        return  # a real ending already stands; a late verdict changes nothing
    state.status = _checked(body.get("status") or DIED, str, "status")
    state.stop_time = body.get("last_heartbeat") or state.heartbeat or state.start_time
    state.death = body


_FOLDERS = {
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

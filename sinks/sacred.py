"""The values Sacred's own observers store, shared by every backend.

The journal keeps what Sacred handed its observers in Sacred's ``flatten`` form, except
that datetimes stay datetimes (docs/events.md). Each layout stores them as Sacred's
observer for it does; the conversions they share live here, so every sink writes the
same thing for the same run: jsonpickle'd datetimes, ``flatten``'s tuples undone, naive
UTC times, finite numbers, the experiment and host keys Sacred shares rows by, the
visible cut marker for text too large for a backend, and the run document.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import math
from typing import Any, Callable

from runrelay.eventlog.fold import RunState

CUT_MARKER = "[runrelay: the first {cut} bytes of this {what} were cut: {why}]\n"


def naive_utc(value: dt.datetime | None) -> dt.datetime | None:
    """Naive UTC, as Sacred's observers store times (Sacred hands them ``utcnow()``)."""
    if value is None or value.tzinfo is None:
        return value
    return value.astimezone(dt.timezone.utc).replace(tzinfo=None)


def untuple(value: Any) -> Any:
    """Undo ``flatten``'s tuple form ({"py/tuple": [...]}) into lists, as ``json.dumps`` and
    BSON see Sacred's tuples (Sacred's experiment md5 is taken over that JSON text)."""
    if isinstance(value, dict):
        if value.keys() == {"py/tuple"}:
            return untuple(value["py/tuple"])
        return {key: untuple(item) for key, item in value.items()}
    if isinstance(value, list):
        return [untuple(item) for item in value]
    return value


def sacred_json(value: Any) -> str:
    """``json.dumps(flatten(value))``, as Sacred's SqlObserver stores config and info: the
    journal's datetimes are put back in jsonpickle's form."""
    return json.dumps(value, default=pickled_datetime)


def pickled_datetime(value: Any) -> dict:
    """A datetime as ``flatten`` (jsonpickle) writes it."""
    if not isinstance(value, dt.datetime):
        raise TypeError(f"a {type(value).__name__} cannot be stored as JSON")
    state = naive_utc(value).__reduce__()[1][0]  # the 10 bytes pickle keeps
    reduced = [{"py/type": "datetime.datetime"}, [base64.b64encode(state).decode("ascii")]]
    return {"py/object": "datetime.datetime", "__reduce__": reduced}


def finite(value: Any) -> float | None:
    """``value`` for a numeric column: a finite number as a float, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def experiment_key(experiment: dict) -> tuple[str | None, str]:
    """(name, md5) by which Sacred finds an experiment again: the md5 of its info as JSON."""
    info = untuple(experiment)
    return info.get("name"), hashlib.md5(json.dumps(info).encode()).hexdigest()


def host_key(host: dict) -> dict:
    """The host fields Sacred's SqlObserver keys a host row by."""
    host = untuple(host)
    os_name, os_info = (list(host.get("os") or []) + [None, None])[:2]
    return {"hostname": host.get("hostname"), "cpu": host.get("cpu"), "os": os_name, "os_info": os_info,
            "python_version": host.get("python_version")}


def requirement(text: str) -> dict:
    """A dependency as Sacred splits it: ``name==version``."""
    name, _, version = text.partition("==")
    return {"name": name, "version": version}


def cut_front(text: str, budget: int, what: str, why: str) -> str:
    """``text`` as valid UTF-8 of at most about ``budget`` bytes: when longer, its end is
    kept after a marker line saying how much was cut and why (a run's latest output is
    what matters; a backend limit must never lose the run's ending)."""
    data = text.encode("utf-8", "replace")  # lone surrogates fit no backend
    if len(data) <= budget:
        return data.decode("utf-8")
    cut = len(data) - budget
    return CUT_MARKER.format(cut=cut, what=what, why=why) + data[cut:].decode("utf-8", "ignore")


def flat(value: Any) -> Any:
    """A value as Sacred's ``flatten`` leaves it (its datetimes jsonpickle'd, tuples kept
    as {"py/tuple": ...}): what Sacred's observers store for config, info and result."""
    return json.loads(sacred_json(value))


def _heartbeat(state: RunState) -> dt.datetime | None:
    """A date from the start (Sacredboard fails while any run has none)."""
    return naive_utc(state.heartbeat or state.start_time or state.queue_time)


# The run document's fields (Mongo's ``runs`` document, FileStorage's ``run.json`` and
# ``config.json``) from the state, in Sacred's forms. The experiment, info, output,
# sources, artifacts and resources need the layout (GridFS ids, file paths, size budgets).
RUN_FIELDS: dict[str, Callable[[RunState], Any]] = {
    "status": lambda state: state.status,
    "command": lambda state: state.command,
    "host": lambda state: untuple(state.host),
    "meta": lambda state: untuple(state.meta),
    "config": lambda state: flat(state.config),
    "start_time": lambda state: naive_utc(state.start_time),
    "heartbeat": _heartbeat,
    "stop_time": lambda state: naive_utc(state.stop_time),
    "result": lambda state: flat(state.result),
    "fail_trace": lambda state: None if state.fail_trace is None else list(state.fail_trace),
}
# RunState field -> the run document fields it sets (``eventlog.fold.SETS`` says which
# state fields each event sets)
RUN_FIELDS_SET_BY = {
    "status": ("status",), "command": ("command",), "host": ("host",), "meta": ("meta",),
    "config": ("config",), "start_time": ("start_time", "heartbeat"), "queue_time": ("heartbeat",),
    "heartbeat": ("heartbeat",), "stop_time": ("stop_time",), "result": ("result",),
    "fail_trace": ("fail_trace",),
}


def run_document(state: RunState) -> dict:
    """The run document's fields that have a value: a start time once started, a stop
    time and a trace once set."""
    names = {"status", "command", "host", "meta", "config", "heartbeat", "result"}
    names |= {name for name in ("start_time", "stop_time", "fail_trace") if getattr(state, name) is not None}
    return {name: RUN_FIELDS[name](state) for name in names}


def run_fields_changed(state: RunState, changed: frozenset[str]) -> dict:
    """The run document's fields that the ``changed`` state fields set."""
    names = {field for name in changed for field in RUN_FIELDS_SET_BY.get(name, ())}
    return {name: RUN_FIELDS[name](state) for name in names}

"""The values Sacred's own observers store, shared by every backend.

The journal keeps what Sacred handed its observers in Sacred's ``flatten`` form, except
that datetimes stay datetimes (docs/events.md). Each layout stores them as Sacred's
observer for it does; the conversions they share live here, so every sink writes the
same thing for the same run: jsonpickle'd datetimes, ``flatten``'s tuples undone, naive
UTC times, finite numbers, the experiment and host keys Sacred shares rows by, the
visible cut marker for text too large for a backend, statuses and names within the widths
every backend takes, and the run document.
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
# The widths of Sacred's SqlObserver columns for a run's status and for names (artifacts,
# metrics): every sink stores those values within them (``stored_text``).
STATUS_WIDTH = 64
NAME_WIDTH = 255


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
    """``json.dumps(flatten(value))``, as Sacred's SqlObserver stores config and info: what
    the journal keeps and JSON does not (datetimes, bytes, a tuple as a dict key) is put in
    the form ``flatten`` (jsonpickle) gives it."""
    try:
        return json.dumps(value, default=_pickled)
    except TypeError:  # a dict key JSON cannot hold: the rare slow path
        return json.dumps(_json_keys(value), default=_pickled)


def _pickled(value: Any) -> dict:
    """A datetime or bytes as ``flatten`` writes it."""
    if isinstance(value, bytes):
        return {"py/b64": base64.b64encode(value).decode("ascii")}
    if not isinstance(value, dt.datetime):
        raise TypeError(f"a {type(value).__name__} cannot be stored as JSON")
    state = naive_utc(value).__reduce__()[1][0]  # the 10 bytes pickle keeps
    reduced = [{"py/type": "datetime.datetime"}, [base64.b64encode(state).decode("ascii")]]
    return {"py/object": "datetime.datetime", "__reduce__": reduced}


def _json_keys(value: Any) -> Any:
    """``value`` with each dict key JSON cannot hold as ``flatten`` writes it: ``json://``
    and the key's own JSON (a tuple as {"py/tuple": [...]})."""
    if isinstance(value, dict):
        return {key if isinstance(key, (str, int, float, bool, type(None))) else "json://" + sacred_json(_tupled(key)):
                _json_keys(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_keys(item) for item in value]
    return value


def _tupled(key: Any) -> Any:
    return {"py/tuple": [_tupled(item) for item in key]} if isinstance(key, tuple) else key


def stored_text(text: str, width: int, measure: Callable[[str], int] = len) -> str:
    """A status or a name as every sink stores it (docs/sinks.md, "Values every sink stores
    alike"): NUL, which PostgreSQL refuses in text, as U+FFFD; and beyond ``width`` (as
    ``measure`` counts), its start, "…" and 8 hex digits of the whole text's md5, so two long
    names stay two."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    if measure(text) <= width:
        return text
    tail = "…" + hashlib.md5(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    room = width - measure(tail)
    head = text[:room]
    while measure(head) > room:  # bytes: a character may take several
        head = head[:-1]
    return head + tail


def utf8_length(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def stored_status(status: str | None) -> str | None:
    return None if status is None else stored_text(status, STATUS_WIDTH)


def stored_name(name: str) -> str:
    """An artifact's or a metric's name, as stored: within 255 bytes of UTF-8, so within a
    255-character column and a file name alike."""
    return stored_text(name, NAME_WIDTH, utf8_length)


def stored_names(names: list[str]) -> list[str]:
    """``stored_name`` of each metric name: ``names`` itself when none changes (as nearly
    always; each distinct name is looked at once)."""
    changed = {name: stored for name in set(names) if (stored := stored_name(name)) != name}
    return [changed.get(name, name) for name in names] if changed else names


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
    "status": lambda state: stored_status(state.status),
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

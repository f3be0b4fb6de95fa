"""Any Sacred observer as a sink: the runs wrapped by ``runrelay.durable`` fed to it.

    [sinks.TinyDbObserver]                      # the name the wrapper was given
    url = "observer://sacred.observers:TinyDbObserver"
    args = { path = "/data/runs_db" }           # keyword arguments for the class

``feed`` turns a batch into the calls Sacred makes (``started_event``, ``heartbeat_event``,
``log_metrics``, ``artifact_event`` and ``resource_event`` with the journal's copy of the
file, the ending); the producer's feeder (``eventlog.durable``) and this sink both use it,
each saving the run's hand-off record (``eventlog.handoff``) after every call. The sink
feeds a run only once it holds the run's feeder lock (the experiment's feeder is gone), from
the record on; docs/durable.md says what is delivered when and how often.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from runrelay.eventlog.events import Status
from runrelay.eventlog.handoff import ID, BadObserverName, HandOff, Record, check_name
from runrelay.eventlog.fsutil import NotRegularFile
from runrelay.sinks.base import (
    Batch, PermanentSinkError, RunDeferred, RunSource, Sink, SinkConfigError, TransientSinkError,
)
from runrelay.sinks.sacred import untuple

log = logging.getLogger("runrelay.sinks.observer")

SCHEME = "observer"
REATTACH_HOOK = "runrelay_reattach"  # observer.runrelay_reattach(_id): take up the run it started as _id
# Errors that say the observer's backend is out of reach for now (retried), by the qualified
# name of a class in the error's MRO; every other error from the observer is permanent.
TRANSIENT_ERRORS = (
    "builtins.ConnectionError", "builtins.TimeoutError", "urllib.error.URLError", "http.client.HTTPException",
    "sqlalchemy.exc.OperationalError", "sqlalchemy.exc.InterfaceError", "sqlalchemy.exc.DisconnectionError",
    "pymongo.errors.ConnectionFailure", "socket.gaierror",
)


class ObserverCallFailed(Exception):
    """The wrapped observer raised in ``call`` for the event at ``seq`` (None: a beat, found
    by the daemon's bisection)."""

    def __init__(self, call: str, seq: int | None, error: BaseException):
        super().__init__(f"{call} raised {type(error).__name__}: {error}")
        self.call, self.seq, self.error = call, seq, error


def is_transient(error: BaseException, extra: tuple[str, ...] = ()) -> bool:
    status = getattr(error, "code", None) if type(error).__name__ == "HTTPError" else None
    if isinstance(status, int):  # urllib's HTTPError: a URLError, but only throttling and 5xx pass
        return status == 429 or status >= 500
    names = {f"{kind.__module__}.{kind.__qualname__}" for kind in type(error).__mro__}
    if names & set(TRANSIENT_ERRORS + extra):
        return True
    return type(error) is OSError  # a bare OSError is a socket's (files raise its subclasses)


def feed(observer, batch: Batch, record: Record, files: RunFiles, save: Callable[[Record], None],
         going_on: Callable[[], bool] = lambda: True) -> Record:
    """Feed ``observer`` the part of ``batch`` above ``record``, saving the record after each
    call; returns the last one saved. ``going_on`` is asked before each call. An observer
    that raises stops the feed: ObserverCallFailed, the record left at the last call that
    returned.

    The calls, in order: the run's start; one ``heartbeat_event`` with the batch's last beat
    (a beat replaces the one before, so it stands for every beat of the batch); then, in seq
    order, ``log_metrics`` for the points up to each file event and that file event; the
    ending. So after each call, every event below the next call's first seq has been fed:
    that is the record's ``fed_through``."""
    part = batch.after(record.fed_through)
    if part is None:
        return record
    state, observer_id = part.state, record.observer_id
    calls: list[tuple[int | None, str, int | None, Callable[[], Any]]] = []  # (first seq, name, culprit, call)
    if part.first_seq == 0:
        first_call = "queued_event" if state.start_time is None else "started_event"
        calls.append((0, first_call, 0, lambda: start(observer, state, files)))
    if "heartbeat" in part.changed:
        calls.append((None, "heartbeat_event", None, lambda: observer.heartbeat_event(
            copy.deepcopy(state.info), state.captured_out, state.heartbeat, copy.deepcopy(state.result))))
    items = sorted([(item["seq"], "artifact_event", item) for item in part.artifacts]
                   + [(item["seq"], "resource_event", item) for item in part.resources], key=lambda entry: entry[0])
    before = part.first_seq - 1
    for seq, name, item in [*items, (None, None, None)]:
        points = part.points.after(before) if seq is None else part.points.after(before).before(seq)
        if len(points):
            calls.append((points.seqs[0], "log_metrics", None,
                          lambda points=points: observer.log_metrics(_metrics_by_name(points), copy.deepcopy(state.info))))
        if seq is not None:
            calls.append((seq, name, seq, lambda name=name, seq=seq, item=item: _file_event(observer, files, name, seq, item)))
            before = seq
    if state.finished and state.last_seq in _uncovered(part):
        calls.append((state.last_seq, "ending", state.last_seq, lambda: _end(observer, state)))

    for index, (first, name, culprit, call) in enumerate(calls):
        if not going_on():
            break
        try:
            result = call()
        except Exception as error:  # noqa: BLE001 - whatever the observer raises
            raise ObserverCallFailed(name, culprit, error) from error
        if name in ("started_event", "queued_event"):
            observer_id = _plain_id(result)
        following = calls[index + 1][0] if index + 1 < len(calls) else part.last_seq + 1
        through = first if following is None else following - 1  # None: the beat after the start
        record = Record(max(record.fed_through, through), observer_id)
        save(record)
    return record


def _file_event(observer, files: RunFiles, name: str, seq: int, item: dict) -> None:
    if name == "artifact_event":
        observer.artifact_event(item["name"], files.copy(item["digest"], seq, item["name"]),
                                copy.deepcopy(item.get("metadata")), item.get("content_type"))
    else:
        observer.resource_event(files.copy(item["digest"], seq, item["filename"]))


def _uncovered(part: Batch) -> set[int]:
    """Seqs of ``part`` that are not metric points, artifacts or resources."""
    covered = set(part.points.seqs) | {item["seq"] for item in part.artifacts} | {item["seq"] for item in part.resources}
    return set(range(part.first_seq, part.last_seq + 1)) - covered - part.skipped


def start(observer, state, files: "RunFiles", _id=None):
    """``started_event`` (or ``queued_event``) with what Sacred hands the first observer:
    ``_id`` None, so the observer assigns its own; the sources from the journal's copies."""
    described = dict(command=state.command, host_info=untuple(state.host), config=copy.deepcopy(state.config),
                     meta_info=copy.deepcopy(state.meta), _id=_id)
    if state.start_time is None:
        return observer.queued_event(files.ex_info(state), queue_time=state.queue_time, **described)
    observer_id = observer.started_event(files.ex_info(state), start_time=state.start_time, **described)
    adapter = _adapter(observer)
    if adapter is not None and adapter.started is not None:
        adapter.started(observer, state.experiment.get("base_dir"))
    return observer_id


def _plain_id(value):
    """The id an observer returned, as the hand-off record keeps it: an int, or a string that
    is a safe name (``eventlog.handoff.ID``); any other is not kept (logged), and a feeder
    that takes the run over cannot reattach the observer to it."""
    if value is None or type(value) is int:
        return value
    if ID.match(str(value)):
        return str(value)
    log.warning("the observer returned the id %r, which the hand-off record cannot keep; the daemon cannot take "
                "this run over mid-run", value)
    return None


def _end(observer, state) -> None:
    """The ending Sacred would call: a death verdict with the configured dead status is an
    ``interrupted_event`` with that status (``failed_event`` if the status is FAILED)."""
    if state.status == Status.COMPLETED.value:
        observer.completed_event(state.stop_time, copy.deepcopy(state.result))
    elif state.status == Status.FAILED.value:
        observer.failed_event(state.stop_time, list(state.fail_trace or ()))
    else:
        observer.interrupted_event(state.stop_time, state.status)


def _metrics_by_name(points) -> dict:
    """Points in the form Sacred hands ``log_metrics`` (``linearize_metrics``)."""
    series: dict[str, dict] = {}
    for name, step, value, timestamp in zip(points.names, points.steps, points.values, points.timestamps):
        entry = series.setdefault(name, {"steps": [], "values": [], "timestamps": []})
        entry["steps"].append(step)
        entry["values"].append(value)
        entry["timestamps"].append(timestamp)
    return series


class RunFiles:
    """Private copies of a run's files, taken from the journal's blob store, for the observer
    feeding it: named as the files were, and kept until ``close`` (TinyDbObserver opens its
    run's files again at every save)."""

    def __init__(self, source: RunSource, run: str):
        self.source, self.run = source, run
        self._dir: Path | None = None

    def copy(self, digest: str, seq: int, name: str) -> str:
        """The path of a copy of blob ``digest``, named ``name``'s base name."""
        target = self._directory() / str(seq) / _safe_name(name)
        if not target.exists():
            self._copy(digest, target)
        return str(target)

    def ex_info(self, state) -> dict:
        """``ex_info`` with its sources copied into a private ``base_dir``, each at its
        relative name (a name that would lead out of it: at its base name)."""
        base = (self._directory() / "sources").resolve()
        for item in state.sources:
            target = (base / item["name"]).resolve()
            if base not in target.parents:
                target = base / _safe_name(item["name"])
            if not target.exists():
                self._copy(item["digest"], target)
        return {**untuple(state.experiment), "base_dir": str(base)}

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _directory(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="runrelay-observer-"))
        return self._dir

    def _copy(self, digest: str, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}.part")
        with self.source.open_blob(self.run, digest) as blob, open(temp, "wb") as copy:
            shutil.copyfileobj(blob, copy)
        os.replace(temp, target)


def _safe_name(name: str) -> str:
    base = os.path.basename(name or "")
    return base if base not in ("", ".", "..") else "file"


# --- taking up a run another feeder started ---------------------------------------------------


@dataclass(frozen=True)
class Adapter:
    """What runrelay knows of one observer class: how to take up a run it started as
    ``_id`` on a fresh instance, and what to put back after ``started_event`` (the
    ``base_dir`` Sacred gave, not the private copy the sources were read from)."""

    reattach: Callable[[Any, Any], None]
    started: Callable[[Any, str | None], None] | None = None
    prepare: Callable[[Any], None] | None = None  # called on every instance before it is fed


def prepare(observer) -> None:
    """Make ``observer`` fit to be fed from the journal, if its adapter says how."""
    adapter = _adapter(observer)
    if adapter is not None and adapter.prepare is not None:
        adapter.prepare(observer)


def _reattach_tinydb(observer, observer_id) -> None:
    from tinydb import Query

    found = observer.runs.search(Query()._id == observer_id)
    if len(found) != 1:
        raise LookupError(f"TinyDbObserver: no single run with _id {observer_id!r} in {observer.root}")
    observer.run_entry, observer.db_run_id = dict(found[0]), found[0].doc_id


def _base_dir_put_back(observer, base_dir: str | None) -> None:
    """For observers that keep ``run_entry`` and write it with ``save`` (TinyDB, Mongo)."""
    observer.run_entry["experiment"]["base_dir"] = base_dir
    observer.save()


def _reattach_file_storage(observer, observer_id) -> None:
    run_dir = Path(observer.basedir) / str(observer_id)  # a safe name: the record's check
    observer.dir = str(run_dir)
    observer.run_entry = json.loads((run_dir / "run.json").read_text())
    observer.config = json.loads((run_dir / "config.json").read_text())
    info = run_dir / "info.json"
    observer.info = json.loads(info.read_text()) if info.exists() else {}
    cout = run_dir / "cout.txt"
    observer.cout = cout.read_bytes().decode("utf-8", "replace") if cout.exists() else ""
    observer.cout_write_cursor = len(observer.cout)


def _file_storage_prepare(observer) -> None:
    """Its JSON files written as Sacred writes them, but by temp file and rename: a kill -9
    mid-write leaves the last whole file, never a torn one a feeder after it cannot read."""
    from sacred.serializer import flatten

    def save_json(obj, filename):
        path = os.path.join(observer.dir, filename)
        with open(f"{path}.runrelay-tmp", "w") as file:
            json.dump(flatten(obj), file, sort_keys=True, indent=2)
        os.replace(f"{path}.runrelay-tmp", path)

    observer.save_json = save_json


def _file_storage_started(observer, base_dir: str | None) -> None:
    observer.run_entry["experiment"]["base_dir"] = base_dir
    observer.save_json(observer.run_entry, "run.json")


def _reattach_sql(observer, observer_id) -> None:
    from sacred.observers.sql_bases import Run

    observer.run = observer.session.query(Run).filter_by(run_id=str(observer_id)).one()


def _reattach_mongo(observer, observer_id) -> None:
    entry = observer.runs.find_one({"_id": observer_id})
    if entry is None:
        raise LookupError(f"MongoObserver: no run with _id {observer_id!r} in {observer.runs.full_name}")
    entry["resources"] = [tuple(resource) for resource in entry.get("resources", [])]  # as Sacred keeps them
    # A metric created by the last log_metrics before a kill may not have reached the run
    # document yet (the next save writes it): its id is in the metrics collection.
    metrics = [{"name": metric["name"], "id": str(metric["_id"])}
               for metric in observer.metrics.find({"run_id": observer_id}).sort("_id")]
    if metrics:
        entry.setdefault("info", {})["metrics"] = metrics
    observer.run_entry = entry


def _mongo_prepare(observer) -> None:
    """Its run document written with pymongo's errors raised (Sacred's ``save`` passes over
    AutoReconnect and its ``final_save`` ends in a pickle in a temp dir, so a lost write
    would count as fed); the metric ids ``log_metrics`` creates kept in the run's ``info``
    (the journal's info, which each beat brings, does not have them); an artifact or a
    resource whose save raised taken off the run again (the call is fed again); an
    artifact's content type guessed as Sacred guesses it, without printing into the
    experiment's output (or the daemon's)."""
    from pymongo.errors import InvalidDocument
    from sacred.observers.mongo import force_bson_encodeable, mimetype_detector

    def write(upsert: bool = False) -> None:
        observer.runs.update_one({"_id": observer.run_entry["_id"]}, {"$set": observer.run_entry}, upsert=upsert)

    def final_save(attempts: int) -> None:  # Sacred's attempts: the feed's retries are ours
        try:
            write(upsert=True)
        except InvalidDocument:  # as Sacred's final_save: stored with the offending values made storable
            observer.run_entry = force_bson_encodeable(observer.run_entry)
            write(upsert=True)

    log_metrics, heartbeat_event = observer.log_metrics, observer.heartbeat_event

    def keeping_metric_ids(info, captured_out, beat_time, result):
        ids = observer.run_entry["info"].get("metrics")
        heartbeat_event({**info, "metrics": ids} if ids else info, captured_out, beat_time, result)

    def undone_on_error(method, key: str):
        def call(*args, **kwargs):
            kept = list(observer.run_entry[key])
            try:
                return method(*args, **kwargs)
            except Exception:
                observer.run_entry[key] = kept
                raise
        return call

    observer.save, observer.final_save = write, final_save
    observer._try_to_detect_content_type = lambda filename: mimetype_detector.guess_type(filename)[0]
    observer.log_metrics = lambda metrics_by_name, info: log_metrics(metrics_by_name, observer.run_entry["info"])
    observer.heartbeat_event = keeping_metric_ids
    observer.artifact_event = undone_on_error(observer.artifact_event, "artifacts")
    observer.resource_event = undone_on_error(observer.resource_event, "resources")


# the qualified name of an observer class -> its adapter (docs/durable.md)
ADAPTERS: dict[str, Adapter] = {
    "sacred.observers.tinydb_hashfs.tinydb_hashfs.TinyDbObserver": Adapter(_reattach_tinydb, _base_dir_put_back),
    "sacred.observers.file_storage.FileStorageObserver": Adapter(
        _reattach_file_storage, _file_storage_started, _file_storage_prepare),
    "sacred.observers.sql.SqlObserver": Adapter(_reattach_sql),
    "sacred.observers.mongo.MongoObserver": Adapter(_reattach_mongo, _base_dir_put_back, _mongo_prepare),
}


def _adapter(observer) -> Adapter | None:
    for kind in type(observer).__mro__:
        adapter = ADAPTERS.get(f"{kind.__module__}.{kind.__qualname__}")
        if adapter is not None:
            return adapter
    return None


def reattach(observer, observer_id) -> None:
    """Give a fresh ``observer`` back its state for the run it started as ``observer_id``:
    its own ``runrelay_reattach`` hook, else a known adapter; NotImplementedError if neither
    (the caller then calls ``started_event`` again with that ``_id``)."""
    hook = getattr(observer, REATTACH_HOOK, None)
    if hook is not None:
        hook(observer_id)
        return
    adapter = _adapter(observer)
    if adapter is None:
        raise NotImplementedError(f"{type(observer).__name__} has no reattach adapter or {REATTACH_HOOK} hook")
    adapter.reattach(observer, observer_id)


# --- the sink ------------------------------------------------------------------------------------


def observer_class(url: str) -> type:
    """The class ``observer://module:Class`` names, imported; SinkConfigError saying what to fix."""
    scheme, _, target = url.partition("://")
    module_name, colon, class_name = target.partition(":")
    if scheme.lower() != SCHEME or not colon or not module_name or not class_name.isidentifier():
        raise SinkConfigError("expected observer://module:Class (e.g. observer://sacred.observers:TinyDbObserver)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise SinkConfigError(f"cannot import {module_name!r} ({error}); install it in the daemon's Python "
                              "or put it on its PYTHONPATH") from None
    kind = getattr(module, class_name, None)
    if not isinstance(kind, type):
        raise SinkConfigError(f"{module_name} has no class {class_name!r}")
    return kind


def _args_option(value: Any) -> dict:
    if not isinstance(value, dict) or not all(isinstance(key, str) and key.isidentifier() for key in value):
        raise SinkConfigError("expected a table of keyword arguments for the observer class, e.g. "
                              'args = { path = "runs_db" }')
    return dict(value)


def _error_names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(name, str) and "." in name for name in value):
        raise SinkConfigError('expected a list of qualified exception class names, e.g. ["requests.ConnectionError"]')
    return tuple(value)


class ObserverSink(Sink):
    """Feeds the runs wrapped with this sink's name to a Sacred observer built from the
    daemon's configuration (one instance per run while it is fed)."""

    OPTIONS = {**Sink.OPTIONS, "args": _args_option, "transient_errors": _error_names}

    def __init__(self, name: str, url: str, options: Mapping[str, Any], source: RunSource):
        super().__init__(name, url, options, source)
        try:
            check_name(name)
        except BadObserverName as error:
            raise SinkConfigError(str(error)) from None
        self.kind = observer_class(url)
        self.args = self.options.get("args", {})
        self.transient = self.options.get("transient_errors", ())
        self._observers: dict[str, tuple[Any, RunFiles]] = {}  # run -> the instance feeding it, its files

    @classmethod
    def identity(cls, url: str) -> str:
        return observer_class(url).__name__  # the wrapper's default name: the class's

    def open(self) -> None:
        pass  # an observer connects when built, run by run: a backend down is that run's transient error

    def close(self) -> None:
        for run in list(self._observers):
            self._drop(run)

    def applied(self, run: str) -> int:
        try:
            record = self._handoff(run).read()
        except OSError:
            return -1  # said by apply, which cannot read it either
        return -1 if record is None else record.fed_through

    def apply(self, batch: Batch) -> None:
        handoff = self._handoff(batch.run)
        try:
            if handoff.read() is None:
                return  # not wrapped with this name (the record precedes the first event), or not a valid record
            with self._held(handoff, batch):
                self._feed(handoff, batch)
        except (OSError, NotRegularFile) as error:  # the run directory (not the observer) cannot be read or written
            raise PermanentSinkError(f"run {batch.run}: its hand-off record: {error}", batch.first_seq) from None

    @contextlib.contextmanager
    def _held(self, handoff: HandOff, batch: Batch):
        if not handoff.try_lock():
            raise RunDeferred(f"run {batch.run} is fed by its own process")
        try:
            yield
        finally:
            handoff.release()

    def _feed(self, handoff: HandOff, batch: Batch) -> None:
        record = handoff.read()  # again: the experiment's feeder may have moved it until it let go
        if record is None:
            return
        observer, files = self._observer(batch.run, record, batch.state)
        try:
            feed(observer, batch, record, files, handoff.save)
        except ObserverCallFailed as failed:
            self._drop(batch.run)  # its state may be half-changed: the next try reattaches
            raise self._classified(failed) from failed.error
        if batch.state.ended:
            self._drop(batch.run)

    def redeliver(self, batch: Batch) -> None:
        raise PermanentSinkError("an observer sink cannot feed a dead letter again out of order; drop it, or feed "
                                 "the observer by hand")

    def _handoff(self, run: str) -> HandOff:
        return HandOff(Path(self.source.run_dir(run)), self.name)

    def _observer(self, run: str, record: Record, state) -> tuple[Any, RunFiles]:
        """The instance feeding ``run`` and its files: built for it, and given back the run
        it started when a feeder fed it before."""
        if run in self._observers:
            return self._observers[run]
        step, files = f"{self.kind.__name__}()", RunFiles(self.source, run)
        try:
            observer = self.kind(**self.args)
            prepare(observer)
            if record.fed_through >= 0:
                step = "reattach"
                try:
                    reattach(observer, record.observer_id)
                except NotImplementedError:
                    step = "started_event again"
                    start(observer, state, files, _id=record.observer_id)
        except Exception as error:  # noqa: BLE001 - whatever the observer raises
            files.close()
            raise self._classified(ObserverCallFailed(step, None, error)) from error
        self._observers[run] = observer, files
        return observer, files

    def _drop(self, run: str) -> None:
        _, files = self._observers.pop(run, (None, None))
        if files is not None:
            files.close()

    def _classified(self, failed: ObserverCallFailed) -> Exception:
        message = f"{self.kind.__name__}.{failed}"
        if is_transient(failed.error, self.transient):
            return TransientSinkError(message)
        return PermanentSinkError(message, failed.seq)

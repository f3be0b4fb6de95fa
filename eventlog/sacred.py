"""Journaling Sacred runs: ``JournalObserver`` and the ``--journal`` command-line flag.

    ex = Experiment("demo", additional_cli_options=[journal_option])  # python demo.py -j DIR
    ex.observers.append(JournalObserver())                           # or attach it in code

See docs/sacred.md for what is journaled when, and why.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import queue
import sys
import threading
from pathlib import Path

from sacred.commandline_options import cli_option
from sacred.observers.base import RunObserver
from sacred.run import Run
from sacred.serializer import flatten

from runrelay.eventlog.errors import JournalWriteError
from runrelay.eventlog.events import Kind, metric_value
from runrelay.eventlog.location import default_journal_dir
from runrelay.eventlog.recorder import append_heartbeat, journal_ending, process_info
from runrelay.eventlog.writer import Durability, JournalWriter

# Above every Sacred observer (theirs default to 10-40): the journal copies what Sacred
# hands the observers before any other observer changes it in place.
PRIORITY = 10_000


class JournalObserver(RunObserver):
    """Journals every event Sacred hands its observers (docs/events.md), one writer per run."""

    priority = PRIORITY

    def __init__(self, journal_dir: str | os.PathLike | None = None, durability: Durability = Durability()):
        self.journal_dir = default_journal_dir() if journal_dir is None else Path(journal_dir)
        self.durability = durability
        self._writer: JournalWriter | None = None
        self._first: tuple | None = None  # the run's first event while Sacred settles its _id
        self._unsettled: Run | None = None  # the Run whose _id the first event waits for
        self._journaled_out = ""
        self._metrics_hooked = False

    @property
    def run_uid(self) -> str | None:
        """The uid of the run being journaled (or last journaled)."""
        return self._writer.run if self._writer else None

    def queued_event(self, ex_info, command, host_info, queue_time, config, meta_info, _id):
        return self._begin(Kind.QUEUED, _id, ex_info, command, host_info, config, meta_info, queue_time=queue_time)

    def started_event(self, ex_info, command, host_info, start_time, config, meta_info, _id):
        return self._begin(Kind.STARTED, _id, ex_info, command, host_info, config, meta_info, start_time=start_time)

    def heartbeat_event(self, info, captured_out, beat_time, result):
        try:
            info, result = _flat(info, changing_elsewhere=True), _flat(result, changing_elsewhere=True)
        except RuntimeError:
            # The experiment changed info while this (heartbeat) thread read it. Skip this
            # beat: raising would make Sacred drop the observer for the rest of the run.
            return
        body = {"beat_time": beat_time, "info": info, "result": result}
        self._journaled_out = append_heartbeat(self._writer, body, self._journaled_out, captured_out)

    def log_metrics(self, metrics_by_name, info):
        if self._metrics_hooked:
            return  # every point was journaled when it was logged
        # Fallback when started_event could not find the Run (called from outside Sacred's
        # Run): journal the points Sacred hands over at the heartbeat.
        for name, series in metrics_by_name.items():
            for step, value, timestamp in zip(series["steps"], series["values"], series["timestamps"]):
                with contextlib.suppress(JournalWriteError):  # logged by the writer; the run goes on
                    self._writer.append_metric(name, step, _metric_value(value), timestamp)

    def resource_event(self, filename):
        with contextlib.suppress(JournalWriteError):  # logged by the writer; the run goes on
            self._writer.append(Kind.RESOURCE, {"filename": filename, **self._writer.store_file(filename)})

    def artifact_event(self, name, filename, metadata=None, content_type=None):
        with contextlib.suppress(JournalWriteError):  # logged by the writer; the run goes on
            stored = self._writer.store_file(filename)  # before the event: the file may go away next
            body = {"name": name, "filename": filename, **stored, "metadata": _flat(metadata)}
            self._writer.append(Kind.ARTIFACT, {**body, "content_type": content_type})

    def completed_event(self, stop_time, result):
        self._end(Kind.COMPLETED, {"stop_time": stop_time, "result": _flat(result)})

    def interrupted_event(self, interrupt_time, status):
        self._end(Kind.INTERRUPTED, {"interrupt_time": interrupt_time, "status": status})

    def failed_event(self, fail_time, fail_trace):
        self._end(Kind.FAILED, {"fail_time": fail_time, "fail_trace": list(fail_trace)})

    def _begin(self, kind, _id, ex_info, command, host_info, config, meta_info, **when):
        """Take the run's first event; return the run's _id, or None so that the observers
        after this one assign theirs as they would without runrelay (Sacred keeps the first
        _id returned and hands it to the observers after)."""
        self._writer = self._first = self._unsettled = None
        body = {  # copied now: the observers after this one change what Sacred hands them
            "ex_info": _flat(ex_info),
            "command": command,
            "host_info": _flat(host_info),
            **when,
            "config": _flat(config),
            "meta_info": _flat(meta_info),
        }
        self._first = (kind, body, [(name, os.path.join(ex_info["base_dir"], name)) for name, _ in ex_info["sources"]])
        run = _calling_run(self)
        self._metrics_hooked = run is not None
        if run is not None and kind is Kind.STARTED:
            _hook_metrics(run, self._journal_metric)
        if run is None or _id is not None:  # called from outside Sacred's Run, or the _id is settled
            return self._settled(_id)
        self._unsettled = run
        run.observers.append(_SettledId(self))
        return None

    def _settled(self, _id):
        """Journal the first event now that Sacred's _id is known; without one, this
        journal's run uid becomes the run's _id."""
        self._unsettled = None
        self._journal_first(_id)
        return self._writer.run if _id is None else _id

    def _journal_first(self, sacred_id) -> None:
        """Open the run's journal and write its first event, with the _id Sacred settled on
        (if any) as ``sacred_id``."""
        (kind, body, sources), self._first = self._first, None
        writer = JournalWriter.create(self.journal_dir, durability=self.durability)
        try:
            self._opened(writer)
            body["sources"] = [{"name": name, **writer.store_file(path)} for name, path in sources]
            if kind is Kind.STARTED:
                body["process"] = process_info()
            if sacred_id is not None:
                body["sacred_id"] = sacred_id
            writer.append(kind, body)
        except BaseException:
            writer.abandon()
            raise
        if kind is Kind.QUEUED:
            writer.close()  # Sacred's queue-only mode emits nothing after queued
        self._writer = writer
        self._journaled_out = ""

    def _opened(self, writer: JournalWriter) -> None:
        """The run's journal is open and holds no event yet (a hook for ``eventlog.durable``)."""

    def _end(self, kind: Kind, body: dict) -> None:
        if self._first is not None:  # an observer after this one failed to start: Sacred ends the run
            self._journal_first(getattr(self._unsettled, "_id", None))
        if self._writer is not None:  # else the run failed before its journal could be opened
            journal_ending(self._writer, kind, body)

    def _journal_metric(self, entry) -> None:
        value = entry.value
        if type(value) is not float and type(value) is not int:
            value = _flat(value)
        self._writer.append_metric(entry.name, entry.step, value, entry.timestamp)


class _SettledId(RunObserver):
    """Appended to the Run's observers while Sacred calls them, so it is called after every
    other observer, with the _id Sacred settled on, and journals the run's first event."""

    priority = -PRIORITY  # last, should the observers ever be sorted again

    def __init__(self, journal: JournalObserver):
        self.journal = journal

    def queued_event(self, ex_info, command, host_info, queue_time, config, meta_info, _id):
        return self.journal._settled(_id)

    def started_event(self, ex_info, command, host_info, start_time, config, meta_info, _id):
        return self.journal._settled(_id)


@cli_option("-j", "--journal")
def journal_option(args, run):
    """Journal this run into the directory given (runrelay's crash-safe journal)."""
    run.observers.append(JournalObserver(args))


class _JournalingQueue(queue.Queue):
    """Sacred's queue of logged metrics, journaling each entry as it is put.

    Sacred's observers only see metrics at the next heartbeat (10 s by default), so a
    ``kill -9`` or power loss drops everything logged since the last beat. Journaling in
    ``put`` means a point is in the journal when ``log_scalar`` returns; the entry is still
    queued so the other observers get it at the heartbeat as before.
    """

    def __init__(self, journal):
        super().__init__()
        self.journals = [journal]  # one per JournalObserver of the run
        self._order = threading.Lock()  # journal order == queue order across threads

    def put(self, item, block=True, timeout=None):
        with self._order:
            for journal in self.journals:
                try:
                    journal(item)
                except JournalWriteError:  # logged by the writer; like Sacred, the run goes on
                    pass
            super().put(item, block, timeout)


def _calling_run(observer: RunObserver) -> Run | None:
    """The Sacred Run calling ``observer``, if any: ``Run._emit_started`` (or ``_emit_queued``)
    calls the observers, so the Run is ``self`` of a calling frame."""
    frame = sys._getframe(1)
    while frame is not None:
        run = frame.f_locals.get("self")
        if isinstance(run, Run) and any(other is observer for other in run.observers):
            return run
        frame = frame.f_back
    return None


def _hook_metrics(run: Run, journal) -> None:
    """Make ``run`` journal its metrics as they are logged; its metrics logger has only the
    queue Sacred drains at heartbeats."""
    metrics = run._metrics
    if isinstance(metrics._logged_metrics, _JournalingQueue):
        metrics._logged_metrics.journals.append(journal)
    else:
        metrics._logged_metrics = _JournalingQueue(journal)  # empty: main has not run yet


def _metric_value(value):
    # Sacred's FileStorageObserver stores flatten(value); plain numbers (nearly every point)
    # are already in that form, and flatten is slow.
    if type(value) in (int, float):
        return value
    value = metric_value(value)  # a NumPy scalar becomes the number it stands for
    return value if type(value) in (int, float) else _flat(value)


def _flat(value, changing_elsewhere: bool = False):
    """Sacred's ``flatten`` form (what its observers store), except that datetimes stay
    datetimes (the journal keeps their type). ``flatten`` builds new objects, so nothing
    journaled aliases Sacred's dicts, which it mutates in place.

    A dict or list ``flatten`` fails on has each of its parts flattened on its own, so that
    only the part it fails on is journaled as it is (the writer keeps what it can of it and
    marks the rest), never failing the run; with ``changing_elsewhere``, except when another
    thread changed it while it was read (RuntimeError): the caller skips it."""
    return _flat_parts(value, changing_elsewhere, _FLAT_PARTS_DEPTH)


_FLAT_PARTS_DEPTH = 100  # levels ``_flat`` descends into a value ``flatten`` fails on (a deep
# one fails for Python's recursion limit, which descending any further would meet too)


def _flat_parts(value, changing_elsewhere: bool, depth: int):
    try:
        return _keep_datetimes(value, flatten(value))
    except Exception as error:  # noqa: BLE001 - whatever a user's object raises
        if changing_elsewhere and type(error) is RuntimeError:
            raise
    if depth and type(value) is dict:
        return {key: _flat_parts(item, changing_elsewhere, depth - 1) for key, item in value.items()}
    if depth and type(value) in (list, tuple):
        return [_flat_parts(item, changing_elsewhere, depth - 1) for item in value]
    return value


def _keep_datetimes(original, flat):
    """Put back the datetimes found in ``original`` where ``flatten`` encoded them.

    Walking both side by side keeps ``flatten``'s own output everywhere else (references
    to shared objects, escaped keys); only plain dicts, lists and tuples are entered.
    """
    if type(original) is dt.datetime:
        return original if isinstance(flat, dict) and flat.get("py/object") == "datetime.datetime" else flat
    if type(original) is dict and type(flat) is dict:
        return {key: _keep_datetimes(original[key], value) if key in original else value for key, value in flat.items()}
    if type(original) is tuple and type(flat) is dict and "py/tuple" in flat:
        return {"py/tuple": _keep_datetimes(list(original), flat["py/tuple"])}
    if type(original) is list and type(flat) is list and len(original) == len(flat):
        return [_keep_datetimes(item, value) for item, value in zip(original, flat)]
    return flat

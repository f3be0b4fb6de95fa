"""Any Sacred observer behind the journal: ``runrelay.durable(observer)``.

    ex.observers.append(runrelay.durable(TinyDbObserver("runs_db")))

Every event is journaled first, as ``JournalObserver`` journals it; one background thread
per run then feeds the wrapped observer from the journal, so the experiment never waits for
it or fails because of it. What the thread has not fed when the run ends (after a short
bounded wait) or dies is fed by the daemon's sink of the same name (``sinks.observer``),
from the run's hand-off record (``eventlog.handoff``). docs/durable.md has the whole story.

The feed itself is ``sinks.observer.feed``, shared with the daemon's sink, so that both
make the same calls for the same events.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref

from runrelay.eventlog.events import Kind, Status
from runrelay.eventlog.fold import Folding, RunState, passed
from runrelay.eventlog.handoff import HandOff, Record, check_name
from runrelay.eventlog.reader import Journal, Position
from runrelay.eventlog.sacred import JournalObserver
from runrelay.eventlog.writer import Durability, JournalWriter
from runrelay.sinks.base import Batch
from runrelay.sinks.observer import ObserverCallFailed, RunFiles, feed, is_transient, prepare

log = logging.getLogger("runrelay.durable")

DRAIN_SECONDS = 5.0  # at the end of a run, how long the experiment waits for the feeder
IN_FLIGHT_SECONDS = 5.0  # at exit, how long a feeder's call in flight may take to return (and be recorded)
POLL_SECONDS = 1.0  # the feeder looks at the journal this often even when not woken
BATCH_RECORDS = 10_000  # journal records the feeder reads at once
RETRY_SECONDS, MAX_RETRY_SECONDS = 0.5, 30.0  # the feeder's backoff while the observer's backend is down


def durable(observer, name: str | None = None, journal_dir: str | os.PathLike | None = None,
            durability: Durability = Durability(), drain_seconds: float = DRAIN_SECONDS) -> "DurableObserver":
    """``observer`` fed from runrelay's journal. ``name`` (default: the observer's class
    name, e.g. ``TinyDbObserver``) must be the name of the daemon's sink that feeds it the
    rest: ``[sinks.NAME] url = "observer://module:Class"``."""
    return DurableObserver(observer, name, journal_dir, durability, drain_seconds)


class DurableObserver(JournalObserver):
    """A JournalObserver that also feeds ``observer``, from the journal, in the background."""

    def __init__(self, observer, name: str | None = None, journal_dir: str | os.PathLike | None = None,
                 durability: Durability = Durability(), drain_seconds: float = DRAIN_SECONDS):
        super().__init__(journal_dir, durability)
        prepare(observer)
        self.observer = observer
        self.name = check_name(type(observer).__name__ if name is None else name)
        self.drain_seconds = drain_seconds
        self._feeder: _Feeder | None = None

    def heartbeat_event(self, info, captured_out, beat_time, result):
        super().heartbeat_event(info, captured_out, beat_time, result)
        self._wake()

    def log_metrics(self, metrics_by_name, info):
        super().log_metrics(metrics_by_name, info)
        self._wake()

    def resource_event(self, filename):
        super().resource_event(filename)
        self._wake()

    def artifact_event(self, name, filename, metadata=None, content_type=None):
        super().artifact_event(name, filename, metadata, content_type)
        self._wake()

    def _opened(self, writer: JournalWriter) -> None:
        handoff = HandOff(writer.dir, self.name)
        handoff.begin()  # durable before the run's first event: the daemon then knows the run is wrapped
        previous, self._feeder = self._feeder, _Feeder(self.observer, handoff, writer.journal, writer.run)
        if previous is not None and previous.thread.is_alive():
            # The observer is still busy with the last run (its call outlived the drain):
            # feeding it this run too would mix the two; the daemon feeds this one.
            log.warning("run %s: %s is still busy with the previous run; the daemon feeds this run", writer.run,
                        self.name)
            handoff.release()
            self._feeder = None

    def _journal_first(self, sacred_id) -> None:
        queued = self._first[0] is Kind.QUEUED
        super()._journal_first(sacred_id)
        if self._feeder is not None:
            self._feeder.thread.start()
        if queued:
            self._drain()  # Sacred's queue-only mode emits nothing after queued

    def _journal_metric(self, entry) -> None:
        super()._journal_metric(entry)
        self._wake()

    def _end(self, kind, body: dict) -> None:
        super()._end(kind, body)
        self._drain()

    def _wake(self) -> None:
        if self._feeder is not None:
            self._feeder.wake.set()

    def _drain(self) -> None:
        """Give the feeder up to ``drain_seconds`` to feed the rest, then stop it after the
        call in flight: the daemon feeds what is left."""
        feeder = self._feeder
        if feeder is None:
            return
        feeder.wake.set()
        if feeder.thread.ident is not None:
            feeder.thread.join(self.drain_seconds)
        feeder.stop.set()
        if feeder.thread.is_alive():
            log.info("run %s: %s has not taken every event within %.1f s; the daemon feeds it the rest",
                     feeder.run, self.name, self.drain_seconds)


class _Feeder:
    """The thread feeding one run to the wrapped observer, from the run's journal. It holds
    the run's feeder lock (taken by ``HandOff.begin``) until it returns."""

    def __init__(self, observer, handoff: HandOff, journal: Journal, run: str):
        self.observer, self.handoff, self.journal, self.run = observer, handoff, journal, run
        self.wake, self.stop = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._feed, name=f"runrelay-feed-{run[:8]}", daemon=True)
        _FEEDERS.add(self)

    def _feed(self) -> None:
        files = RunFiles(self.journal, self.run)
        try:
            self._feed_until_done(files)
        except Exception:  # noqa: BLE001 - the experiment comes first; the daemon feeds the rest
            log.exception("run %s: feeding %s stopped; the daemon feeds the rest", self.run, self.handoff.name)
        finally:
            self.handoff.release()
            files.close()

    def _feed_until_done(self, files: RunFiles) -> None:
        record, state, position, delay = Record(), RunState(self.run), Position(), RETRY_SECONDS
        while not self.stop.is_set():
            self.wake.wait(POLL_SECONDS)
            self.wake.clear()
            while not self.stop.is_set():
                records = self.journal.read_batch(self.run, position, BATCH_RECORDS)
                if records.corrupt is not None or not records.records:
                    if records.corrupt is not None:
                        log.error("run %s: %s; the daemon reports it", self.run, records.corrupt)
                        return
                    break
                batch = _batch(self.run, state, records, position.seq)
                try:
                    record = feed(self.observer, batch, record, files, self.handoff.save,
                                  lambda: not self.stop.is_set())
                except ObserverCallFailed as failed:
                    if not is_transient(failed.error):
                        log.error("run %s: %s.%s; the daemon feeds the rest (a permanent failure goes to its "
                                  "dead-letter queue)", self.run, self.handoff.name, failed)
                        return
                    log.warning("run %s: %s.%s; trying again in %.1f s", self.run, self.handoff.name, failed, delay)
                    self.stop.wait(delay)
                    delay = min(delay * 2, MAX_RETRY_SECONDS)
                    continue
                delay = RETRY_SECONDS
                state, position = batch.state, records.end
                if (state.finished or state.status == Status.QUEUED.value) and record.fed_through >= state.last_seq:
                    return


_FEEDERS: "weakref.WeakSet[_Feeder]" = weakref.WeakSet()


@atexit.register
def _let_calls_in_flight_return() -> None:
    """A stopped feeder makes no new call, but the interpreter's exit would cut the one in
    flight between the observer's write and the record's: the daemon would feed it again."""
    for feeder in list(_FEEDERS):
        feeder.stop.set()
        if feeder.thread.is_alive():
            feeder.thread.join(IN_FLIGHT_SECONDS)


def _batch(run: str, state: RunState, records, first_seq: int) -> Batch:
    """The records read as one batch on top of ``state`` (the run through ``first_seq - 1``)."""
    folding, changed = Folding(state), set()
    for event in records.events:
        changed |= folding.add(event)  # MalformedEvent cannot come from our own writer; _feed says it
    last = records.end.seq - 1
    return Batch(run, first_seq, last, passed(folding.state, last), frozenset(changed), records.points)

"""Delivering the journal to one sink: read a batch per run from its cursor, fold, apply, save.

One ``SinkWorker`` per sink, each on its own thread, so a slow or dead sink never holds
up another. Within a sink, runs take turns (one batch per run per pass), so a huge or
broken run never holds up the others. The batches of a pass go to the sink in groups of up
to ``batch_events`` records (``Sink.apply_runs``: one transaction for many small runs where
the sink can), and a group's cursors are saved together, after the sink has taken it:
- a transient error is retried with backoff (``daemon.retry``) until it passes or the
  worker stops (one-shot mode gives up after the policy's budget);
- a permanent error sends the event at fault to the dead-letter queue and the rest of the
  batch is applied without it (``apply_isolating``, the one place that finds the culprit);
- a sink that cannot work as configured is said once and re-checked slowly;
- a run the sink defers (``RunDeferred``: a wrapped observer's run still fed by its own
  process) is left as it is and tried again on a later pass;
- a corrupt journal stops that run only: its good events are delivered, the damage is
  logged and shown by ``runrelay status``; a run that cannot be read (no permission, an
  odd file where a segment belongs) is skipped the same way, and tried again each pass;
- dead letters that ``runrelay dlq retry`` asked for are re-driven between passes, through
  the sink's ``redeliver``;
- a state disk that cannot take a write (full, failing) is waited for: said once, and once
  when it passes (one-shot mode gives up after the policy's budget).
Anything else a sink raises is a bug: the worker records it and crashes, visibly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import heapq
import logging
import threading
import time
from dataclasses import dataclass, field
from itertools import groupby
from typing import Callable, Sequence

from runrelay.daemon import retry
from runrelay.daemon.config import Delivery, RetryPolicy
from runrelay.daemon.dlq import DeadLetters, Letter
from runrelay.daemon.state import Cursor, CursorSave, StateStore, StateUnavailable
from runrelay.daemon.supervisor import Liveness
from runrelay.eventlog import codec
from runrelay.eventlog.codec import EncodeError
from runrelay.eventlog.errors import JournalCorrupt, RunUnreadable, UnknownRun
from runrelay.eventlog.events import Event, Kind, Points
from runrelay.eventlog.fold import (
    SETS, Folding, MalformedEvent, RunState, from_snapshot, metric_point, passed, snapshot,
)
from runrelay.eventlog.reader import Journal, Position, RecordBatch
from runrelay.sinks.base import (
    Batch, PermanentSinkError, RunDeferred, Sink, TransientSinkError, UnusableSinkError,
)

log = logging.getLogger("runrelay.delivery")

REFOLD_RECORDS = 100_000  # records per read when folding a run again (metric records are passed over)
Refuse = Callable[[Event, str], None]
Send = Callable[[Callable[[], object]], object]


class Stretch:
    """Contiguous records of one run, read at once, made into batches without the events
    refused so far. ``state`` is the run folded through the record before the first."""

    def __init__(self, run: str, state: RunState, events: Sequence[Event], points: Points, first_seq: int,
                 last_seq: int):
        self.run, self.state, self.events, self.points = run, state, events, points
        self.first_seq, self.last_seq = first_seq, last_seq
        self.refused: set[int] = set()

    def batch(self, refuse: Refuse, through: int | None = None) -> Batch:
        """The batch through ``through`` (default: all). A malformed event is refused here."""
        through = self.last_seq if through is None else through
        folding, changed = Folding(self.state), set()
        for event in self.events:
            if event.seq > through:
                break
            if event.seq in self.refused:
                continue
            try:
                changed |= folding.add(event)
            except MalformedEvent as error:
                self.refuse(event, str(error), refuse)
        state = folding.state
        points = self.points.before(through + 1)
        if self.refused & set(points.seqs):
            points = points.only(frozenset(points.seqs) - self.refused)
        skipped = frozenset(seq for seq in self.refused if seq <= through)
        return Batch(self.run, self.first_seq, through, passed(state, through), frozenset(changed), points, skipped)

    def covered(self) -> list[int]:
        """Every seq a batch of the whole stretch carries, in order."""
        seqs = heapq.merge((event.seq for event in self.events), self.points.seqs)
        return [seq for seq in seqs if seq not in self.refused]

    def event(self, seq: int) -> Event:
        """The event at ``seq``, a metric point made an event again for the dead-letter queue."""
        for event in self.events:
            if event.seq == seq:
                return event
        index = self.points.seqs.index(seq)
        timestamp = self.points.timestamps[index]
        body = {"name": self.points.names[index], "step": self.points.steps[index],
                "value": self.points.values[index], "timestamp": timestamp}
        appended = dt.datetime.now(dt.timezone.utc) if timestamp is None else timestamp.replace(tzinfo=dt.timezone.utc)
        return Event(self.run, seq, Kind.METRICS, appended, body)

    def refuse(self, event: Event, reason: str, refuse: Refuse) -> None:
        refuse(event, reason)
        self.refused.add(event.seq)


def apply_isolating(apply: Callable[[Batch], None], stretch: Stretch, send: Send, refuse: Refuse) -> Batch:
    """Apply the stretch through ``send`` (the retry wrapper), setting aside refused events.

    On PermanentSinkError the event it names is refused; when it names none the batch holds,
    prefixes are applied (bisecting: a prefix that succeeds is committed, and the sink skips
    it later) until the first event whose prefix fails is found. A refused event goes to
    ``refuse`` (the dead-letter queue, durable before the rest is applied) and the rest is
    applied again, folded without it, so its values never reach the sink through the state.
    Each refusal removes one event: this ends. Returns the batch applied.
    """
    while True:
        batch = stretch.batch(refuse)
        try:
            send(lambda: apply(batch))
            return batch
        except PermanentSinkError as error:
            if error.seq is not None and batch.covers(error.seq):
                culprit, reason = error.seq, str(error)
            else:
                culprit, reason = _culprit(apply, stretch, send, refuse, error)
            stretch.refuse(stretch.event(culprit), reason, refuse)


def _culprit(apply, stretch: Stretch, send: Send, refuse: Refuse, error: PermanentSinkError) -> tuple[int, str]:
    """The first seq whose prefix of the stretch the sink refuses, and why."""
    seqs = stretch.covered()
    low, high, reason = 0, len(seqs) - 1, str(error)  # the prefix through seqs[high] fails
    while low < high:
        middle = (low + high) // 2
        prefix = stretch.batch(refuse, through=seqs[middle])
        try:
            send(lambda: apply(prefix))
            low = middle + 1
        except PermanentSinkError as failure:
            high, reason = middle, str(failure)
    return seqs[low], reason


def apply_runs_isolating(sink: Sink, stretches: Sequence[Stretch], send: Send,
                         refuse: Refuse) -> list[Batch | None]:
    """Apply several runs' stretches with one ``sink.apply_runs``; on PermanentSinkError or
    RunDeferred, each through ``apply_isolating``, which finds the event at fault (what the
    sink took already it skips). Returns the batches applied, in the order of ``stretches``:
    None for a run the sink defers."""
    if len(stretches) > 1:
        batches = [stretch.batch(refuse) for stretch in stretches]
        try:
            send(lambda: sink.apply_runs(batches))
            return batches
        except (PermanentSinkError, RunDeferred):
            pass
    return [_apply_unless_deferred(sink, stretch, send, refuse) for stretch in stretches]


def _apply_unless_deferred(sink: Sink, stretch: Stretch, send: Send, refuse: Refuse) -> Batch | None:
    try:
        return apply_isolating(sink.apply, stretch, send, refuse)
    except RunDeferred:
        return None  # another process feeds it for now: a later pass tries again


@dataclass
class _Run:
    """What a worker knows about one run between batches."""

    cursor: Cursor
    state: RunState | None = None  # folded through cursor.position.seq - 1; built on first need
    stopped: str | None = None  # why delivery of this run stopped (a corrupt or unreadable journal)
    unreadable: bool = False  # stopped because it could not be read: tried again each pass
    reported: str | None = None  # the reason last logged, so that a retried run is logged once
    output_saved: int | None = None  # how much of state.captured_out the state holds; None: unknown


@dataclass
class _Read:
    """A run's next records, read in a pass, waiting for their group to be applied."""

    run: str
    known: _Run
    start: Position
    records: RecordBatch
    refused_before: int  # known.cursor.dead_lettered before the records were applied

    def stretch(self) -> Stretch:
        records = self.records
        return Stretch(self.run, self.known.state, records.events, records.points, self.start.seq,
                       records.end.seq - 1)


@dataclass
class Outcome:
    """What a worker left undone, for ``runrelay sync`` and the logs."""

    gave_up: str | None = None  # the sink stayed down past the retry budget
    state: str | None = None  # the state could not be written within the retry budget
    unusable: str | None = None  # the sink cannot work as configured
    stopped_runs: dict[str, str] = field(default_factory=dict)
    redriven: int = 0
    refused_again: int = 0


class SinkWorker:
    """Delivers every run of a journal to one sink; ``run`` is its loop.

    ``until_us`` makes it one-shot (``runrelay sync``): deliver each run's events appended
    up to that time (µs since the epoch), re-drive requested letters, then return, giving
    up on a sink that stays down. ``redrive_only``: only the requested letters.
    """

    def __init__(self, sink: Sink, identity: str, journal: Journal, store: StateStore, letters: DeadLetters,
                 delivery: Delivery, policy: RetryPolicy, wake: threading.Event, until_us: int | None = None,
                 on_progress: Callable[[int, int], None] = lambda events, nbytes: None, redrive_only: bool = False):
        self.sink = sink
        self.journal = journal
        self.store = store
        self.letters = letters
        self.delivery = delivery
        self.policy = policy
        self.wake = wake
        self.until_us = until_us
        self.redrive_only = redrive_only
        self.on_progress = on_progress
        self.liveness = Liveness()
        self.health = retry.SinkHealth(sink.name, store, identity, None if until_us is None else policy.give_up_seconds)
        self.outcome = Outcome()
        self._runs: dict[str, _Run] = {}
        self._stop = threading.Event()  # run's, once it runs

    @property
    def name(self) -> str:
        return f"sink {self.sink.name}"

    @property
    def one_shot(self) -> bool:
        return self.until_us is not None

    def run(self, stop: threading.Event) -> None:
        """Deliver until ``stop`` is set (one-shot: until nothing is left)."""
        self._stop = stop
        try:
            self._runs = {run: _Run(cursor) for run, cursor in self.store.cursors(self.sink.name).items()}
            while not stop.is_set():
                try:
                    self._send(self.sink.open, stop)
                    self._deliver(stop)
                    return
                except UnusableSinkError as error:
                    self.health.unusable(error, None if self.one_shot else self.policy.unusable_seconds)
                    self.outcome.unusable = str(error)
                    self.sink.close()
                    if self.one_shot:
                        return
                    with self.liveness.idle():
                        stop.wait(self.policy.unusable_seconds)
        except TransientSinkError as error:  # only when stopping, or past a one-shot's budget
            if not stop.is_set():
                self.outcome.gave_up = str(error)
                log.error("sink %s: giving up after %.0f s of retries: %s", self.sink.name,
                          self.policy.give_up_seconds, error)
        except StateUnavailable as error:  # likewise: stopping, or past a one-shot's budget
            if not stop.is_set():
                self.outcome.state = str(error)
                log.error("sink %s: giving up after %.0f s: %s", self.sink.name, self.policy.give_up_seconds, error)
        except Exception as error:
            self.health.crashed(error)  # the supervisor logs the traceback
            raise
        finally:
            self.sink.close()

    def _send(self, function: Callable[[], object], stop: threading.Event):
        return retry.call(function, self.policy, stop, self.health, self.liveness, give_up=self.one_shot)

    def _durably(self, write: Callable[[], object], stop: threading.Event | None = None) -> None:
        """A state write (cursor, dead letter), waited for while the state's disk cannot take
        it. A letter must be durable before the rest of its batch is applied, so delivery
        waits rather than going on without it; the wait backs off as retries do."""
        stop = stop or self._stop
        since, delay = None, self.policy.initial_seconds
        while True:
            try:
                write()
            except StateUnavailable as error:
                if since is None:
                    since = time.monotonic()
                    log.warning("sink %s: %s; delivery waits until it can be written (free space on the state's "
                                "disk)", self.sink.name, error)
                if stop.is_set() or (self.one_shot and time.monotonic() - since > self.policy.give_up_seconds):
                    raise
                with self.liveness.idle():
                    stop.wait(delay)
                delay = min(delay * self.policy.multiplier, self.policy.max_seconds)
                continue
            if since is not None:
                log.info("sink %s: the state takes writes again, after %.1f s", self.sink.name,
                         time.monotonic() - since)
            return

    def _deliver(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.liveness.beat()
            self.wake.clear()
            self._redrive_requested(stop)
            if self.redrive_only:
                return
            delivered, full = self._pass(stop)
            if self.one_shot and not delivered:
                return
            if full or (delivered and self.one_shot):
                continue  # a backlog: on at once
            with self.liveness.idle():
                self.wake.wait()
                stop.wait(self.delivery.batch_wait_seconds)  # let a live run's burst gather

    def _pass(self, stop: threading.Event) -> tuple[bool, bool]:
        """One batch for each run with something pending, applied in groups: whether
        anything was delivered, and whether a batch was full (more is pending)."""
        pending = []
        for run in self.journal.runs():
            known = self._runs.setdefault(run, _Run(Cursor()))
            if known.unreadable:
                known.stopped, known.unreadable = None, False  # its permissions may be fixed by now
                self.outcome.stopped_runs.pop(run, None)
            if not known.cursor.done and not known.stopped:
                pending.append(run)
        new = [run for run in pending if self._runs[run].state is None]
        applied = self._send(lambda: self.sink.applied_runs(new), stop) if new else {}
        delivered = full = False
        group: list[_Read] = []
        grouped = 0  # records in the group
        for run in pending:
            if stop.is_set():
                break
            read = self._read(run, self._runs[run], applied, stop)
            if read is None:
                continue
            group.append(read)
            grouped += read.records.records
            if grouped >= self.delivery.batch_events:
                taken = self._deliver_group(group, stop)
                delivered |= bool(taken)
                full |= any(read.records.records >= self.delivery.batch_events for read in taken)
                group, grouped = [], 0
        if group:
            taken = self._deliver_group(group, stop)  # a stop waits for what was read: the batch in flight
            delivered |= bool(taken)
            full |= any(read.records.records >= self.delivery.batch_events for read in taken)
        return delivered, full

    def _read(self, run: str, known: _Run, applied: dict[str, int], stop: threading.Event) -> _Read | None:
        """The run's next records (None: nothing to deliver now); a run new to this worker is
        first caught up to what the sink holds of it (``applied``, read for all such runs)."""
        try:
            if known.state is None:
                self._catch_up(run, known, applied[run], stop)
                if known.cursor.done:
                    return None
            start = known.cursor.position
            records = self.journal.read_batch(run, start, self.delivery.batch_events, self.until_us)
        except JournalCorrupt as corrupt:
            self._stop_run(run, known, corrupt)
            return None
        except UnknownRun:
            self._runs.pop(run, None)  # removed by retention meanwhile
            return None
        if not records.records:
            if records.corrupt:
                self._stop_run(run, known, records.corrupt)
            return None
        return _Read(run, known, start, records, known.cursor.dead_lettered)

    def _deliver_group(self, group: list[_Read], stop: threading.Event) -> list[_Read]:
        """Apply the runs' records, then save their cursors, all in one state transaction;
        the reads applied (a run the sink defers is left for a later pass)."""
        batches = apply_runs_isolating(self.sink, [read.stretch() for read in group],
                                       lambda fn: self._send(fn, stop), self._refuse)
        taken = [(read, batch) for read, batch in zip(group, batches) if batch is not None]  # not the deferred
        if not taken:
            return []
        group = [read for read, _batch in taken]
        for read, batch in taken:
            known = read.known
            self._log_lifecycle(read.run, known.state, batch.state)
            known.state = batch.state
            known.cursor.position = read.records.end
            known.cursor.done = known.state.ended
        self._save(group, stop)
        for read in group:
            known, records = read.known, read.records
            if known.cursor.done:
                known.state = None  # nothing more will come: free the memory
            delivered = records.records - (known.cursor.dead_lettered - read.refused_before)
            self.on_progress(delivered, self.journal.bytes_between(read.run, read.start, records.end))
            if records.corrupt:
                self._stop_run(read.run, known, records.corrupt)
        return group

    def _catch_up(self, run: str, known: _Run, applied: int, stop: threading.Event) -> None:
        """Fold the run up to where the sink is: the cursor, or further if the sink says so.

        The sink's ``applied`` is the truth (the cursor lags after a crash between the
        sink's commit and the cursor save); events it holds are folded, not re-sent.
        """
        if applied + 1 < known.cursor.position.seq and not known.cursor.dead_lettered:
            # Nothing was dead-lettered, so the sink lost events it had committed (restored
            # from a backup, a failover to a lagging replica): it is the truth, deliver again.
            log.warning("sink %s holds run %s only through seq %d, the cursor was at %d: the sink lost data; "
                        "delivering again from seq %d", self.sink.name, run, applied, known.cursor.position.seq,
                        applied + 1)
            known.cursor.position = Position(seq=applied + 1)
            self._durably(lambda: self.store.rewind_cursor(self.sink.name, run, known.cursor), stop)
            known.output_saved = None
        target = max(known.cursor.position.seq, applied + 1)
        saved = self._restore(run, known.cursor.position, known)
        if saved is not None and saved.last_seq + 1 == target:
            known.state = saved
            return
        start = (saved, known.cursor.position) if saved is not None else (RunState(run), Position())
        known.state, position = self._refold(run, target, *start)
        if position.seq > known.cursor.position.seq:
            skipped = position.seq - known.cursor.position.seq
            known.cursor.position = position
            known.cursor.done = known.state.ended
            self._durably(lambda: self.store.save_cursors(self.sink.name, [CursorSave(run, known.cursor)]), stop)
            known.output_saved = None
            self.on_progress(skipped, 0)

    def _refold(self, run: str, target: int, state: RunState, position: Position) -> tuple[RunState, Position]:
        """``state`` (the run folded up to ``position``) folded on through ``target - 1`` from
        the journal (as ``apply_isolating`` folded it: without its dead letters and malformed
        events), and where that ends."""
        refused = self.letters.seqs(run)
        folding = Folding(state)
        while position.seq < target:
            records = self.journal.read_batch(run, position, min(REFOLD_RECORDS, target - position.seq), fold_only=True)
            for event in records.events:
                if event.seq not in refused:
                    _fold_sound(folding, event)
            if records.records:
                folding, position = Folding(passed(folding.state, records.end.seq - 1)), records.end
            if records.corrupt:
                raise records.corrupt  # a state folded past the damage would be wrong: stop the run
            if not records.records:
                break
        return folding.state, position

    def _save(self, group: list[_Read], stop: threading.Event) -> None:
        """Save the runs' cursors with their states, in one transaction. A run's captured
        output is written only where it grew since its last save (unless a beat replaced
        it): a long run's output is saved once, not again at every beat."""
        saves = [self._cursor_save(read.run, read.known, _replaces_output(read.records.events)) for read in group]
        self._durably(lambda: self.store.save_cursors(self.sink.name, saves), stop)
        for read, save in zip(group, saves):
            read.known.output_saved = len(save.output) if save.snapshot is not None else None

    def _cursor_save(self, run: str, known: _Run, replaced_output: bool) -> CursorSave:
        output = known.state.captured_out
        kept = 0 if replaced_output or known.output_saved is None else min(known.output_saved, len(output))
        return CursorSave(run, known.cursor, self._snapshot(known), output, kept)

    def _snapshot(self, known: _Run) -> bytes | None:
        """The state saved with the cursor, its captured output left out (saved beside it)."""
        if known.cursor.done:
            return None
        try:
            return codec.encode({**snapshot(known.state), "captured_out": ""})
        except EncodeError as error:  # the snapshot only saves a fold; the cursor is saved without it
            log.warning("sink %s: run %s: its state cannot be saved with the cursor (%s); a restart folds "
                        "the journal instead", self.sink.name, known.state.run, error)
            return None

    def _restore(self, run: str, cursor: Position, known: _Run) -> RunState | None:
        """The state the cursor saved beside ``cursor`` (the run folded up to it), if any."""
        saved = self.store.snapshot(self.sink.name, run)
        if saved is None:
            return None
        try:
            state = from_snapshot(codec.decode(saved))
        except (ValueError, TypeError) as error:
            log.warning("sink %s: run %s: saved state unreadable (%s); folding the journal instead", self.sink.name,
                        run, error)
            return None
        if state.last_seq + 1 != cursor.seq:
            return None
        output = self.store.output(self.sink.name, run)
        if output:
            state = dataclasses.replace(state, captured_out=output)
            known.output_saved = len(output)
        else:  # none saved, or an older snapshot that held it inline: the next save writes it whole
            known.output_saved = None
        return state

    def _refuse(self, event: Event, reason: str) -> None:
        known = self._runs[event.run]
        self._durably(lambda: self.letters.put(event, reason))
        known.cursor.dead_lettered += 1
        known.cursor.last_error = reason
        log.error("sink %s refused run %s seq %d (%s): %s; kept in the dead-letter queue "
                  "(see runrelay dlq list)", self.sink.name, event.run, event.seq, event.kind.value, reason)

    def _stop_run(self, run: str, known: _Run, corrupt: JournalCorrupt) -> None:
        known.stopped = str(corrupt)
        known.unreadable = isinstance(corrupt, RunUnreadable)
        known.state = None
        self.outcome.stopped_runs[run] = str(corrupt)
        if known.reported != known.stopped:
            known.reported = known.stopped
            log.error("sink %s: stopped delivering run %s after seq %d: %s (check it with runrelay journal verify "
                      "%s)", self.sink.name, run, known.cursor.position.seq - 1, corrupt, run)

    def _log_lifecycle(self, run: str, before: RunState, after: RunState) -> None:
        if after.status != before.status:
            log.info("sink %s: run %s is %s", self.sink.name, run, after.status)

    # --- re-driving dead letters ---------------------------------------------------------------

    def _redrive_requested(self, stop: threading.Event) -> None:
        """Re-drive the letters ``runrelay dlq retry`` asked for, one event per batch."""
        requested = self.store.redrive_requests(self.sink.name)
        if not requested:
            return
        held = [letter for letter in self.letters.letters() if letter.id in requested]
        for gone in requested - {letter.id for letter in held}:
            self._durably(lambda: self.store.redrive_done(self.sink.name, gone), stop)  # dropped or delivered meanwhile
        for run, group in groupby(sorted(held, key=lambda letter: (letter.run, letter.seq)), lambda l: l.run):
            group = list(group)
            state = self._redrive_state(run, group, stop)
            for letter in group:
                self._redrive(letter, state, stop)
            if run in self._runs:
                self._runs[run].state = None  # fold it again, with what the sink now holds

    def _redrive(self, letter: Letter, state: RunState, stop: threading.Event) -> None:
        try:
            batch = letter_batch(letter.event(), state)
            self._send(lambda: self.sink.redeliver(batch), stop)
        except (PermanentSinkError, MalformedEvent) as error:
            reason = str(error)
            self._durably(lambda: self.letters.refused_again(letter, reason), stop)
            self.outcome.refused_again += 1
            log.error("sink %s refused dead letter %d (run %s seq %d) again: %s", self.sink.name, letter.id,
                      letter.run, letter.seq, error)
        else:
            self._durably(lambda: self.letters.delivered(letter), stop)
            self.outcome.redriven += 1
            log.info("sink %s took dead letter %d (run %s seq %d)", self.sink.name, letter.id, letter.run,
                     letter.seq)
        self._durably(lambda: self.store.redrive_done(self.sink.name, letter.id), stop)

    def _redrive_state(self, run: str, letters: list[Letter], stop: threading.Event) -> RunState:
        """The run folded through what the sink holds, the letters included: from the
        journal, or from the letters alone once retention has removed it."""
        applied = self._send(lambda: self.sink.applied(run), stop)
        through = max(applied, letters[-1].seq)
        folding = Folding(RunState(run))
        try:
            for event in self.journal.events(run):
                if event.seq > through:
                    break
                _fold_sound(folding, event)
        except (UnknownRun, JournalCorrupt):
            pass  # gone or damaged: what was folded stands, the letters fill in below
        for letter in letters:
            _fold_sound(folding, letter.event())  # skips what the journal already gave
        return passed(folding.state, through)


def letter_batch(event: Event, state: RunState) -> Batch:
    """The batch that re-delivers one dead letter: ``state`` is the run folded through what
    the sink holds, the letter included."""
    points = Points()
    if event.kind is Kind.METRICS:
        points.add(*metric_point(event))
    return Batch(event.run, event.seq, event.seq, state, SETS[event.kind], points)


def _replaces_output(events: Sequence[Event]) -> bool:
    """Whether a heartbeat among ``events`` replaces the run's captured output (rather than
    adding to it): then what the state holds of it is stale."""
    return any(event.kind is Kind.HEARTBEAT and "captured_out" in event.body for event in events)


def _fold_sound(folding: Folding, event: Event) -> None:
    """``event`` folded, unless it is malformed: such an event is refused by
    ``apply_isolating``, so a fold from the journal passes over it."""
    with contextlib.suppress(MalformedEvent):
        folding.add(event)


"""Delivering the journal to one sink: read a batch per run from its cursor, fold, apply, save.

One ``SinkWorker`` per sink, each on its own thread, so a slow or dead sink never holds
up another. Within a sink, runs take turns (one batch per run per pass), so a huge or
broken run never holds up the others:
- a transient error is retried with backoff (``daemon.retry``) until it passes or the
  worker stops (one-shot mode gives up after the policy's budget);
- a permanent error sends the event it names to the dead-letter queue and the rest of the
  batch is applied without it (see ``apply_isolating``);
- a corrupt journal stops that run only: its good events are delivered, the damage is
  logged and shown by ``runrelay status``.
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

from runrelay.daemon import retry
from runrelay.daemon.config import Delivery, RetryPolicy
from runrelay.daemon.dlq import DeadLetters
from runrelay.daemon.state import Cursor, StateStore
from runrelay.daemon.supervisor import LoopFailed
from runrelay.eventlog.errors import JournalCorrupt, UnknownRun
from runrelay.eventlog.events import Event, Kind
from runrelay.eventlog import codec
from runrelay.eventlog.fold import MalformedEvent, RunState, fold, fold_event, from_snapshot, snapshot
from runrelay.eventlog.reader import Journal, Position
from runrelay.sinks.base import Batch, PermanentSinkError, Sink, TransientSinkError

log = logging.getLogger("runrelay.delivery")

# After these, nothing more is appended to a run; a DIED verdict can still be withdrawn.
FINAL_KINDS = frozenset({Kind.COMPLETED, Kind.FAILED, Kind.INTERRUPTED})


def apply_isolating(
    sink: Sink,
    run: str,
    events: Sequence[Event],
    state_before: RunState,
    send: Callable[[Callable[[], None]], None],
    refuse: Callable[[Event, str], None],
    redelivery: bool = False,
) -> RunState:
    """Apply ``events`` through ``send`` (the retry wrapper), setting aside refused events.

    ``state_before`` is the run folded up to the batch; each attempt folds the remaining
    events on a copy of it, so a refused event's values never reach the sink through the
    state. On PermanentSinkError the event it names, or the first remaining one when it
    names none in the batch, is handed to ``refuse`` (the dead-letter queue, durable
    before the rest is applied) and the rest is applied again. Every refusal shrinks the
    batch, so this ends after at most ``len(events)`` applies. Returns the state folded
    through what was applied.
    """
    remaining = list(events)
    state = state_before
    while remaining:
        try:
            state = fold(remaining, copy.deepcopy(state_before))
            send(lambda: sink.apply(Batch(run, tuple(remaining), state, redelivery)))
            break
        except (PermanentSinkError, MalformedEvent) as error:  # a malformed body is refused like a bad value
            index = next((i for i, event in enumerate(remaining) if event.seq == error.seq), 0)
            refuse(remaining.pop(index), str(error))
            state = state_before
    if not remaining:
        state = copy.deepcopy(state_before)
    # Folded through the whole batch, refused events left out: the saved snapshot fits the cursor.
    state.last_seq = max(state.last_seq, events[-1].seq)
    return state


def fold_sound(state: RunState, event: Event) -> None:
    """Fold ``event`` unless its body is malformed: such an event is (or will be) refused by
    ``apply_isolating``, so a fold from the journal passes over it rather than crashing."""
    try:
        fold_event(state, event)
    except MalformedEvent:
        pass


@dataclass
class _Run:
    """What a worker knows about one run between batches."""

    cursor: Cursor
    state: RunState | None = None  # folded through cursor.position.seq - 1; built on first need
    stopped: str | None = None  # why delivery of this run stopped (a corrupt journal)


@dataclass
class Outcome:
    """What a worker left undone, for ``runrelay sync`` and the logs."""

    gave_up: str | None = None  # the sink stayed down past the retry budget
    stopped_runs: dict[str, str] = field(default_factory=dict)


class SinkWorker:
    """Delivers every run of a journal to one sink; ``run`` is its loop."""

    def __init__(
        self,
        sink: Sink,
        key: str,
        journal: Journal,
        store: StateStore,
        letters: DeadLetters,
        delivery: Delivery,
        policy: RetryPolicy,
        wake: threading.Event,
        drain_to: dict[str, int] | None = None,
        on_progress: Callable[[int], None] = lambda count: None,
    ):
        self.sink = sink
        self.key = key  # the sink's redacted URL: its name in state, logs and status
        self.journal = journal
        self.store = store
        self.letters = letters
        self.delivery = delivery
        self.policy = policy
        self.wake = wake
        # One-shot: deliver each run up to this seq (the journal's end when the command
        # started), then return; give up on a sink that stays down.
        self.drain_to = drain_to
        self.on_progress = on_progress
        self.health = retry.SinkHealth(key, store)
        self.outcome = Outcome()
        self._runs: dict[str, _Run] = {}

    @property
    def name(self) -> str:
        return f"sink {self.key}"

    def run(self, stop: threading.Event) -> None:
        """Deliver until ``stop`` is set (one-shot: until ``drain_to`` is reached)."""
        try:
            try:
                self._send(self.sink.open, stop)
            except PermanentSinkError as error:
                raise LoopFailed(f"cannot be used: {error}") from None
            self._runs = {run: _Run(cursor) for run, cursor in self.store.cursors(self.key).items()}
            while not stop.is_set():
                self.wake.clear()
                delivered = self._pass(stop)
                if self.drain_to is not None and (self._drained() or not delivered):
                    return
                if delivered:
                    continue
                self.wake.wait()
                stop.wait(self.delivery.batch_wait_seconds)  # let a live run's burst gather
        except TransientSinkError as error:  # only when stopping, or past a one-shot's budget
            if not stop.is_set():
                self.outcome.gave_up = str(error)
                log.error("sink %s: giving up after %.0f s of retries: %s", self.key, self.policy.give_up_seconds,
                          error)
        finally:
            self.sink.close()

    def _send(self, function: Callable[[], object], stop: threading.Event):
        return retry.call(function, self.policy, stop, self.health, give_up=self.drain_to is not None)

    def _pass(self, stop: threading.Event) -> bool:
        """One batch for each run with something pending; True if anything was delivered."""
        delivered = False
        for run in self.journal.runs() if self.drain_to is None else list(self.drain_to):
            if stop.is_set():
                break
            if self._pending(run):
                delivered |= self._deliver_batch(run, self._runs[run], stop) > 0
        return delivered

    def _pending(self, run: str) -> bool:
        """Worth a look: not ended, not stopped, and (one-shot) short of ``drain_to``.

        A one-shot stops where the journal ended when it started, not at its current end,
        so ``sync`` finishes while an experiment writes faster than the sink takes it.
        """
        known = self._runs.setdefault(run, _Run(Cursor()))
        if known.cursor.done or known.stopped:
            return False
        return self.drain_to is None or known.cursor.position.seq < self.drain_to[run]

    def _drained(self) -> bool:
        return not any(self._pending(run) for run in self.drain_to)

    def _deliver_batch(self, run: str, known: _Run, stop: threading.Event) -> int:
        """Deliver the run's next batch; returns how many events it held."""
        try:
            events, end, corrupt = self._read_batch(run, known.cursor.position)
            if not events and not corrupt:
                return 0  # fully delivered: nothing to fold
            if known.state is None:
                before = known.cursor.position
                self._catch_up(run, known, stop)
                if known.cursor.done:
                    known.state = None
                    return 0
                if known.cursor.position != before:  # the sink already held some of them
                    events, end, corrupt = self._read_batch(run, known.cursor.position)
        except JournalCorrupt as corrupt:
            self._stop_run(run, known, corrupt)
            return 0
        except UnknownRun:
            self._runs.pop(run, None)  # removed by retention meanwhile
            return 0
        if events:
            letters_before = known.cursor.dead_lettered
            known.state = apply_isolating(self.sink, run, events, known.state, lambda fn: self._send(fn, stop),
                                          lambda event, reason: self._refuse(known, event, reason))
            known.cursor.position = end
            known.cursor.done = events[-1].kind in FINAL_KINDS
            self.store.save_cursor(self.key, run, known.cursor, self._snapshot(known))
            if known.cursor.done:
                known.state = None  # nothing more will come: free the memory
            self.on_progress(len(events) - (known.cursor.dead_lettered - letters_before))
        if corrupt:
            self._stop_run(run, known, corrupt)
        return len(events)

    def _catch_up(self, run: str, known: _Run, stop: threading.Event) -> None:
        """Fold the run up to where the sink is: the cursor, or further if the sink says so.

        The sink's ``applied`` is the truth (the cursor lags after a crash between the
        sink's commit and the cursor save); events it holds are folded, not re-sent.
        """
        applied = self._send(lambda: self.sink.applied(run), stop)
        if applied + 1 < known.cursor.position.seq and not known.cursor.dead_lettered:
            # Nothing was dead-lettered, so the sink lost events it had committed (restored
            # from a backup, a failover to a lagging replica): it is the truth, deliver again.
            log.warning("sink %s holds run %s only through seq %d, the cursor was at %d: the sink lost data; "
                        "delivering again from seq %d", self.key, run, applied, known.cursor.position.seq,
                        applied + 1)
            known.cursor.position = Position(seq=applied + 1)
            self.store.rewind_cursor(self.key, run, known.cursor)
        target = max(known.cursor.position.seq, applied + 1)
        known.state = self._restore(run, target)
        if known.state is not None:
            return
        state = RunState(run, track_metrics=self.sink.wants_metric_history)
        position, last = Position(), None
        if target > 0:
            refused = self.letters.seqs(run)
            reader = self.journal.read(run, 0)
            try:
                for last, position in reader:
                    if last.seq not in refused:  # as apply_isolating folded them: without
                        fold_sound(state, last)
                    if last.seq + 1 >= target:
                        break
            finally:
                reader.close()
            state.last_seq = position.seq - 1
        known.state = state
        skipped = position.seq - known.cursor.position.seq
        if skipped > 0:
            known.cursor.position = position
            known.cursor.done = last.kind in FINAL_KINDS
            self.store.save_cursor(self.key, run, known.cursor)
            self.on_progress(skipped)

    def _snapshot(self, known: _Run) -> bytes | None:
        if known.cursor.done or self.sink.wants_metric_history:
            return None  # nothing more to fold, or too big to save with every cursor
        return codec.encode(snapshot(known.state))

    def _restore(self, run: str, target: int) -> RunState | None:
        """The saved state folded through ``target - 1``, if the cursor saved one."""
        saved = None if self.sink.wants_metric_history else self.store.snapshot(self.key, run)
        if saved is None:
            return None
        try:
            state = from_snapshot(codec.decode(saved))
        except (ValueError, TypeError) as error:
            log.warning("sink %s: run %s: saved state unreadable (%s); folding the journal instead", self.key, run,
                        error)
            return None
        return state if state.last_seq + 1 == target else None

    def _read_batch(self, run: str, start: Position) -> tuple[list[Event], Position, JournalCorrupt | None]:
        """Up to ``batch_events`` events from ``start``; damage ends the batch, after the good events."""
        events: list[Event] = []
        end = start
        reader = self.journal.read(run, start)
        try:
            for event, end in reader:
                events.append(event)
                if len(events) >= self.delivery.batch_events:
                    break
        except JournalCorrupt as corrupt:
            return events, end, corrupt
        finally:
            reader.close()
        return events, end, None

    def _refuse(self, known: _Run, event: Event, reason: str) -> None:
        self.letters.put(event, reason)
        known.cursor.dead_lettered += 1
        known.cursor.last_error = reason
        log.error("sink %s refused run %s seq %d (%s): %s; kept in the dead-letter queue "
                  "(see runrelay dlq list)", self.key, event.run, event.seq, event.kind.value, reason)

    def _stop_run(self, run: str, known: _Run, corrupt: JournalCorrupt) -> None:
        known.stopped = str(corrupt)
        known.state = None
        self.outcome.stopped_runs[run] = str(corrupt)
        log.error("sink %s: stopped delivering run %s after seq %d: %s (check it with runrelay journal verify %s)",
                  self.key, run, known.cursor.position.seq - 1, corrupt, run)

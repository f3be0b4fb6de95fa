"""Re-driving dead letters into their sink once the cause is fixed (``runrelay dlq retry``).

Letters of one run go as one batch with ``redelivery=True``: the sink writes them even
though its applied seq has passed them, and leaves that seq alone. The batch's state is
the run folded from the journal through what the sink holds, so the run's document is
rewritten as it already stands; when retention has removed the run's journal, the state
is folded from the letters alone. A delivered letter leaves the queue; a refused one
stays with its new reason and one more attempt counted.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from itertools import groupby
from typing import Callable, Sequence

from runrelay.daemon import retry
from runrelay.daemon.config import RetryPolicy
from runrelay.daemon.delivery import apply_isolating, fold_sound
from runrelay.daemon.dlq import DeadLetters, Letter
from runrelay.daemon.state import StateStore
from runrelay.eventlog.errors import JournalCorrupt, UnknownRun
from runrelay.eventlog.events import Event
from runrelay.eventlog.fold import RunState
from runrelay.eventlog.reader import Journal
from runrelay.sinks.base import Sink, TransientSinkError


@dataclass
class Redriven:
    delivered: int = 0
    refused: int = 0
    unavailable: str | None = None  # the sink stayed down past the retry budget


def redrive(
    sink: Sink,
    letters: DeadLetters,
    chosen: Sequence[Letter],
    journal: Journal,
    store: StateStore,
    policy: RetryPolicy,
    stop: threading.Event,
) -> Redriven:
    result = Redriven()
    health = retry.SinkHealth(letters.sink, store)

    def send(function: Callable[[], object]):
        return retry.call(function, policy, stop, health, give_up=True)

    try:
        send(sink.open)
        for run, group in groupby(sorted(chosen, key=lambda letter: (letter.run, letter.seq)), lambda l: l.run):
            group = list(group)
            for letter in group:
                letters.take(letter)
            try:
                refused = _redrive_run(sink, run, [letter.event() for letter in group], journal, send)
            except TransientSinkError:
                for letter in group:
                    letters.release(letter)  # back in the queue as it was
                raise
            for letter in group:
                if letter.seq in refused:
                    letters.refused_again(letter, refused[letter.seq])
                    result.refused += 1
                else:
                    letters.delivered(letter)
                    result.delivered += 1
    except TransientSinkError as error:
        result.unavailable = str(error)
    finally:
        sink.close()
    return result


def _redrive_run(sink: Sink, run: str, events: list[Event], journal: Journal, send) -> dict[int, str]:
    refused: dict[int, str] = {}
    applied = send(lambda: sink.applied(run))
    state = _state(sink, journal, run, max(applied, events[-1].seq), events)
    apply_isolating(sink, run, events, state, send, lambda event, reason: refused.__setitem__(event.seq, reason),
                    redelivery=True)
    return refused


def _state(sink: Sink, journal: Journal, run: str, through: int, events: list[Event]) -> RunState:
    state = RunState(run, track_metrics=sink.wants_metric_history)
    try:
        for event in journal.events(run):
            if event.seq > through:
                break
            fold_sound(state, event)
    except (UnknownRun, JournalCorrupt):
        pass  # gone or damaged: what was folded stands, the letters fill in below
    for event in events:
        fold_sound(state, event)  # skips what the journal already gave
    return state


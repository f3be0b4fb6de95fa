"""The dead-letter queue: events a sink refused for good, kept until re-driven or dropped.

One ``persist-queue`` SQLiteAckQueue per sink under ``<state>/dlq/<hash of the sink name>/``,
with the JSON serializer (never pickle). Each letter carries the event itself (its
MessagePack payload, base64), so it outlives the journal's retention. A delivered or
dropped letter is acked and cleared. The delivering worker keeps an index of the letters
by (run, seq), read once when it opens the queue: holding a letter, counting them and
refusing a duplicate cost O(1) after that. A queue whose disk cannot take a write (full,
failing) raises ``daemon.state.StateUnavailable``: the worker waits for it.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import persistqueue.serializers.json as json_serializer
from persistqueue import SQLiteAckQueue
from persistqueue.sqlackqueue import AckStatus

from runrelay.daemon.state import unavailable
from runrelay.eventlog import codec
from runrelay.eventlog.events import KINDS_BY_VALUE, Event, utc_from_micros
from runrelay.eventlog.fsutil import make_private_dir

DLQ_DIR = "dlq"
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_HELD = (int(AckStatus.inited), int(AckStatus.ready), int(AckStatus.unack))


@dataclass(frozen=True)
class Letter:
    """One dead-lettered event; ``id`` is its number in its sink's queue."""

    id: int
    sink: str
    run: str
    seq: int
    kind: str
    reason: str
    time: str  # when it was (last) refused, ISO 8601 UTC
    attempts: int
    payload: str  # base64 MessagePack [kind, time µs, body], as journaled

    def event(self) -> Event:
        kind, micros, body = codec.decode(base64.b64decode(self.payload))
        return Event(self.run, self.seq, KINDS_BY_VALUE[kind], utc_from_micros(micros), body)

    def as_json(self) -> dict:
        return {"id": self.id, "sink": self.sink, "run": self.run, "seq": self.seq, "kind": self.kind,
                "reason": self.reason, "time": self.time, "attempts": self.attempts, "event": self.payload}


def queue_dir(state_dir: Path, sink: str) -> Path:
    """``<state>/dlq/<hash of the sink's name>``: stable whatever characters the name holds."""
    return state_dir / DLQ_DIR / hashlib.sha256(sink.encode()).hexdigest()[:24]


class DeadLetters:
    """The dead-letter queue of one sink."""

    def __init__(self, state_dir: Path, sink: str):
        self.sink = sink
        path = queue_dir(state_dir, sink)
        with _writing():
            make_private_dir(path)
            self._queue = SQLiteAckQueue(str(path), auto_resume=False, serializer=json_serializer,
                                         multithreading=True)
        self._index: dict[tuple[str, int], int] | None = None

    @classmethod
    def existing(cls, state_dir: Path, sink: str) -> "DeadLetters | None":
        """Open for inspection only if the queue exists (never creates state)."""
        if not queue_dir(state_dir, sink).is_dir():
            return None
        return cls(state_dir, sink)

    def put(self, event: Event, reason: str) -> None:
        """Keep ``event`` with why it was refused; a letter already held for it stays as it is
        (the same event refused again after a crash before the cursor moved on)."""
        index = self._indexed()
        if (event.run, event.seq) in index:
            return
        micros = (event.time - _EPOCH) // dt.timedelta(microseconds=1)
        payload = base64.b64encode(codec.encode([event.kind.value, micros, event.body])).decode("ascii")
        with _writing():
            index[(event.run, event.seq)] = self._queue.put({
                "sink": self.sink, "run": event.run, "seq": event.seq, "kind": event.kind.value, "reason": reason,
                "time": _now(), "attempts": 1, "event": payload,
            })

    def letters(self) -> list[Letter]:
        """Every letter held, oldest first."""
        return [_letter(row) for row in self._queue.queue() if int(row["status"]) in _HELD]

    def seqs(self, run: str) -> set[int]:
        """The seqs of ``run`` held here."""
        return {seq for held_run, seq in self._indexed() if held_run == run}

    def held(self, run: str, seq: int) -> bool:
        return (run, seq) in self._indexed()

    def __len__(self) -> int:
        return len(self._index) if self._index is not None else self._queue.qsize()

    def delivered(self, letter: Letter) -> None:
        """The sink took it: the letter leaves the queue."""
        with _writing():
            self._queue.ack(id=letter.id)
            self._queue.clear_acked_data(max_delete=None, keep_latest=None)
        if self._index is not None:
            self._index.pop((letter.run, letter.seq), None)

    def refused_again(self, letter: Letter, reason: str) -> None:
        with _writing():
            self._queue.update({**_data(letter), "reason": reason, "time": _now(), "attempts": letter.attempts + 1},
                               id=letter.id)

    drop = delivered

    def close(self) -> None:
        self._queue.close()

    def _indexed(self) -> dict[tuple[str, int], int]:
        if self._index is None:
            self._index = {(letter.run, letter.seq): letter.id for letter in self.letters()}
        return self._index


@contextlib.contextmanager
def _writing():
    """A queue write: a full or failing disk is StateUnavailable (waited for), not a crash."""
    try:
        yield
    except (sqlite3.Error, OSError) as error:
        raise unavailable(error) or error


def _letter(row: dict) -> Letter:
    data = row["data"]
    return Letter(id=row["id"], sink=data["sink"], run=data["run"], seq=data["seq"], kind=data["kind"],
                  reason=data["reason"], time=data["time"], attempts=data["attempts"], payload=data["event"])


def _data(letter: Letter) -> dict:
    return {"sink": letter.sink, "run": letter.run, "seq": letter.seq, "kind": letter.kind, "reason": letter.reason,
            "time": letter.time, "attempts": letter.attempts, "event": letter.payload}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")

"""The dead-letter queue: events a sink refused for good, kept until retried or dropped.

One ``persist-queue`` SQLiteAckQueue per sink under ``<state>/dlq/<sink id>/``, with the
JSON serializer (never pickle). Each letter carries the event itself (MessagePack
payload, base64), so it outlives the journal's retention. Only the re-driving consumer
(``runrelay dlq retry``) opens a queue with ``auto_resume`` on: it puts back letters a
crashed retry left taken; the daemon (producer) and inspection never reset them.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

import persistqueue.serializers.json as json_serializer
from persistqueue import SQLiteAckQueue
from persistqueue.sqlackqueue import AckStatus

from runrelay.eventlog import codec
from runrelay.eventlog.events import Event, Kind, utc_from_micros
from runrelay.eventlog.fsutil import make_private_dir

DLQ_DIR = "dlq"
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_LIVE = (int(AckStatus.inited), int(AckStatus.ready), int(AckStatus.unack))


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
    taken: bool = False  # a `dlq retry` is re-driving it now

    def event(self) -> Event:
        kind, micros, body = codec.decode(base64.b64decode(self.payload))
        return Event(self.run, self.seq, Kind(kind), utc_from_micros(micros), body)

    def as_json(self) -> dict:
        return {"id": self.id, "sink": self.sink, "run": self.run, "seq": self.seq, "kind": self.kind,
                "reason": self.reason, "time": self.time, "attempts": self.attempts, "retrying": self.taken,
                "event": self.payload}


def queue_dir(state_dir: Path, sink: str) -> Path:
    """``<state>/dlq/<scheme>-<hash of the redacted URL>``: stable, and no secret in the path."""
    scheme = sink.split("://", 1)[0].replace("+", "-")
    return state_dir / DLQ_DIR / f"{scheme}-{hashlib.sha256(sink.encode()).hexdigest()[:16]}"


class DeadLetters:
    """The dead-letter queue of one sink (``sink`` is its redacted URL)."""

    def __init__(self, state_dir: Path, sink: str, consumer: bool = False):
        self.sink = sink
        path = queue_dir(state_dir, sink)
        make_private_dir(path)
        self._queue = SQLiteAckQueue(str(path), auto_resume=consumer, serializer=json_serializer,
                                     multithreading=True)

    @classmethod
    def existing(cls, state_dir: Path, sink: str) -> "DeadLetters | None":
        """Open for inspection only if the queue exists (never creates state)."""
        if not queue_dir(state_dir, sink).is_dir():
            return None
        return cls(state_dir, sink)

    def put(self, event: Event, reason: str) -> int | None:
        """Keep ``event`` with why it was refused; a letter already held for it is kept instead."""
        if any(letter.run == event.run and letter.seq == event.seq for letter in self.letters()):
            return None  # re-refused after a crash before the cursor moved on
        payload = codec.encode([event.kind.value, (event.time - _EPOCH) // dt.timedelta(microseconds=1), event.body])
        return self._queue.put({
            "sink": self.sink, "run": event.run, "seq": event.seq, "kind": event.kind.value, "reason": reason,
            "time": _now(), "attempts": 1, "event": base64.b64encode(payload).decode("ascii"),
        })

    def letters(self) -> list[Letter]:
        """Every letter still held, oldest first."""
        return [_letter(row) for row in self._queue.queue() if int(row["status"]) in _LIVE]

    def seqs(self, run: str) -> set[int]:
        """The seqs of ``run`` held here."""
        return {letter.seq for letter in self.letters() if letter.run == run}

    def __len__(self) -> int:
        return len(self.letters())  # from the file: another process may have changed it

    def take(self, letter: Letter) -> None:
        """Mark a letter as being re-driven; if this process dies, the next ``dlq retry`` puts it back."""
        self._queue.get(id=letter.id, block=False)

    def delivered(self, letter: Letter) -> None:
        self._queue.ack(id=letter.id)
        self._queue.clear_acked_data(max_delete=None, keep_latest=None)

    def refused_again(self, letter: Letter, reason: str) -> None:
        self._queue.update({**_data(letter), "reason": reason, "time": _now(), "attempts": letter.attempts + 1},
                           id=letter.id)
        self._queue.nack(id=letter.id)

    def release(self, letter: Letter) -> None:
        """Put a taken letter back unchanged (the sink was unreachable)."""
        self._queue.nack(id=letter.id)

    def drop(self, letter: Letter) -> None:
        self.delivered(letter)

    def close(self) -> None:
        self._queue.close()


def _letter(row: dict) -> Letter:
    data = row["data"]
    return Letter(id=row["id"], sink=data["sink"], run=data["run"], seq=data["seq"], kind=data["kind"],
                  reason=data["reason"], time=data["time"], attempts=data["attempts"], payload=data["event"],
                  taken=int(row["status"]) == int(AckStatus.unack))


def _data(letter: Letter) -> dict:
    return {"sink": letter.sink, "run": letter.run, "seq": letter.seq, "kind": letter.kind, "reason": letter.reason,
            "time": letter.time, "attempts": letter.attempts, "event": letter.payload}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")

"""Events: what an experiment reports about a run, named in the past tense.

Every event belongs to one run (a locally generated, time-sortable uid) and has a
contiguous per-run ``seq``; ``(run, seq)`` is the idempotency key everywhere.
The body of each kind is documented in docs/events.md.
"""

from __future__ import annotations

import bisect
import datetime as dt
import numbers
import enum
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any


class Kind(str, enum.Enum):
    """The kinds of event: every Sacred observer event, plus the watchdog's verdict."""

    QUEUED = "queued"
    STARTED = "started"
    HEARTBEAT = "heartbeat"
    METRICS = "metrics"
    RESOURCE = "resource"
    ARTIFACT = "artifact"
    COMPLETED = "completed"
    INTERRUPTED = "interrupted"
    FAILED = "failed"
    DIED = "died"

    @property
    def is_lifecycle(self) -> bool:
        """Lifecycle events are fsynced before the append returns."""
        return self not in (Kind.HEARTBEAT, Kind.METRICS)

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_KINDS

    def __str__(self) -> str:
        return self.value


TERMINAL_KINDS = frozenset({Kind.COMPLETED, Kind.INTERRUPTED, Kind.FAILED, Kind.DIED})
# After these, nothing more is appended to a run; a DIED verdict can still be withdrawn.
FINAL_KINDS = frozenset({Kind.COMPLETED, Kind.FAILED, Kind.INTERRUPTED})


class Status(str, enum.Enum):
    """The statuses runrelay itself sets, spelt as Sacred spells them. A run's status is
    any string: an interrupted run carries Sacred's ``SacredInterrupt.STATUS`` (``TIMEOUT``
    or a custom one), and the died status is configurable."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    INTERRUPTED = "INTERRUPTED"
    DIED = "DIED"

    def __str__(self) -> str:
        return self.value


UNFINISHED = frozenset({None, Status.QUEUED, Status.RUNNING})


@dataclass(frozen=True, slots=True)
class Event:
    """One journaled fact about a run. ``time`` is the UTC wall clock at append."""

    run: str
    seq: int
    kind: Kind
    time: dt.datetime
    body: dict[str, Any]


@dataclass(slots=True)
class Points:
    """Metric points of one run, column by column, in seq order.

    A batch carries its metric events in this form instead of one ``Event`` each (most of
    a run's events are points). Timestamps are naive UTC, as Sacred logs them (or None).
    """

    seqs: list[int] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    values: list[int | float] = field(default_factory=list)
    timestamps: list[dt.datetime | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    def add(self, seq: int, name: str, step: int, value: int | float, timestamp: dt.datetime | None) -> None:
        self.seqs.append(seq)
        self.names.append(name)
        self.steps.append(step)
        self.values.append(value)
        self.timestamps.append(timestamp)

    def after(self, seq: int) -> "Points":
        """The points with a seq above ``seq``."""
        cut = bisect.bisect_right(self.seqs, seq)
        return self if cut == 0 else self._slice(cut, len(self.seqs))

    def before(self, seq: int) -> "Points":
        """The points with a seq below ``seq``."""
        cut = bisect.bisect_left(self.seqs, seq)
        return self if cut == len(self.seqs) else self._slice(0, cut)

    def only(self, seqs: frozenset[int]) -> "Points":
        """The points whose seq is in ``seqs``."""
        kept = Points()
        for row in zip(self.seqs, self.names, self.steps, self.values, self.timestamps):
            if row[0] in seqs:
                kept.add(*row)
        return kept

    def _slice(self, start: int, stop: int) -> "Points":
        return Points(self.seqs[start:stop], self.names[start:stop], self.steps[start:stop],
                      self.values[start:stop], self.timestamps[start:stop])


_RUN_UID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def new_run_uid() -> str:
    """A UUIDv7 (RFC 9562): 48-bit Unix milliseconds, then random bits.

    Time-sortable as text, generated without any network or coordination.
    """
    unix_ms = time.time_ns() // 1_000_000
    value = (unix_ms & ((1 << 48) - 1)) << 80 | int.from_bytes(os.urandom(10), "big")
    value &= ~(0xF << 76)
    value |= 0x7 << 76  # version 7
    value &= ~(0x3 << 62)
    value |= 0x2 << 62  # RFC 4122 variant
    return str(uuid.UUID(int=value))


def is_run_uid(text: str) -> bool:
    return bool(_RUN_UID.match(text))


def check_run_uid(text: str) -> str:
    """Return ``text`` if it is a run uid; a run uid is also a safe directory name."""
    if not isinstance(text, str) or not is_run_uid(text):
        raise ValueError(f"not a runrelay run uid: {text!r} (expected a lowercase UUIDv7)")
    return text


_EPOCH_UTC = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_MICROSECOND = dt.timedelta(microseconds=1)
KINDS_BY_VALUE = {kind.value: kind for kind in Kind}  # a dict lookup is ~10x cheaper than Kind(value)


def utc_from_micros(micros: int) -> dt.datetime:
    return _EPOCH_UTC + _MICROSECOND * micros  # multiplying beats timedelta(microseconds=...) here


def micros_now() -> int:
    return time.time_ns() // 1000


def metric_value(value):
    """A logged metric value as the journal keeps it: an int or a float. A NumPy (or any
    other ``numbers.Real``) scalar becomes the Python number it stands for; anything else
    is kept as given, and the fold refuses it as not a number."""
    if type(value) in (int, float) or isinstance(value, bool) or not isinstance(value, numbers.Real):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


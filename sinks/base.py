"""The sink interface: a handful of verbs, no threads, no cursors, no retry loops.

A sink turns one run's batch of events into writes, effectively once: applying a
batch twice, or a prefix of it and then all of it, leaves the backend exactly as
applying it once. It converts every driver error into TransientSinkError (retry
later) or PermanentSinkError (this event can never be written); the daemon decides
what happens next. Backends register by URL scheme in ``sinks.registry``.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from runrelay.eventlog.events import Event
from runrelay.eventlog.fold import RunState

# Where a sink reads the bytes of an artifact, resource or source: (run, digest) -> path.
BlobSource = Callable[[str, str], Path]


class SinkError(Exception):
    """Base of the errors a sink raises; driver exceptions never leak past a sink."""


class TransientSinkError(SinkError):
    """Worth retrying later: connection refused, timeout, throttling, a 5xx."""


class PermanentSinkError(SinkError):
    """This event can never be written (too large, invalid value, schema conflict).

    ``seq`` names the offending event when the sink knows it; the daemon sends that
    event to the dead-letter queue and applies the rest of the batch without it.
    """

    def __init__(self, message: str, seq: int | None = None):
        super().__init__(message)
        self.seq = seq


@dataclass(frozen=True)
class Batch:
    """Contiguous events of one run, and the run's state folded through the last of them.

    ``state`` has ``track_metrics`` off unless the sink asked for metric history
    (``Sink.wants_metric_history``): metric points reach a sink through ``events``.
    """

    run: str
    events: Sequence[Event]
    state: RunState
    # True when the dead-letter queue re-drives events the run's cursor has passed:
    # the sink writes them anyway (still idempotently) and leaves its applied seq alone.
    redelivery: bool = False

    @property
    def first_seq(self) -> int:
        return self.events[0].seq

    @property
    def last_seq(self) -> int:
        return self.events[-1].seq


class Sink(ABC):
    """One backend. Created from a URL; ``open`` before use, ``close`` after."""

    wants_metric_history = False

    def __init__(self, url: str, blobs: BlobSource):
        self.url = url
        self.blobs = blobs

    @abstractmethod
    def open(self) -> None:
        """Connect and create what the layout needs (tables, indexes); idempotent."""

    @abstractmethod
    def check(self) -> None:
        """Health check: return if the backend answers, else raise TransientSinkError."""

    @abstractmethod
    def applied(self, run: str) -> int:
        """The highest seq of ``run`` this backend holds (-1 if none), read from the backend."""

    @abstractmethod
    def apply(self, batch: Batch) -> None:
        """Write one batch, effectively once, skipping events at or below ``applied``."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; safe to call twice."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({redact(self.url)!r})"


_CREDENTIALS = re.compile(r"^(?P<head>[\w+.-]+://[^:/@]*:)[^@]*@")  # as SQLAlchemy parses: password up to the first "@"
_SECRET_PARAMETERS = re.compile(r"(?i)([?&](?:password|sslpassword|passwd|secret|token|access_key|secret_key)=)[^&]*")


def redact(url: str) -> str:
    """The URL without its password or secret query parameters, for logs, status and state keys."""
    url = _CREDENTIALS.sub(lambda match: f"{match['head']}***@", url, count=1)
    return _SECRET_PARAMETERS.sub(r"\1***", url)

"""The sink interface: a handful of verbs, no threads, no cursors, no retry loops.

A sink turns one run's batch into writes, effectively once: applying a batch twice, or a
prefix of it and then all of it, leaves the backend exactly as applying it once. The daemon
hands it the batches of several runs at once (``apply_runs``): each run's batch is applied
whole or not at all, whatever else fails; by default one after the other, in one
transaction where the backend overrides it. It reads
the run's folded state and the batch's metric points, never raw event bodies. It converts
its driver's errors into the three errors below and its own explicit value checks into
``PermanentSinkError``; anything else it raises is a bug, which stops its worker visibly.
The daemon decides what happens next (docs/daemon.md). Backends register by URL scheme in
``sinks.registry``; docs/sinks.md describes each one.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, ClassVar, Iterable, Iterator, Mapping, Protocol, Sequence

from runrelay.eventlog.events import Points
from runrelay.eventlog.fold import RunState

DEFAULT_TIMEOUT_SECONDS = 30.0


class SinkError(Exception):
    """Base of the errors a sink raises; driver exceptions never leak past a sink."""


class TransientSinkError(SinkError):
    """Worth retrying soon: connection refused or lost, a timeout, throttling, a 5xx."""


class PermanentSinkError(SinkError):
    """This event can never be written (too large, invalid value, schema conflict).

    ``seq`` names the offending event when the sink knows it; otherwise the daemon finds it
    (``daemon.delivery.apply_isolating``). Either way that event goes to the dead-letter
    queue and the rest of the batch is applied without it.
    """

    def __init__(self, message: str, seq: int | None = None):
        super().__init__(message)
        self.seq = seq


class UnusableSinkError(SinkError):
    """The sink cannot work as configured, and retrying soon will not change that: the
    database or bucket does not exist, the credentials are refused, a file cannot be opened.
    The daemon logs it once, re-checks slowly, and keeps the other sinks delivering."""


class RunDeferred(SinkError):
    """Not this run yet: another process feeds it (a wrapped observer's own run, while it
    lives). The daemon leaves the run as it is and tries again on a later pass."""


class SinkConfigError(ValueError):
    """A sink URL or option that can never work, found without any I/O; says what to fix."""


class RunSource(Protocol):
    """What a sink may read of a run besides its batch (the daemon's journal)."""

    def open_blob(self, run: str, digest: str) -> BinaryIO:
        """The bytes of an artifact, resource or source, checked against their digest and
        rewound; the caller closes it. FileNotFoundError if the blob is gone, ValueError if
        it is damaged (both permanent for the event that names it)."""

    def run_dir(self, run: str) -> Path:
        """The run's journal directory (where a wrapped observer's hand-off record lives)."""

    def points(self, run: str, through_seq: int) -> Iterator[Points]:
        """The run's metric points up to ``through_seq``, chunk by chunk, for a sink that must
        write a whole series at once (the daemon never holds it in memory)."""


@dataclass(frozen=True)
class Batch:
    """Events ``first_seq``..``last_seq`` of one run, as the fold saw them.

    ``state`` is the run folded through ``last_seq``; ``changed`` names the state fields
    the batch's events set (``eventlog.fold.SETS``); ``points`` are its metric points.
    ``skipped`` are seqs in that range the batch does not carry (set aside as dead letters):
    nothing of them is in ``state`` or ``points``.
    """

    run: str
    first_seq: int
    last_seq: int
    state: RunState
    changed: frozenset[str]
    points: Points
    skipped: frozenset[int] = frozenset()

    def covers(self, seq: int) -> bool:
        return self.first_seq <= seq <= self.last_seq and seq not in self.skipped

    def after(self, applied: int) -> "Batch | None":
        """The part of the batch above ``applied`` (what a sink holding ``applied`` still
        needs), or None when it holds it all. The state is the same: rewriting a field from
        a later state gives what the whole batch gives."""
        if applied >= self.last_seq:
            return None
        if applied < self.first_seq:
            return self
        return dataclasses.replace(self, first_seq=applied + 1, points=self.points.after(applied))

    @property
    def artifacts(self) -> list[dict]:
        """The artifacts this batch adds."""
        return [artifact for artifact in self.state.artifacts if self.covers(artifact["seq"])]

    @property
    def resources(self) -> list[dict]:
        """The resources this batch adds."""
        return [resource for resource in self.state.resources if self.covers(resource["seq"])]


def seconds_option(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise SinkConfigError(f"expected a number of seconds above 0, got {value!r}")
    return float(value)


class Sink(ABC):
    """One backend. Built from a checked URL and options; ``open`` before use, ``close`` after.

    ``name`` keys its cursors, health, dead letters and logs. Every network call it makes
    is bounded by ``timeout_seconds``: a frozen server is a TransientSinkError after that long.
    """

    # option name -> parser (raises SinkConfigError); backends add their own
    OPTIONS: ClassVar[dict[str, Callable[[Any], Any]]] = {"timeout_seconds": seconds_option}

    def __init__(self, name: str, url: str, options: Mapping[str, Any], source: RunSource):
        self.name = name
        self.url = url  # may hold a password: never log it
        self.options = {"timeout_seconds": DEFAULT_TIMEOUT_SECONDS, **options}
        self.timeout_seconds: float = self.options["timeout_seconds"]
        self.source = source

    @classmethod
    @abstractmethod
    def identity(cls, url: str) -> str:
        """Check ``url`` without I/O (it parses; its driver is installed) and return what it
        names: the URL without password, driver or options, so two spellings of one database
        are one sink. It is the sink's name unless the configuration gives one. Raises
        SinkConfigError saying what to fix."""

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """The options parsed; SinkConfigError naming every unknown or bad one."""
        parsed, problems = {}, []
        for key, value in options.items():
            parse = cls.OPTIONS.get(key)
            if parse is None:
                problems.append(f"unknown option {key!r} (this sink takes {', '.join(sorted(cls.OPTIONS))})")
                continue
            try:
                parsed[key] = parse(value)
            except SinkConfigError as error:
                problems.append(f"{key}: {error}")
        if problems:
            raise SinkConfigError("; ".join(problems))
        return parsed

    @abstractmethod
    def open(self) -> None:
        """Connect and create what the layout needs (tables, indexes); idempotent."""

    @abstractmethod
    def applied(self, run: str) -> int:
        """The highest seq of ``run`` this backend holds (-1 if none), read from the backend."""

    def applied_runs(self, runs: Iterable[str]) -> dict[str, int]:
        """``applied`` for each of ``runs`` (the daemon asks for every run new to it at once).
        By default one ``applied`` each; a backend that can read them together overrides it."""
        return {run: self.applied(run) for run in runs}

    @abstractmethod
    def apply(self, batch: Batch) -> None:
        """Write one batch effectively once: the part above ``applied`` (``batch.after``),
        recording ``batch.last_seq`` as applied with the writes where the backend allows."""

    def apply_runs(self, batches: Sequence[Batch]) -> None:
        """Write the batches of several runs (one each), each as ``apply`` writes it.

        Each run's batch is applied whole or not at all, as ``apply`` makes it; when this
        raises, or the process dies in it, some runs' batches may be applied and others not,
        and ``applied`` says which: the daemon saves no cursor before this returns, and sends
        again what is not. On PermanentSinkError the daemon applies the batches one by one
        (``apply``) to find the event at fault. By default the batches are applied one after
        the other; a backend that can write them in one transaction, each run's applied seq
        with its writes, overrides it (sinks/sql.py)."""
        for batch in batches:
            self.apply(batch)

    @abstractmethod
    def redeliver(self, batch: Batch) -> None:
        """Write dead letters again, now that their cause is fixed: the events ``batch``
        covers, although ``applied`` has passed them, each at most once however often this
        is called; ``applied`` stays as it is. ``batch.state`` is the run folded through
        what the sink holds, letters included. A sink that cannot do this raises
        PermanentSinkError saying so (the letters stay in the queue)."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; safe to call twice."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


@dataclass(frozen=True)
class SilentRun:
    """A run a sink shows ``RUNNING`` with a stale heartbeat, on a host whose daemon has not
    reported lately: what the central watchdog may mark dead, if it is still so."""

    uid: str
    host: str
    heartbeat: dt.datetime | None  # as the sink holds it: the mark is conditional on it
    host_seen: dt.datetime | None  # the host daemon's last report; None if it never reported


def run_host(state: RunState) -> str | None:
    """The host a run's process runs on (its started event's ``process.host``): whose
    silence the central watchdog looks at."""
    host = (state.process or {}).get("host")
    return host if isinstance(host, str) else None


def death_reason(state: RunState) -> str | None:
    """The reason of the death verdict the run's fold holds, None while it holds none."""
    return None if state.death is None else str(state.death.get("reason") or "")


class TakesCentralVerdicts(ABC):
    """A sink the central watchdog can use (docs/daemon.md, "Dead runs"): it records each
    daemon's reports that its host lives, finds silent runs, and marks one dead with a
    conditional write — only while it is still ``RUNNING`` with the heartbeat seen, so that
    several watchdogs at once write each verdict once. A later event of the run undoes the
    mark: the run's next write restores what its journal says."""

    @abstractmethod
    def report_host(self, host: str, at: dt.datetime) -> None:
        """Record that ``host``'s daemon lives, at ``at`` (naive UTC)."""

    @abstractmethod
    def silent_runs(self, host_silent_since: dt.datetime, heartbeat_before: dt.datetime) -> list[SilentRun]:
        """Runs this sink shows ``RUNNING``, written by runrelay, whose heartbeat is older
        than ``heartbeat_before`` and whose host has not reported since ``host_silent_since``."""

    @abstractmethod
    def mark_dead(self, run: SilentRun, status: str, reason: str) -> bool:
        """Give ``run`` the central verdict if it is still as found; True if this call wrote it."""

    def central_problem(self) -> str | None:
        """Why this sink, opened, cannot take central verdicts after all (its store ignores a
        conditional write's precondition), or None: the watchdog then leaves it out."""
        return None


_CREDENTIALS = re.compile(r"^(?P<head>[\w+.-]+://[^:/@]*:)[^@]*@")  # as SQLAlchemy parses: password up to the first "@"
_SECRET_PARAMETERS = re.compile(r"(?i)([?&](?:password|sslpassword|passwd|secret|token|access_key|secret_key)=)[^&]*")


def redact(url: str) -> str:
    """The URL without its password or secret query parameters, for messages about a URL."""
    url = _CREDENTIALS.sub(lambda match: f"{match['head']}***@", url, count=1)
    return _SECRET_PARAMETERS.sub(r"\1***", url)

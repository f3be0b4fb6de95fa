"""What is left to deliver, per sink, from the cursors and the journal alone.

Needs no daemon and no sink connection (so it works while a sink is down). It reads
(and decodes) each unfinished run from its cursor to the end: time proportional to what
is pending. A run delivery stops at (corrupt, unreadable, undecodable) is named with why.
A cursor can lag its sink by the last batch after a crash; status then counts that
batch as pending until the daemon re-sends it (and the sink skips it).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field

from runrelay.daemon.state import Cursor, Health
from runrelay.eventlog.errors import UnknownRun
from runrelay.eventlog.reader import Journal


@dataclass
class SinkStatus:
    sink: str
    identity: str | None = None  # what the sink's URL names (no secrets)
    configured: bool = True  # False: known to the state only
    condition: str = "ok"  # ok | retrying | unusable | crashed
    pending_events: int = 0
    pending_runs: int = 0
    oldest_pending_seconds: float | None = None  # age of the oldest undelivered event
    retries: int = 0
    failing_since: str | None = None
    dead_letters: int = 0
    last_error: str | None = None
    corrupt_runs: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict:
        return asdict(self)


def sink_status(
    journal: Journal, sink: str, cursors: dict[str, Cursor], health: Health, dead_letters: int
) -> SinkStatus:
    status = SinkStatus(sink, condition=health.condition, retries=health.retries, dead_letters=dead_letters,
                        last_error=health.last_error)
    if health.failing_since is not None:
        status.failing_since = dt.datetime.fromtimestamp(health.failing_since, dt.timezone.utc).isoformat(
            timespec="seconds")
    now = dt.datetime.now(dt.timezone.utc)
    oldest: dt.datetime | None = None
    for run in journal.runs():
        cursor = cursors.get(run, Cursor())
        if cursor.last_error and not status.last_error:
            status.last_error = cursor.last_error
        if cursor.done:
            continue
        try:
            count, corrupt = journal.count(run, cursor.position, decode=True)
            first = next(iter(journal.events(run, cursor.position)), None) if count else None
        except UnknownRun:
            continue  # removed meanwhile
        if corrupt:
            status.corrupt_runs[run] = str(corrupt)
        if first is not None and (oldest is None or first.time < oldest):
            oldest = first.time
        if count:
            status.pending_events += count
            status.pending_runs += 1
    if oldest is not None:
        status.oldest_pending_seconds = round((now - oldest).total_seconds(), 3)
    return status

"""runrelay's journal: events, their durable on-disk format, writing, reading and folding."""

from runrelay.eventlog.errors import JournalCorrupt, JournalError, JournalWriteError, UnknownRun, WriterBusy
from runrelay.eventlog.events import Event, Kind, new_run_uid
from runrelay.eventlog.reader import Journal, Position
from runrelay.eventlog.writer import Durability, JournalWriter

__all__ = [
    "Durability",
    "Event",
    "Journal",
    "JournalCorrupt",
    "JournalError",
    "JournalWriteError",
    "JournalWriter",
    "Kind",
    "Position",
    "UnknownRun",
    "WriterBusy",
    "new_run_uid",
]

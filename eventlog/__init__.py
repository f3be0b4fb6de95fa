"""runrelay's journal: events, their durable on-disk format, writing, reading and folding."""

from eventlog.errors import JournalCorrupt, JournalError, JournalWriteError, UnknownRun, WriterBusy
from eventlog.events import Event, Kind, new_run_uid
from eventlog.reader import Journal, Position
from eventlog.writer import Durability, JournalWriter

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

"""Noticing new journal data: inotify (``watchdog``) for speed, a periodic rescan for certainty.

inotify wakes the workers within milliseconds of an append; but its queue overflows are
dropped silently and network filesystems report nothing, so a rescan tick wakes them
every ``rescan_seconds`` regardless. Workers then look for themselves (cursors against
the journal); discovery only rings the bell.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

log = logging.getLogger("runrelay.discovery")


class Doorbell:
    """Wakes every subscribed worker at once."""

    def __init__(self):
        self._events: list[threading.Event] = []
        self._lock = threading.Lock()

    def subscribe(self) -> threading.Event:
        event = threading.Event()
        with self._lock:
            self._events.append(event)
        return event

    def ring(self) -> None:
        with self._lock:
            for event in self._events:
                event.set()


# What writing a journal causes. Not "opened" or "closed_no_write": the workers' own reads
# cause those, and ringing for them would wake the workers forever.
_WRITES = frozenset({"created", "modified", "moved", "closed"})


class _Ring(FileSystemEventHandler):
    def __init__(self, doorbell: Doorbell):
        self._doorbell = doorbell

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in _WRITES and (not event.is_directory or event.event_type == "created"):
            self._doorbell.ring()


class Discovery:
    """The loop that watches the journal root; ``run`` until stopped."""

    name = "discovery"

    def __init__(self, root: Path, rescan_seconds: float, doorbell: Doorbell):
        self.root = root
        self.rescan_seconds = rescan_seconds
        self.doorbell = doorbell

    def run(self, stop: threading.Event) -> None:
        observer = Observer()
        observer.schedule(_Ring(self.doorbell), str(self.root), recursive=True)
        observer.start()
        try:
            while not stop.wait(self.rescan_seconds):
                if not observer.is_alive():
                    raise RuntimeError(f"the inotify watch on {self.root} stopped")
                self.doorbell.ring()
        finally:
            observer.stop()
            observer.join()

"""Noticing new journal data: inotify (``watchdog``) for speed, a periodic rescan for certainty.

inotify wakes the workers within milliseconds of an append; but its queue overflows are
dropped silently and network filesystems report nothing, so a rescan tick wakes them
every ``rescan_seconds`` regardless. Workers then look for themselves (cursors against
the journal); discovery only rings the bell.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Callable

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from runrelay.eventlog.writer import LOCK_FILE

log = logging.getLogger("runrelay.discovery")

# watchdog's inotify code calls warnings.warn ("Callback with id ... already exists for
# watch ...") when a directory's watch is added twice, which a run directory created while
# the recursive watch walks the root can cause: harmless (the kernel keeps one watch per
# directory), and raw lines on the daemon's stderr without it.
warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"watchdog\.observers\.inotify")


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
    def __init__(self, doorbell: Doorbell, on_lock_closed: Callable[[str], None] | None):
        self._doorbell = doorbell
        self._on_lock_closed = on_lock_closed

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in _WRITES and (not event.is_directory or event.event_type == "created"):
            self._doorbell.ring()
        if event.event_type == "closed" and self._on_lock_closed is not None:
            path = os.fsdecode(event.src_path)
            if os.path.basename(path) == LOCK_FILE:  # its writer closed it: ended, or died
                self._on_lock_closed(os.path.basename(os.path.dirname(path)))


class Discovery:
    """The loop that watches the journal root; ``run`` until stopped."""

    name = "discovery"

    def __init__(self, root: Path, rescan_seconds: float, doorbell: Doorbell,
                 on_lock_closed: Callable[[str], None] | None = None):
        self.root = root
        self.rescan_seconds = rescan_seconds
        self.doorbell = doorbell
        self.on_lock_closed = on_lock_closed  # called with the run's uid when a writer lock is closed

    def run(self, stop: threading.Event) -> None:
        observer = self._watch()
        try:
            while not stop.wait(self.rescan_seconds):
                if observer is not None and not observer.is_alive():
                    log.warning("the inotify watch on %s stopped; finding new events by rescan only "
                                "(every %s s)", self.root, self.rescan_seconds)
                    observer = None
                self.doorbell.ring()
        finally:
            if observer is not None:
                observer.stop()
                observer.join()

    def _watch(self) -> Observer | None:
        """Start the inotify watch; without one (watch limit reached, a network filesystem)
        delivery goes on at the rescan's pace rather than stopping."""
        observer = Observer()
        try:
            observer.schedule(_Ring(self.doorbell, self.on_lock_closed), str(self.root), recursive=True)
            observer.start()
        except OSError as error:
            log.warning("cannot watch %s with inotify (%s); finding new events by rescan only (every %s s)",
                        self.root, error, self.rescan_seconds)
            return None
        return observer

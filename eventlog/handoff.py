"""The hand-off record of a run fed to a wrapped Sacred observer (docs/journal-format.md).

``runrelay.durable(observer, name)`` feeds ``observer`` from the run's process; the daemon's
sink of that name feeds it whatever the process did not. Two files per name in the run's
directory say who feeds and how far:
- ``observer-NAME.lock``: held (flock) by whoever feeds the run; the kernel drops it when
  that process dies. The daemon feeds a run only while it holds this lock itself.
- ``observer-NAME.json``: through which seq the observer has been fed, and the id its
  ``started_event`` returned. Whoever holds the lock rewrites it (temp file, rename) after
  each call. Its existence also says the run was wrapped with NAME.

The record is journal content: untrusted. It is parsed as JSON, never evaluated, and
checked (a seq in range, an id that is an int or a safe name); a record that fails the checks is None.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from runrelay.eventlog.reader import MAX_SEQ
from runrelay.eventlog.fsutil import FILE_MODE, NotRegularFile, fsync_dir, open_regular, try_lock

FORMAT = 1
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # as daemon sink names: a safe file name too
MAX_RECORD_BYTES = 4096
# An observer's id as a string: what Sacred's observers return (a uuid, a run directory's
# number), and safe wherever an observer puts it (FileStorageObserver makes it a directory).
ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,254}$")


class BadObserverName(ValueError):
    """A name that cannot name a wrapped observer (and its sink)."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise BadObserverName(f"observer name {name!r}: use 1-64 letters, digits, '_', '.', '-' "
                              "(the daemon's sink of that name feeds it)")
    return name


@dataclass(frozen=True)
class Record:
    """How far the observer has been fed: every event through ``fed_through`` (-1: none);
    ``observer_id`` is what its started (or queued) event returned."""

    fed_through: int = -1
    observer_id: int | str | None = None


class HandOff:
    """The record and lock of observer ``name`` in one run directory."""

    def __init__(self, run_dir: Path, name: str):
        self.run_dir = Path(run_dir)
        self.name = check_name(name)
        self.path = self.run_dir / f"observer-{name}.json"
        self.lock_path = self.run_dir / f"observer-{name}.lock"
        self._lock_fd: int | None = None

    def begin(self) -> None:
        """Take the lock and write the first record, durably: before the run's first event,
        so that the daemon never sees an event of a wrapped run without its record."""
        if not self.try_lock():
            raise BlockingIOError(f"{self.lock_path} is held by another process")
        self.save(Record(), durable=True)

    def try_lock(self) -> bool:
        """Take the feeder's lock unless another holds it; True if this process holds it now."""
        if self._lock_fd is not None:
            return True
        fd = try_lock(self.lock_path)
        if fd is None:
            return False
        self._lock_fd = fd
        return True

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def read(self) -> Record | None:
        """The record, or None when there is none or it is not a valid one."""
        try:
            fd = open_regular(self.path)
        except (FileNotFoundError, NotRegularFile):
            return None
        with os.fdopen(fd, "rb") as file:
            data = file.read(MAX_RECORD_BYTES + 1)
        return parse(data)

    def save(self, record: Record, durable: bool = False) -> None:
        """Replace the record atomically. Without ``durable`` it reaches the page cache only:
        enough for ``kill -9``; power loss may bring back an older record (docs/durable.md)."""
        data = json.dumps({"format": FORMAT, "observer": self.name, "fed_through": record.fed_through,
                           "id": record.observer_id}).encode()
        temp = self.path.with_name(f".{self.path.name}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
        try:
            os.write(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, self.path)
        if durable:
            fsync_dir(self.run_dir)


def parse(data: bytes) -> Record | None:
    if len(data) > MAX_RECORD_BYTES:
        return None
    try:
        value = json.loads(data)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("format") != FORMAT:
        return None
    fed, observer_id = value.get("fed_through"), value.get("id")
    if type(fed) is not int or not -1 <= fed <= MAX_SEQ:
        return None
    if not (observer_id is None or type(observer_id) is int or (type(observer_id) is str and ID.match(observer_id))):
        return None
    return Record(fed, observer_id)

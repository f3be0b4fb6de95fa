"""Appending a run's events: the producer side of the journal.

Two durability classes (docs/journal-format.md, "Durability"):
- lifecycle events are written and fsynced before ``append`` returns;
- heartbeats and metrics are written to the file before ``append`` returns (so a
  ``kill -9`` of the experiment loses nothing) and fsynced by a background group
  commit at most ``group_commit_seconds`` later (a power loss loses that window).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runrelay.eventlog import codec
from runrelay.eventlog.blobs import store_blob
from runrelay.eventlog.errors import JournalCorrupt, JournalWriteError, WriterBusy
from runrelay.eventlog.events import Kind, check_run_uid, micros_now, new_run_uid
from runrelay.eventlog.format import SEGMENT_HEADER_SIZE, encode_record, encode_segment_header, segment_name
from runrelay.eventlog.fsutil import FILE_MODE, fsync_dir, make_private_dir, write_all
from runrelay.eventlog.reader import Journal

DEFAULT_GROUP_COMMIT_SECONDS = 0.2
DEFAULT_SEGMENT_BYTES = 32 * 1024 * 1024
LOCK_FILE = "writer.lock"
MAX_MARKER_WARNINGS = 100  # distinct warnings per run about values journaled as markers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Durability:
    """The writer's two knobs; the defaults are the documented ones."""

    group_commit_seconds: float = DEFAULT_GROUP_COMMIT_SECONDS
    fsync_lifecycle: bool = True

    def __post_init__(self):
        if not self.group_commit_seconds > 0:
            raise ValueError("group_commit_seconds must be a positive number of seconds")


class JournalWriter:
    """The one writer of one run. Thread-safe; use ``create`` or ``resume``."""

    def __init__(self, journal: Journal, run: str, lock_fd: int, durability: Durability, segment_bytes: int):
        self.journal = journal
        self.run = run
        self.dir = journal.run_dir(run)
        self._lock_fd = lock_fd
        self._durability = durability
        self._segment_bytes = segment_bytes
        self._mutex = threading.Lock()
        self._fd = -1
        self._size = 0
        self._next_seq = 0
        self._dirty = False
        self._failure: OSError | None = None
        self._warned: set[str] = set()
        self._closed = threading.Event()
        self._committer = threading.Thread(target=self._group_commit, name=f"runrelay-commit-{run[:8]}", daemon=True)

    @classmethod
    def create(
        cls,
        root: str | os.PathLike,
        run: str | None = None,
        durability: Durability = Durability(),
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    ) -> "JournalWriter":
        """Start a new run's journal (a fresh run uid unless one is given)."""
        journal = Journal(root)
        run = check_run_uid(run) if run else new_run_uid()
        make_private_dir(journal.root)
        run_dir = journal.run_dir(run)
        try:
            os.mkdir(run_dir, 0o700)
        except FileExistsError:
            raise WriterBusy(f"run {run} already has a journal in {journal.root}; use resume") from None
        writer = None
        try:
            fsync_dir(journal.root)
            writer = cls(journal, run, _lock(run_dir), durability, segment_bytes)
            writer._open_segment(0)
        except BaseException:
            if writer is not None:
                os.close(writer._lock_fd)
            _remove_run_dir(run_dir)
            raise
        writer._committer.start()
        return writer

    @classmethod
    def resume(
        cls,
        root: str | os.PathLike,
        run: str,
        durability: Durability = Durability(),
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    ) -> "JournalWriter":
        """Append to an existing run whose writer is gone (e.g. the watchdog's verdict).

        A torn tail is cut off first; a corrupt journal is refused.
        """
        journal = Journal(root)
        run_dir = journal.run_dir(check_run_uid(run))
        lock_fd = _lock(run_dir)
        try:
            check = journal.verify(run)
            if check.corrupt:
                raise check.corrupt
        except (JournalCorrupt, OSError):
            os.close(lock_fd)
            raise
        writer = cls(journal, run, lock_fd, durability, segment_bytes)
        end = check.end
        if check.records == 0:
            for stale in run_dir.glob("*.seg"):
                stale.unlink()
            writer._open_segment(0)
        else:
            for later in run_dir.glob("*.seg"):  # verify passed: only a torn, empty segment can follow
                if later.name > segment_name(end.segment):
                    later.unlink()
            path = run_dir / segment_name(end.segment)
            writer._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            os.ftruncate(writer._fd, end.offset)
            os.fsync(writer._fd)
            writer._size = end.offset
            writer._next_seq = end.seq
        writer._committer.start()
        return writer

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def append(self, kind: Kind, body: dict[str, Any], time_us: int | None = None) -> int:
        """Journal one event and return its seq; durable as its kind's class requires.

        A value in ``body`` that cannot be journaled never fails the append: it is journaled
        as a marker, with a warning (``codec.journalable``)."""
        record = [kind.value, micros_now() if time_us is None else time_us, body]
        try:
            payload = codec.encode(record)
        except codec.EncodeError:
            payload = self._encode_marked(record)
        with self._mutex:
            self._check_usable()
            seq = self._next_seq
            record = encode_record(seq, payload)
            if self._size > SEGMENT_HEADER_SIZE and self._size + len(record) > self._segment_bytes:
                self._rotate(seq)
            self._write(record)
            self._next_seq = seq + 1
            if kind.is_lifecycle and self._durability.fsync_lifecycle:
                self._fsync()
            else:
                self._dirty = True
        return seq

    def _encode_marked(self, record: list) -> bytes:
        body, problems = codec.journalable(record[2])
        warning = f"run {self.run}: {record[0]} event journaled with markers for " + "; ".join(problems)
        if warning not in self._warned and len(self._warned) < MAX_MARKER_WARNINGS:
            self._warned.add(warning)  # once each: a value logged at every step would flood the log
            log.warning("%s", warning)
        return codec.encode([record[0], record[1], body])

    def store_file(self, path: str | os.PathLike) -> dict:
        """Copy a file into the run's blob store now; returns {digest, md5, size}."""
        self._check_usable()
        try:
            return store_blob(self.dir, path)
        except OSError as error:
            raise JournalWriteError(f"could not store {os.fspath(path)!r} for run {self.run}: {error}") from error

    def sync(self) -> None:
        """Make everything appended so far durable now."""
        with self._mutex:
            self._check_usable()
            self._fsync()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._committer.join()
        with self._mutex:
            try:
                if self._failure is None and self._fd >= 0:
                    self._fsync()
            finally:
                if self._fd >= 0:
                    os.close(self._fd)
                    self._fd = -1
                os.close(self._lock_fd)

    def abandon(self) -> None:
        """Close after a failed start: a run with no event yet is removed, so that no empty
        run is left behind; one with events stays (it is a real run)."""
        try:
            self.close()
        finally:
            if self._next_seq == 0:
                _remove_run_dir(self.dir)

    def __enter__(self) -> "JournalWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_usable(self) -> None:
        if self._closed.is_set():
            raise JournalWriteError(f"the journal writer of run {self.run} is closed")
        if self._failure is not None:
            raise JournalWriteError(f"run {self.run}: journal unusable after an fsync failure: {self._failure}")

    def _write(self, record: bytes) -> None:
        start = self._size
        try:
            write_all(self._fd, record)
        except OSError as error:
            self._undo_partial_write(start)
            raise JournalWriteError(f"run {self.run}: could not append to the journal: {error}") from error
        self._size = start + len(record)

    def _undo_partial_write(self, start: int) -> None:
        """Cut a half-written record so later appends do not follow garbage."""
        try:
            os.ftruncate(self._fd, start)
        except OSError as error:
            self._failure = error

    def _fsync(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as error:
            # After a failed fsync the page cache state is unknown: stop writing (as PostgreSQL does).
            self._failure = error
            raise JournalWriteError(f"run {self.run}: fsync of the journal failed: {error}") from error
        self._dirty = False

    def _rotate(self, first_seq: int) -> None:
        self._fsync()
        os.close(self._fd)
        self._fd = -1
        self._open_segment(first_seq)

    def _open_segment(self, first_seq: int) -> None:
        path = self.dir / segment_name(first_seq)
        header = encode_segment_header(self.run, first_seq)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, FILE_MODE)
            try:
                write_all(fd, header)
                os.fsync(fd)
            except OSError:
                os.close(fd)
                path.unlink(missing_ok=True)
                raise
            fsync_dir(self.dir)
        except OSError as error:
            raise JournalWriteError(f"run {self.run}: could not create segment {path}: {error}") from error
        self._fd = fd
        self._size = len(header)
        self._next_seq = first_seq

    def _group_commit(self) -> None:
        while not self._closed.wait(self._durability.group_commit_seconds):
            with self._mutex:
                if self._dirty and self._failure is None and self._fd >= 0:
                    try:
                        self._fsync()
                    except JournalWriteError:
                        pass  # recorded in self._failure; the next append reports it


def _lock(run_dir: Path) -> int:
    """Take the run's writer lock; the kernel drops it when the process dies."""
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise WriterBusy(f"run {run_dir.name} is being written by another live process") from None
    return fd


def _remove_run_dir(run_dir: Path) -> None:
    """Remove a run directory that holds no event; a failure is logged, not raised (the
    caller is already raising why the run could not start)."""
    try:
        shutil.rmtree(run_dir)
    except OSError as error:
        log.warning("could not remove the empty run directory %s: %s", run_dir, error)


def writer_alive(run_dir: Path) -> bool:
    """True while some process holds the run's writer lock (for the dead-run watchdog to come)."""
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False

"""Appending a run's events: the producer side of the journal.

Two durability classes (docs/journal-format.md, "Durability"):
- lifecycle events are written and fsynced before ``append`` returns;
- heartbeats and metrics are written to the file before ``append`` returns (so a
  ``kill -9`` of the experiment loses nothing) and fsynced by a background group
  commit at most ``group_commit_seconds`` later (a power loss loses that window).

Metric points have their own fast path, ``append_metric``: a per-writer MessagePack packer
with no callback, the metric in columns with an integer timestamp, and the record framed
inline (docs/journal-format.md, version 2).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import shutil
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runrelay.eventlog import codec
from runrelay.eventlog.blobs import store_blob
from runrelay.eventlog.errors import JournalCorrupt, JournalWriteError, WriterBusy
from runrelay.eventlog.events import Kind, check_run_uid, micros_now, new_run_uid
from runrelay.eventlog.format import (
    MAX_PAYLOAD,
    RECORD_HEADER_SIZE,
    RESUME_HINT_SIZE,
    SEGMENT_HEADER_SIZE,
    SegmentScan,
    check_segment_header,
    decode_resume_hint,
    encode_record,
    encode_resume_hint,
    encode_segment_header,
    scan_segment,
    segment_name,
    segment_version,
)
from runrelay.eventlog.fsutil import (FILE_MODE, NotRegularFile, fsync_dir, is_locked, make_private_dir, open_regular,
                                      try_lock, write_all)
from runrelay.eventlog.reader import MAX_SEQ, Journal, _mapped, _Outcome

DEFAULT_GROUP_COMMIT_SECONDS = 0.2
DEFAULT_SEGMENT_BYTES = 32 * 1024 * 1024
LOCK_FILE = "writer.lock"
MAX_MARKER_WARNINGS = 100  # distinct warnings per run about values journaled as markers

log = logging.getLogger(__name__)

_EPOCH = dt.datetime(1970, 1, 1)
_MICROSECOND = dt.timedelta(microseconds=1)
_NUMBERS = (int, float)  # a metric value in columns is exactly one of these (not bool)
_RECORD_HEAD = struct.Struct(">IQI")
_CRC = struct.Struct(">I")
_crc32 = zlib.crc32
_time_ns = time.time_ns
_METRICS = Kind.METRICS.value
_RECORD_ROOM = 64  # of a payload, for the kind and time around the body


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
        self._last_start: int | None = None  # where the segment's last record starts (None: it holds none)
        self._segment = 0  # first seq of the segment being appended to
        self._columns = True  # whether that segment's version has the metric column payload
        self._next_seq = 0
        self._dirty = False
        self._failure: OSError | None = None
        self._failed_writes = 0  # in a row, e.g. while the disk is full
        self._unusable = False  # closed or failed: the fast path's one check
        self._packer = codec.metric_packer()
        self._warned: set[str] = set()
        self._closed = threading.Event()
        self._committer = threading.Thread(target=self._group_commit, name=f"runrelay-commit-{run[:8]}", daemon=True)

    @classmethod
    def create(
        cls,
        root: str | os.PathLike,
        run: str | None = None,
        durability: Durability = Durability(),
        segment_bytes: int | None = None,
    ) -> "JournalWriter":
        """Start a new run's journal (a fresh run uid unless one is given); segments of about
        ``segment_bytes`` (default ``DEFAULT_SEGMENT_BYTES``)."""
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
            writer = cls(journal, run, _lock(run_dir), durability, segment_bytes or DEFAULT_SEGMENT_BYTES)
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
            segment, offset, next_seq, last_start = _end_from_hint(journal, run, lock_fd) or _end_from_scan(journal, run)
        except (JournalCorrupt, OSError):
            os.close(lock_fd)
            raise
        writer = cls(journal, run, lock_fd, durability, segment_bytes)
        try:
            if next_seq == 0:
                for stale in run_dir.glob("*.seg"):
                    stale.unlink()
                writer._open_segment(0)
            else:
                for later in run_dir.glob("*.seg"):  # checked: only a torn, empty segment can follow
                    if later.name > segment_name(segment):
                        later.unlink()
                path = run_dir / segment_name(segment)
                writer._fd = os.open(path, os.O_RDWR | os.O_APPEND)
                writer._columns = segment_version(os.pread(writer._fd, SEGMENT_HEADER_SIZE, 0)) >= 2
                os.ftruncate(writer._fd, offset)
                os.fsync(writer._fd)
                writer._segment, writer._size, writer._next_seq = segment, offset, next_seq
                writer._last_start = last_start
                writer._store_hint()
        except BaseException:
            writer._unusable = True
            if writer._fd >= 0:
                os.close(writer._fd)
            os.close(lock_fd)
            raise
        writer._committer.start()
        return writer

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def append(self, kind: Kind, body: dict[str, Any], time_us: int | None = None) -> int:
        """Journal one event and return its seq; durable as its kind's class requires.

        A value in ``body`` that cannot be journaled never fails the append, nor one nested
        too deep, nor a body too large for one record: it is journaled with markers where it
        was changed, with a warning (``codec.journalable``, ``codec.fitted``)."""
        record = [kind.value, micros_now() if time_us is None else time_us, body]
        try:
            payload = codec.encode(record)
        except codec.EncodeError:
            payload = self._encode_marked(record, codec.journalable)
        if len(payload) > codec.MAX_DEPTH and codec.too_deep(record[2]):
            payload = self._encode_marked(record, codec.journalable)
        if len(payload) > MAX_PAYLOAD:
            payload = self._encode_marked(record, lambda body: codec.fitted(body, MAX_PAYLOAD - _RECORD_ROOM))
            if len(payload) > MAX_PAYLOAD:  # millions of fields, even as markers
                raise JournalWriteError(f"run {self.run}: a {kind.value} event of {len(payload)} bytes even with "
                                        f"markers exceeds the {MAX_PAYLOAD}-byte limit of one journal record")
        with self._mutex:
            self._check_usable()
            seq = self._next_seq
            self._put(encode_record(seq, payload))
            self._next_seq = seq + 1
            if kind.is_lifecycle and self._durability.fsync_lifecycle:
                self._fsync()
            else:
                self._dirty = True
        return seq

    def append_metric(self, name: str, step: int, value: Any, timestamp: dt.datetime | None = None,
                      time_us: int | None = None) -> int:
        """Journal one metric point, the ``metrics`` event ``{name, step, value, timestamp}``,
        and return its seq: the same event ``append`` would journal, on the fast path (the
        column payload) when the point fits it, else through ``append``."""
        if type(timestamp) is dt.datetime and timestamp.tzinfo is None:
            stamp = (timestamp - _EPOCH) // _MICROSECOND
        elif timestamp is None:
            stamp = None
        else:
            stamp = False
        if stamp is not False and type(name) is str and type(step) is int and type(value) in _NUMBERS:
            when = _time_ns() // 1000 if time_us is None else time_us
            with self._mutex:
                if self._unusable:
                    self._check_usable()
                if self._columns:
                    seq = self._next_seq
                    try:
                        payload = self._packer.pack((_METRICS, when, name, step, value, stamp))
                    except (ValueError, OverflowError):  # an int beyond 64 bits, a str UTF-8 cannot hold
                        payload = b""
                    if 0 < len(payload) <= MAX_PAYLOAD:
                        head = _RECORD_HEAD.pack(len(payload), seq, _crc32(payload))
                        self._put(head + _CRC.pack(_crc32(head)) + payload)
                        self._next_seq = seq + 1
                        self._dirty = True
                        return seq
        body = {"name": name, "step": step, "value": value, "timestamp": timestamp}
        return self.append(Kind.METRICS, body, time_us)

    def _encode_marked(self, record: list, mark) -> bytes:
        """The payload of ``record`` with its body changed by ``mark`` (which returns the new
        body and what it changed, for the warning); ``record`` gets the new body."""
        record[2], problems = mark(record[2])
        warning = f"run {self.run}: {record[0]} event journaled with markers for " + "; ".join(problems)
        if warning not in self._warned and len(self._warned) < MAX_MARKER_WARNINGS:
            self._warned.add(warning)  # once each: a value logged at every step would flood the log
            log.warning("%s", warning)
        return codec.encode(record)

    def store_file(self, path: str | os.PathLike) -> dict:
        """Copy a file into the run's blob store now; returns {digest, md5, size}."""
        self._check_usable()
        try:
            return store_blob(self.dir, path)
        except OSError as error:
            raise self._failed(f"could not store {os.fspath(path)!r}: {error}") from error

    def sync(self) -> None:
        """Make everything appended so far durable now."""
        with self._mutex:
            self._check_usable()
            self._fsync()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._unusable = True
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

    def _put(self, record: bytes) -> None:
        """Write one framed record (of seq ``_next_seq``), starting a new segment first if it
        would overflow this one."""
        if self._next_seq > MAX_SEQ:  # a reader would call it corruption
            raise self._failed(f"seq {self._next_seq} is beyond the last a journal holds ({MAX_SEQ})")
        if self._size + len(record) > self._segment_bytes and self._size > SEGMENT_HEADER_SIZE:
            self._rotate(self._next_seq)
        start = self._size
        try:
            written = os.write(self._fd, record)
            if written != len(record):  # a regular file may take a write in parts
                write_all(self._fd, memoryview(record)[written:])
        except OSError as error:
            self._undo_partial_write(start)
            raise self._failed(f"could not append to the journal: {error}") from error
        self._size = start + len(record)
        self._last_start = start
        if self._failed_writes:
            log.warning("run %s: journaling again; %d writes had failed", self.run, self._failed_writes)
            self._failed_writes = 0

    def _failed(self, why: str) -> JournalWriteError:
        """The error of a failed write, logged for the first of a series only: a full disk
        fails every write until space returns, and each later one tries again."""
        error = JournalWriteError(f"run {self.run}: {why}")
        if not self._failed_writes:
            log.warning("%s (later failures are not logged until a write works again)", error)
        self._failed_writes += 1
        return error

    def _undo_partial_write(self, start: int) -> None:
        """Cut a half-written record so later appends do not follow garbage."""
        try:
            os.ftruncate(self._fd, start)
        except OSError as error:
            self._failure = error
            self._unusable = True

    def _fsync(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as error:
            # After a failed fsync the page cache state is unknown: stop writing (as PostgreSQL does).
            self._failure = error
            self._unusable = True
            raise self._failed(f"fsync of the journal failed, no more is journaled: {error}") from error
        self._dirty = False
        self._store_hint()

    def _store_hint(self) -> None:
        """Record in writer.lock the last durable record (where it starts and its seq), for
        ``resume``, which checks that record before it trusts the hint. Advisory: a hint that
        cannot be written is simply not there (resume then checks every record)."""
        if self._last_start is None:  # a segment with no record yet: its header vouches for its first seq
            hint = encode_resume_hint(self._segment, SEGMENT_HEADER_SIZE, self._segment)
        else:
            hint = encode_resume_hint(self._segment, self._last_start, self._next_seq - 1)
        try:
            os.pwrite(self._lock_fd, hint, 0)
        except OSError:
            pass

    def _rotate(self, first_seq: int) -> None:
        """Go on in a new segment. Until it can be made (a full disk), the current one stays
        the one appended to, so the next append simply tries again."""
        self._fsync()
        full = self._fd
        self._open_segment(first_seq)
        os.close(full)

    def _open_segment(self, first_seq: int) -> None:
        path = self.dir / segment_name(first_seq)
        header = encode_segment_header(self.run, first_seq)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, FILE_MODE)
        except OSError as error:
            raise self._failed(f"could not create segment {path}: {error}") from error
        try:
            write_all(fd, header)
            os.fsync(fd)
            fsync_dir(self.dir)
        except OSError as error:
            os.close(fd)
            with contextlib.suppress(OSError):  # else the next try meets it (O_EXCL): resume removes it
                path.unlink()
            raise self._failed(f"could not create segment {path}: {error}") from error
        self._fd = fd
        self._size = len(header)
        self._last_start = None
        self._segment = self._next_seq = first_seq
        self._columns = True
        self._store_hint()

    def _group_commit(self) -> None:
        while not self._closed.wait(self._durability.group_commit_seconds):
            with self._mutex:
                if self._dirty and self._failure is None and self._fd >= 0:
                    try:
                        self._fsync()
                    except JournalWriteError:
                        pass  # recorded in self._failure; the next append reports it


def _end_from_hint(journal: Journal, run: str, lock_fd: int) -> tuple[int, int, int, int | None] | None:
    """(segment, offset, next seq, where the last record starts) where a resumed writer
    appends, checked from the resume hint on (docs/journal-format.md); None when there is no
    usable hint."""
    hint = decode_resume_hint(os.pread(lock_fd, RESUME_HINT_SIZE, 0))
    if hint is None:
        return None
    run_fd = journal._open_run(run)
    try:
        return _check_hint(journal, run, run_fd, *hint)
    finally:
        os.close(run_fd)


def _check_hint(journal: Journal, run: str, run_fd: int, segment: int, offset: int,
                seq: int) -> tuple[int, int, int, int | None] | None:
    """The hint is trusted only when the segment vouches for it: a good record of seq ``seq``
    starts at ``offset``, or ``offset`` is the end of the header of a segment whose first
    seq is ``seq``. Otherwise (damaged, hostile, or an older writer's hint naming the end of
    its records) None: every record is checked instead."""
    segments = journal._segments(run, run_fd)
    if not segments or segment != segments[-1]:
        return None
    name = segment_name(segment)
    with _mapped(run, name, run_fd) as data:
        if not SEGMENT_HEADER_SIZE <= offset <= len(data):
            return None
        problem = check_segment_header(data, run, segment)
        if problem:
            raise JournalCorrupt(run, name, 0, problem)
        scan = SegmentScan()
        next_seq, last_start = seq, None
        for record_seq, payload, end in scan_segment(data, run, segment, offset, True, scan):
            start = end - len(payload) - RECORD_HEADER_SIZE
            if record_seq != next_seq:
                if last_start is None:  # the hint does not name this record
                    return None
                raise JournalCorrupt(run, name, start, f"expected seq {next_seq}, found {record_seq}")
            next_seq, last_start = record_seq + 1, start
    if last_start is None and not (offset == SEGMENT_HEADER_SIZE and seq == segment):
        return None  # nothing at the hint vouches for its seq
    if scan.damage and not scan.damage.torn:
        raise JournalCorrupt(run, name, scan.damage.offset, scan.damage.reason)
    return segment, scan.end, next_seq, last_start


def _end_from_scan(journal: Journal, run: str) -> tuple[int, int, int, int | None]:
    """(segment, offset, next seq, where the last record starts) after every record's
    checksums are checked; raises JournalCorrupt for damage that is not a torn tail."""
    segment, offset, next_seq, last_start = 0, 0, 0, None
    for _seq, payload, _name, payload_offset, position in journal._records(run, 0, _Outcome()):
        segment, offset, next_seq = position.segment, position.offset, position.seq
        last_start = payload_offset - RECORD_HEADER_SIZE
    return segment, offset, next_seq, last_start


def _lock(run_dir: Path) -> int:
    """Take the run's writer lock; the kernel drops it when the process dies."""
    try:
        fd = try_lock(run_dir / LOCK_FILE)
    except NotRegularFile as odd:
        raise JournalWriteError(f"run {run_dir.name}: {odd}") from None
    if fd is None:
        raise WriterBusy(f"run {run_dir.name} is being written by another live process")
    return fd


def _remove_run_dir(run_dir: Path) -> None:
    """Remove a run directory that holds no event; a failure is logged, not raised (the
    caller is already raising why the run could not start)."""
    try:
        shutil.rmtree(run_dir)
    except OSError as error:
        log.warning("could not remove the empty run directory %s: %s", run_dir, error)


def writer_alive(run_dir: Path) -> bool:
    """True while some process holds the run's writer lock. A lock file that is not a
    regular file (a FIFO would hang ``open``, a symlink lead out of the journal) is held by
    no writer: ``_lock`` never takes one."""
    try:
        fd = open_regular(run_dir / LOCK_FILE)
    except (FileNotFoundError, NotRegularFile):
        return False
    try:
        return is_locked(fd)
    finally:
        os.close(fd)

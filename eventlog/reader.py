"""Reading a journal: list runs, read or follow a run from any position, verify it.

A torn tail (the writer died mid-append) simply ends a run's events. Corruption
(a bad checksum before the end) raises JournalCorrupt after every good event
before it has been yielded; damaged bytes are never returned.

Every name and file in a journal is untrusted: a run directory and each segment and blob
are opened without following symlinks and only when they are what they must be (a
directory, a regular file), so a FIFO cannot hang a reader and a symlink cannot lead it
out of the journal. A run that cannot be read (no permission, an odd file) raises
RunUnreadable, a JournalCorrupt: that run is reported, the others are read.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

from runrelay.eventlog import codec
from runrelay.eventlog.codec import naive_from_micros
from runrelay.eventlog.blobs import BLOB_DIR, blob_path, is_digest
from runrelay.eventlog.errors import JournalCorrupt, RunUnreadable, UnknownRun
from runrelay.eventlog.events import KINDS_BY_VALUE, Event, Kind, Points, check_run_uid, is_run_uid, utc_from_micros
from runrelay.eventlog.fold import MalformedEvent, metric_point
from runrelay.eventlog.format import RECORD_HEADER_SIZE, Damage, SegmentScan, scan_segment, segment_first_seq, segment_name
from runrelay.eventlog.fsutil import NotRegularFile, open_directory, open_regular

FOLLOW_POLL_SECONDS = 0.2
POINTS_CHUNK = 50_000  # metric points per chunk of ``Journal.points``
_HASH_CHUNK = 1024 * 1024
# The next seq (seq + 1) is a cursor in SQLite's signed 64-bit INTEGER: a seq beyond is corruption.
MAX_SEQ = 2**63 - 2
# Deeper than this, an event body is corruption: sinks and the state's encoder recurse into
# values (JSON's encoder stops near 1000 levels, MessagePack's near 511).
MAX_DEPTH = 400


@dataclass(frozen=True, order=True)
class Position:
    """Where reading a run resumes: the next seq, and the byte where its record starts."""

    seq: int = 0
    segment: int = 0  # first seq of the segment file that holds ``seq``
    offset: int = 0  # byte offset in that segment; 0 means "from its header"


@dataclass
class RunCheck:
    """What ``Journal.verify`` found in one run."""

    run: str
    records: int = 0
    last_seq: int | None = None
    torn: str | None = None  # description of a torn tail, if any
    corrupt: JournalCorrupt | None = None
    end: Position = field(default_factory=Position)
    blobs: list[str] = field(default_factory=list)  # what is wrong with its blobs (``verify(blobs=True)``)

    @property
    def ok(self) -> bool:
        return self.corrupt is None and not self.blobs


@dataclass
class RecordBatch:
    """Up to a batch of a run's records from a position: the metric points column by column,
    every other event (and any metric event that is malformed) as an ``Event``."""

    events: list[Event]
    points: Points
    end: Position  # where the next read resumes
    records: int = 0
    corrupt: JournalCorrupt | None = None  # damage that ended the batch, after its good records


@dataclass
class _Outcome:
    torn: tuple[str, Damage] | None = None


class Journal:
    """Read-only view of a journal directory (one sub-directory per run)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def run_dir(self, run: str) -> Path:
        return self.root / check_run_uid(run)

    def runs(self) -> list[str]:
        """Every run in the journal, oldest first (run uids sort by creation time).

        Every entry named like a run uid is one, whatever it is: reading one that is not a
        directory raises RunUnreadable, so it is reported rather than passed over."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(name for name in names if is_run_uid(name))

    def blob(self, run: str, digest: str) -> Path:
        return blob_path(self.run_dir(run), digest)

    def open_blob(self, run: str, digest: str) -> BinaryIO:
        """The blob's bytes, checked against their digest and rewound (``sinks.base.RunSource``).

        Only a regular file inside the run's own blob store is opened: never through a
        symlink (the run directory's, ``blobs``' or the blob's own), never a FIFO or device.
        FileNotFoundError when it is gone; ValueError when it is damaged, odd or unreadable
        (both permanent for the event naming it: a sink dead-letters it, never retries it).
        """
        blob_path(Path(run), digest)  # checks the digest
        try:
            run_fd = self._open_run(run)
        except UnknownRun as gone:
            raise FileNotFoundError(str(gone)) from None
        except RunUnreadable as unreadable:
            raise ValueError(f"blob {digest}: {unreadable}") from None
        try:
            blobs_fd = open_directory(BLOB_DIR, dir_fd=run_fd)
            try:
                fd = open_regular(digest, dir_fd=blobs_fd)
            finally:
                os.close(blobs_fd)
        except NotRegularFile as odd:
            raise ValueError(f"blob {digest} of run {run}: {odd}") from None
        except FileNotFoundError:
            raise FileNotFoundError(f"blob {digest} of run {run} is missing") from None
        except OSError as error:
            if error.errno not in _PERMANENT_ERRNOS:
                raise  # EIO and the like: maybe passing
            raise ValueError(f"blob {digest} of run {run} cannot be read: {error.strerror}") from None
        finally:
            os.close(run_fd)
        file = os.fdopen(fd, "rb")
        try:
            sha256 = hashlib.sha256()
            while chunk := file.read(_HASH_CHUNK):
                sha256.update(chunk)
            if sha256.hexdigest() != digest:
                raise ValueError(f"blob {digest} of run {run} is damaged: its bytes have another digest")
            file.seek(0)
        except BaseException:
            file.close()
            raise
        return file

    def read_batch(self, run: str, start: Position | int, max_records: int,
                   until_us: int | None = None, fold_only: bool = False) -> RecordBatch:
        """Up to ``max_records`` records from ``start``; with ``until_us``, only records
        appended at or before that time (µs since the epoch). Damage ends the batch after
        its good records (``corrupt``); a torn tail simply ends it.

        A metric point in columns (format version 2) goes straight into ``points``: no
        ``Event`` is built for it (most of a run's records are points). ``fold_only``: for
        folding a run again through what a sink already holds, metric records are passed
        over undecoded (checksummed, not decoded: they set nothing in a run's state) and
        ``points`` stays empty (and ``until_us`` is not for it)."""
        if fold_only and until_us is not None:
            raise ValueError("a fold-only read reads through what a sink holds, not up to a time")
        events: list[Event] = []
        points = Points()
        add_point = points.add
        end = start if isinstance(start, Position) else Position(seq=start)
        records, last = 0, None  # last: (seq, segment's first seq, end offset) of the last record taken
        corrupt = None
        try:
            for seq, payload, segment, offset, first, stop in self._raw_records(run, start, _Outcome()):
                if not (fold_only and payload.startswith(_METRIC_PREFIXES)):
                    record = _decoded(run, payload, segment, offset)
                    if until_us is not None and record[1] > until_us:
                        break
                    if len(record) == _COLUMNS and record[2]:  # an empty name is the fold's to refuse
                        stamp = record[5]
                        add_point(seq, record[2], record[3], record[4],
                                  None if stamp is None else naive_from_micros(stamp))
                    else:
                        event = _event(run, seq, record)
                        point = _point_of(event)
                        if point is None:
                            events.append(event)
                        elif not fold_only:
                            add_point(*point)
                last = (seq, first, stop)
                records += 1
                if records >= max_records:
                    break
        except JournalCorrupt as damage:
            corrupt = damage
        if last is not None:
            end = Position(last[0] + 1, last[1], last[2])
        return RecordBatch(events, points, end, records, corrupt)

    def bytes_after(self, run: str, position: Position) -> int:
        """About how many journal bytes of ``run`` follow ``position`` (file sizes only, for
        progress bars); 0 for a run that is gone."""
        total = 0
        for first in self._segments_or_none(run):
            if first < position.segment:
                continue
            try:
                size = os.stat(self.run_dir(run) / segment_name(first), follow_symlinks=False).st_size
            except OSError:
                continue
            total += max(0, size - position.offset) if first == position.segment else size
        return total

    def bytes_between(self, run: str, start: Position, end: Position) -> int:
        """About how many journal bytes lie from ``start`` to ``end`` (for progress bars)."""
        if start.segment == end.segment:
            return max(0, end.offset - start.offset)
        return max(0, self.bytes_after(run, start) - self.bytes_after(run, end))

    def _segments_or_none(self, run: str) -> list[int]:
        try:
            fd = self._open_run(run)
        except (UnknownRun, RunUnreadable):
            return []
        try:
            return self._segments(run, fd)
        except JournalCorrupt:
            return []
        finally:
            os.close(fd)

    def last_segment(self, run: str) -> Position:
        """Where the run's last segment starts: reading from there finds its latest events."""
        segments = self._segments_or_none(run)
        return Position(seq=segments[-1], segment=segments[-1]) if segments else Position()

    def points(self, run: str, through_seq: int) -> Iterator[Points]:
        """The run's well-formed metric points up to ``through_seq``, in chunks (``RunSource``)."""
        position: Position = Position()
        while position.seq <= through_seq:
            batch = self.read_batch(run, position, POINTS_CHUNK)
            chunk = batch.points.before(through_seq + 1)
            if len(chunk):
                yield chunk
            if batch.corrupt or batch.records == 0:
                return
            position = batch.end

    def read(self, run: str, start: Position | int = 0) -> Iterator[tuple[Event, Position]]:
        """Yield (event, position after it) from ``start`` (a seq or a saved Position)."""
        return self._read(run, start, _Outcome())

    def events(self, run: str, start: Position | int = 0) -> Iterator[Event]:
        for event, _ in self.read(run, start):
            yield event

    def verify(self, run: str, blobs: bool = False) -> RunCheck:
        """Check every record's checksums; never raises for damage, reports it. With
        ``blobs``, also every blob the run holds or its events name, against its digest."""
        check = RunCheck(run)
        outcome = _Outcome()
        named: set[str] = set()
        try:
            for event, position in self._read(run, 0, outcome):
                check.records += 1
                check.last_seq = event.seq
                check.end = position
                if blobs:
                    named |= _digests(event)
        except JournalCorrupt as corrupt:
            check.corrupt = corrupt
        if outcome.torn:
            segment, damage = outcome.torn
            check.torn = f"{segment} byte {damage.offset}: {damage.reason}"
        if blobs and not isinstance(check.corrupt, RunUnreadable):
            check.blobs = self._check_blobs(run, named)
        return check

    def _check_blobs(self, run: str, named: set[str]) -> list[str]:
        """What is wrong with the run's blobs: each one held or named, read and hashed."""
        try:
            held = {name for name in os.listdir(self.run_dir(run) / BLOB_DIR) if is_digest(name)}
        except FileNotFoundError:
            held = set()
        except OSError as error:  # blobs is a symlink, a file, unreadable: opening each one says what
            held = set()
            if not named:
                return [f"{BLOB_DIR}: {error.strerror}"]
        problems = []
        for digest in sorted(held | named):
            try:
                self.open_blob(run, digest).close()
            except (OSError, ValueError) as error:
                problems.append(str(error) if digest in named else f"{error} (named by no event)")
        return problems

    def follow(
        self,
        run: str,
        start: Position | int = 0,
        stop: threading.Event | None = None,
        poll_seconds: float = FOLLOW_POLL_SECONDS,
    ) -> Iterator[Event]:
        """Yield a live run's events as they are appended, until a terminal event, ``stop``,
        or the end of what the run's writer wrote before it went away (a crashed run)."""
        from runrelay.eventlog.writer import writer_alive  # the writer imports this module

        stop = stop or threading.Event()
        position = start
        while not stop.is_set():
            gone = not writer_alive(self.run_dir(run))  # before reading: its last events are read
            for event, position in self.read(run, position):
                yield event
                if event.kind.is_terminal:
                    return
            if gone:
                return
            stop.wait(poll_seconds)

    def _open_run(self, run: str) -> int:
        """An fd of the run's directory, opened without following a symlink."""
        path = self.run_dir(run)
        try:
            return open_directory(path)
        except FileNotFoundError:
            raise UnknownRun(f"no run {run} in journal {self.root}") from None
        except NotRegularFile as odd:
            raise RunUnreadable(run, "", f"{odd} (never followed out of the journal)") from None
        except OSError as error:
            raise RunUnreadable(run, "", f"{error.strerror}: {path}") from None

    def _segments(self, run: str, run_fd: int) -> list[int]:
        """The run's segments, by first seq; a name beyond ``MAX_SEQ`` is corruption."""
        try:
            names = os.listdir(run_fd)
        except OSError as error:
            raise RunUnreadable(run, "", f"{error.strerror}: {self.run_dir(run)}") from None
        segments = sorted(seq for seq in map(segment_first_seq, names) if seq is not None)
        if segments and segments[-1] > MAX_SEQ:
            raise JournalCorrupt(run, segment_name(segments[-1]), 0, f"a segment's first seq is beyond {MAX_SEQ}")
        return segments

    def count(self, run: str, start: Position | int = 0, decode: bool = False) -> tuple[int, JournalCorrupt | None]:
        """How many good records follow ``start``, and the corruption that ends them if any.

        Checksums are checked, payloads not decoded (cheap enough to size a backlog) unless
        ``decode``: then an undecodable payload ends the count as corruption, as delivery meets it.
        """
        count = 0
        records = self._read(run, start, _Outcome()) if decode else self._raw_records(run, start, _Outcome())
        try:
            for count, _ in enumerate(records, start=1):
                pass
        except JournalCorrupt as corrupt:
            return count, corrupt
        return count, None

    def _read(self, run: str, start: Position | int, outcome: _Outcome) -> Iterator[tuple[Event, Position]]:
        for seq, payload, segment, offset, position in self._records(run, start, outcome):
            yield _decode_event(run, seq, payload, segment, offset), position

    def _records(
        self, run: str, start: Position | int, outcome: _Outcome
    ) -> Iterator[tuple[int, bytes, str, int, Position]]:
        """(seq, payload, segment name, payload offset, position after) of each good record."""
        for seq, payload, segment, offset, first, end in self._raw_records(run, start, outcome):
            yield seq, payload, segment, offset, Position(seq + 1, first, end)

    def _raw_records(
        self, run: str, start: Position | int, outcome: _Outcome
    ) -> Iterator[tuple[int, bytes, str, int, int, int]]:
        """(seq, payload, segment name, payload offset, segment's first seq, end offset) of
        each good record: the position after it, without building one per record.

        A run starts at seq 0 and its seqs follow each other across segments: a missing
        first segment, or a gap between two, is corruption."""
        run_fd = self._open_run(run)
        try:
            yield from self._records_in(run, run_fd, start, outcome)
        finally:
            os.close(run_fd)

    def _records_in(self, run: str, run_fd: int, start: Position | int,
                    outcome: _Outcome) -> Iterator[tuple[int, bytes, str, int, int, int]]:
        segments = self._segments(run, run_fd)
        if not segments:
            return
        if segments[0] != 0:
            raise JournalCorrupt(run, segment_name(segments[0]), 0, f"the run's first segment ({segment_name(0)}) "
                                 f"is missing: its records start at seq {segments[0]}")
        if isinstance(start, int):
            start = Position(seq=start)
        if start.offset == 0 or start.segment not in segments:  # only a seq to go by
            start = Position(seq=start.seq, segment=_segment_holding(segments, start.seq), offset=0)
        first_index, start_seq = segments.index(start.segment), start.seq
        expected = start.seq if start.offset else start.segment  # the next record's seq
        for index in range(first_index, len(segments)):
            first = segments[index]
            name = segment_name(first)
            offset = start.offset if index == first_index else 0
            if not offset and first != expected:
                raise JournalCorrupt(run, name, 0, f"segment starts at seq {first}, expected {expected}")
            last = index == len(segments) - 1
            scan = SegmentScan()
            with _mapped(run, name, run_fd) as data:
                for seq, payload, end in scan_segment(data, run, first, offset, last, scan):
                    if seq != expected or seq > MAX_SEQ:  # the first: resuming at a byte that holds another seq
                        problem = (f"expected seq {expected}, found {seq}" if seq != expected
                                   else f"seq {seq} is beyond {MAX_SEQ}")
                        raise JournalCorrupt(run, name, end - len(payload) - RECORD_HEADER_SIZE, problem)
                    expected = seq + 1
                    if seq >= start_seq:
                        yield seq, payload, name, end - len(payload), first, end
            if scan.damage:
                if scan.damage.torn:
                    outcome.torn = (name, scan.damage)
                    return
                raise JournalCorrupt(run, name, scan.damage.offset, scan.damage.reason)


def _segment_holding(segments: list[int], seq: int) -> int:
    holder = segments[0]
    for first in segments:
        if first <= seq:
            holder = first
    return holder


class _mapped:
    """Map a segment (a regular file in the run's directory, never through a symlink)
    read-only; an empty file maps to b''."""

    def __init__(self, run: str, name: str, run_fd: int):
        self.run, self.name, self.run_fd = run, name, run_fd

    def __enter__(self):
        try:
            fd = open_regular(self.name, dir_fd=self.run_fd)
        except NotRegularFile as odd:
            raise JournalCorrupt(self.run, self.name, 0, str(odd)) from None
        except FileNotFoundError:
            raise UnknownRun(f"run {self.run}: {self.name} is gone (the run was removed meanwhile)") from None
        except OSError as error:
            raise RunUnreadable(self.run, self.name, error.strerror) from None
        self._file = os.fdopen(fd, "rb")
        size = os.fstat(fd).st_size
        self._map = mmap.mmap(fd, size, access=mmap.ACCESS_READ) if size else None
        return self._map if self._map is not None else b""

    def __exit__(self, *exc):
        if self._map is not None:
            self._map.close()
        self._file.close()


_COLUMNS = 6  # the length of a metric point's column payload (format version 2)
# How a metric record's MessagePack payload begins: an array of 6 (columns) or of 3, then "metrics".
_METRIC_PREFIXES = (b"\x96\xa7metrics", b"\x93\xa7metrics")


def _decode_event(run: str, seq: int, payload: bytes, segment: str, offset: int) -> Event:
    """Turn a checksummed payload into an Event; a malformed one is corruption, not a crash."""
    return _event(run, seq, _decoded(run, payload, segment, offset))


def _decoded(run: str, payload: bytes, segment: str, offset: int) -> list:
    """A checksummed payload decoded, its shape checked: ``[kind, time, body]`` or a metric
    point in columns. One that is not either is corruption, not a crash."""
    try:
        record = codec.decode(payload)
        if len(record) == _COLUMNS and record[0] == "metrics":
            _kind, micros, name, step, value, stamp = record
            if not (type(name) is str and type(step) is int and type(value) in (int, float)
                    and (stamp is None or type(stamp) is int)):
                raise ValueError("metric columns are not [kind, time, name, step, value, timestamp]")
        else:
            kind, micros, body = record
            if not isinstance(body, dict):
                raise ValueError("payload is not [kind, time, body]")
            if kind not in KINDS_BY_VALUE:
                raise ValueError(f"unknown event kind {str(kind)[:40]!r} (written by a newer runrelay?)")
            _check_depth(body)
        if not isinstance(micros, int):
            raise ValueError("payload is not [kind, time, body]")
        return record
    except Exception as error:  # noqa: BLE001 - any decode failure means bad bytes
        raise JournalCorrupt(run, segment, offset, f"undecodable payload: {error}") from None


def _event(run: str, seq: int, record: list) -> Event:
    """The Event of a record ``_decoded`` checked."""
    if len(record) == _COLUMNS:
        _kind, micros, name, step, value, stamp = record
        timestamp = None if stamp is None else naive_from_micros(stamp)
        return Event(run, seq, Kind.METRICS, utc_from_micros(micros),
                     {"name": name, "step": step, "value": value, "timestamp": timestamp})
    kind, micros, body = record
    return Event(run, seq, KINDS_BY_VALUE[kind], utc_from_micros(micros), body)


def _point_of(event: Event) -> tuple | None:
    """The point of a well-formed metric event, else None."""
    if event.kind is Kind.METRICS:
        try:
            return metric_point(event)
        except MalformedEvent:
            pass
    return None


def _check_depth(body: dict) -> None:
    """ValueError when ``body`` nests lists and dicts more than MAX_DEPTH deep (no recursion)."""
    stack: list[tuple[object, int]] = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"nested more than {MAX_DEPTH} deep")
        if isinstance(value, dict):
            stack.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)


def _digests(event: Event) -> set[str]:
    """The blobs an event names (artifact, resource, the run's sources); malformed entries
    are the fold's to refuse."""
    entries = [event.body] if event.kind in (Kind.ARTIFACT, Kind.RESOURCE) else []
    if event.kind in (Kind.STARTED, Kind.QUEUED) and isinstance(event.body.get("sources"), list):
        entries = event.body["sources"]
    return {entry["digest"] for entry in entries if isinstance(entry, dict) and is_digest(entry.get("digest"))}


# errno values that reading a blob again will not change: permanent for the event naming it
_PERMANENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.ENXIO,
                               errno.ENODEV, errno.ENAMETOOLONG})

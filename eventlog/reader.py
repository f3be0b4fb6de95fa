"""Reading a journal: list runs, read or follow a run from any position, verify it.

A torn tail (the writer died mid-append) simply ends a run's events. Corruption
(a bad checksum before the end) raises JournalCorrupt after every good event
before it has been yielded; damaged bytes are never returned.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import mmap
import os
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

from runrelay.eventlog import codec
from runrelay.eventlog.blobs import blob_path
from runrelay.eventlog.errors import JournalCorrupt, UnknownRun
from runrelay.eventlog.events import KINDS_BY_VALUE, Event, Kind, Points, check_run_uid, is_run_uid, utc_from_micros
from runrelay.eventlog.fold import MalformedEvent, metric_point
from runrelay.eventlog.format import Damage, SegmentScan, scan_segment, segment_first_seq, segment_name

FOLLOW_POLL_SECONDS = 0.2
POINTS_CHUNK = 50_000  # metric points per chunk of ``Journal.points``
_HASH_CHUNK = 1024 * 1024


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

    @property
    def ok(self) -> bool:
        return self.corrupt is None


@dataclass
class RecordBatch:
    """Up to a batch of a run's records from a position: the metric points column by column,
    every other event (and any metric event that is malformed) as an ``Event``."""

    events: list[Event]
    points: Points
    end: Position  # where the next read resumes
    records: int = 0
    corrupt: JournalCorrupt | None = None  # damage that ended the batch, after its good records
    last_time: dt.datetime | None = None  # when the last record read was appended


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
        """Every run in the journal, oldest first (run uids sort by creation time)."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(name for name in names if is_run_uid(name) and (self.root / name).is_dir())

    def blob(self, run: str, digest: str) -> Path:
        return blob_path(self.run_dir(run), digest)

    def open_blob(self, run: str, digest: str) -> BinaryIO:
        """The blob's bytes, checked against their digest and rewound (``sinks.base.RunSource``).

        Only a regular file inside the run's blob store is opened, never through a symlink.
        """
        fd = os.open(self.blob(run, digest), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        file = os.fdopen(fd, "rb")
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError(f"blob {digest} of run {run} is not a regular file")
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
                   until_us: int | None = None) -> RecordBatch:
        """Up to ``max_records`` records from ``start``; with ``until_us``, only records
        appended at or before that time (µs since the epoch). Damage ends the batch after
        its good records (``corrupt``); a torn tail simply ends it."""
        events: list[Event] = []
        points = Points()
        end = start if isinstance(start, Position) else Position(seq=start)
        records, last_time = 0, None
        try:
            for seq, payload, segment, offset, position in self._records(run, start, _Outcome()):
                event = _decode_event(run, seq, payload, segment, offset)
                if until_us is not None and event.time > utc_from_micros(until_us):
                    break
                if event.kind is Kind.METRICS:
                    try:
                        points.add(*metric_point(event))
                    except MalformedEvent:
                        events.append(event)
                else:
                    events.append(event)
                end, last_time = position, event.time
                records += 1
                if records >= max_records:
                    break
        except JournalCorrupt as corrupt:
            return RecordBatch(events, points, end, records, corrupt, last_time)
        return RecordBatch(events, points, end, records, None, last_time)

    def bytes_after(self, run: str, position: Position) -> int:
        """About how many journal bytes of ``run`` follow ``position`` (file sizes only, for
        progress bars); 0 for a run that is gone."""
        total = 0
        for first in self._segments_or_none(run):
            if first < position.segment:
                continue
            try:
                size = os.stat(self.run_dir(run) / segment_name(first)).st_size
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
            return self._segments(run)
        except UnknownRun:
            return []

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

    def verify(self, run: str) -> RunCheck:
        """Check every record's checksums; never raises for damage, reports it."""
        check = RunCheck(run)
        outcome = _Outcome()
        try:
            for event, position in self._read(run, 0, outcome):
                check.records += 1
                check.last_seq = event.seq
                check.end = position
        except JournalCorrupt as corrupt:
            check.corrupt = corrupt
        if outcome.torn:
            segment, damage = outcome.torn
            check.torn = f"{segment} byte {damage.offset}: {damage.reason}"
        return check

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

    def _segments(self, run: str) -> list[int]:
        run_dir = self.run_dir(run)
        try:
            names = os.listdir(run_dir)
        except FileNotFoundError:
            raise UnknownRun(f"no run {run} in journal {self.root}") from None
        return sorted(seq for seq in map(segment_first_seq, names) if seq is not None)

    def count(self, run: str, start: Position | int = 0) -> tuple[int, JournalCorrupt | None]:
        """How many good records follow ``start``, and the corruption that ends them if any.

        Checksums are checked, payloads not decoded: cheap enough to size a backlog.
        """
        count = 0
        try:
            for count, _ in enumerate(self._records(run, start, _Outcome()), start=1):
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
        """(seq, payload, segment name, record offset, position after) of each good record."""
        segments = self._segments(run)
        if not segments:
            return
        if isinstance(start, int):
            start = Position(seq=start)
        if start.offset == 0 or start.segment not in segments:  # only a seq to go by
            start = Position(seq=start.seq, segment=_segment_holding(segments, start.seq), offset=0)
        run_dir = self.run_dir(run)
        first_index = segments.index(start.segment)
        expected = start.seq if start.offset else None
        for index in range(first_index, len(segments)):
            first = segments[index]
            name = segment_name(first)
            if index > first_index and expected is not None and first != expected:
                raise JournalCorrupt(run, name, 0, f"segment starts at seq {first}, expected {expected}")
            offset = start.offset if index == first_index else 0
            last = index == len(segments) - 1
            scan = SegmentScan()
            with _mapped(run_dir / name) as data:
                for seq, payload, end in scan_segment(data, run, first, offset, last, scan):
                    expected = seq + 1
                    if seq < start.seq:
                        continue
                    yield seq, payload, name, end - len(payload), Position(seq + 1, first, end)
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
    """Map a segment read-only; an empty file maps to b''."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self._file = open(self.path, "rb")
        size = os.fstat(self._file.fileno()).st_size
        self._map = mmap.mmap(self._file.fileno(), size, access=mmap.ACCESS_READ) if size else None
        return self._map if self._map is not None else b""

    def __exit__(self, *exc):
        if self._map is not None:
            self._map.close()
        self._file.close()


def _decode_event(run: str, seq: int, payload: bytes, segment: str, offset: int) -> Event:
    """Turn a checksummed payload into an Event; a malformed one is corruption, not a crash."""
    try:
        record = codec.decode(payload)
        if len(record) == 6 and record[0] == "metrics":  # a metric point in columns (version 2)
            kind, micros, name, step, value, stamp = record
            if not (type(name) is str and type(step) is int and type(value) in (int, float)
                    and (stamp is None or type(stamp) is int)):
                raise ValueError("metric columns are not [kind, time, name, step, value, timestamp]")
            timestamp = None if stamp is None else codec.naive_from_micros(stamp)
            body = {"name": name, "step": step, "value": value, "timestamp": timestamp}
        else:
            kind, micros, body = record
        if not isinstance(micros, int) or not isinstance(body, dict):
            raise ValueError("payload is not [kind, time, body]")
        return Event(run, seq, KINDS_BY_VALUE[kind], utc_from_micros(micros), body)
    except Exception as error:  # noqa: BLE001 - any decode failure means bad bytes
        raise JournalCorrupt(run, segment, offset, f"undecodable payload: {error}") from None

"""The journal's on-disk record format (see docs/journal-format.md, which is the contract).

A run directory holds segment files named by the seq of their first record.
Each segment starts with a header and then holds records back to back:

    segment header (40 bytes): magic "RRJOURNL" | version u16 | reserved u16 |
                               run uid (16 bytes) | first seq u64 | crc32 u32
    record header  (20 bytes): payload length u32 | seq u64 | payload crc32 u32 |
                               header crc32 u32 (over the 16 bytes before it)
    payload: MessagePack [kind, time in µs since the epoch, body], or (version 2) a
             metric point in columns: ["metrics", time, name, step, value, timestamp µs]

All integers are big-endian.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass
from typing import Iterator

MAGIC = b"RRJOURNL"
VERSION = 2  # what this runrelay writes
READABLE_VERSIONS = (1, 2)
SEGMENT_HEADER = struct.Struct(">8sHH16sQ")
SEGMENT_HEADER_SIZE = SEGMENT_HEADER.size + 4
RECORD_HEADER = struct.Struct(">IQI")
RECORD_HEADER_SIZE = RECORD_HEADER.size + 4
MAX_PAYLOAD = 64 * 1024 * 1024
SEGMENT_SUFFIX = ".seg"
_CRC = struct.Struct(">I")
# The resume hint in writer.lock: newest segment, where its last durable record starts, that record's seq.
RESUME_HINT = struct.Struct(">QQQ")
RESUME_HINT_SIZE = RESUME_HINT.size + 4


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}{SEGMENT_SUFFIX}"


def segment_first_seq(name: str) -> int | None:
    """The first seq encoded in a segment file name, or None if it is not one."""
    stem = name[: -len(SEGMENT_SUFFIX)]
    if name.endswith(SEGMENT_SUFFIX) and len(stem) == 20 and stem.isdigit():
        return int(stem)
    return None


def encode_segment_header(run: str, first_seq: int) -> bytes:
    head = SEGMENT_HEADER.pack(MAGIC, VERSION, 0, uuid.UUID(run).bytes, first_seq)
    return head + _CRC.pack(zlib.crc32(head))


def segment_version(data: bytes) -> int:
    """The format version a segment's header names (its header already checked)."""
    return SEGMENT_HEADER.unpack_from(data)[1]


def encode_resume_hint(segment: int, offset: int, seq: int) -> bytes:
    hint = RESUME_HINT.pack(segment, offset, seq)
    return hint + _CRC.pack(zlib.crc32(hint))


def decode_resume_hint(data: bytes) -> tuple[int, int, int] | None:
    """(segment, offset, seq) of a resume hint, or None when it is missing or damaged."""
    if len(data) < RESUME_HINT_SIZE:
        return None
    (crc,) = _CRC.unpack_from(data, RESUME_HINT.size)
    if zlib.crc32(data[: RESUME_HINT.size]) != crc:
        return None
    return RESUME_HINT.unpack_from(data)


def encode_record(seq: int, payload: bytes) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"event payload of {len(payload)} bytes exceeds the {MAX_PAYLOAD}-byte limit")
    head = RECORD_HEADER.pack(len(payload), seq, zlib.crc32(payload))
    return head + _CRC.pack(zlib.crc32(head)) + payload


@dataclass(frozen=True)
class Damage:
    """Where and why a segment stops holding good records."""

    offset: int
    reason: str
    torn: bool  # True: the normal end of a crashed writer; False: corruption


@dataclass
class SegmentScan:
    """Result of scanning one segment; ``records`` yields (seq, payload, end offset)."""

    damage: Damage | None = None
    end: int = SEGMENT_HEADER_SIZE  # offset just after the last good record


def check_segment_header(data: bytes, run: str, first_seq: int) -> str | None:
    """Return why the header is bad, or None when it is good."""
    head = data[: SEGMENT_HEADER.size]
    (crc,) = _CRC.unpack_from(data, SEGMENT_HEADER.size)
    if zlib.crc32(head) != crc:
        return "segment header checksum mismatch"
    magic, version, _reserved, uid, header_first = SEGMENT_HEADER.unpack(head)
    if magic != MAGIC:
        return "not a runrelay journal segment (bad magic)"
    if version not in READABLE_VERSIONS:
        readable = ", ".join(map(str, READABLE_VERSIONS))
        return f"unsupported journal format version {version} (this runrelay reads versions {readable})"
    if uid != uuid.UUID(run).bytes:
        return "segment belongs to another run"
    if header_first != first_seq:
        return f"segment header says first seq {header_first}, file name says {first_seq}"
    return None


def scan_segment(
    data: bytes, run: str, first_seq: int, start: int, last: bool, scan: SegmentScan
) -> Iterator[tuple[int, bytes, int]]:
    """Yield the good records of a segment from byte offset ``start``.

    ``last`` says whether this is the run's newest segment: only there can a
    damaged end be a torn tail. On damage, sets ``scan.damage`` and stops.
    """
    size = len(data)
    if start == 0 or start < SEGMENT_HEADER_SIZE:
        if size < SEGMENT_HEADER_SIZE:
            scan.damage = _tail_damage(data, 0, "incomplete segment header", last)
            scan.end = 0
            return
        problem = check_segment_header(data, run, first_seq)
        if problem:
            scan.damage = Damage(0, problem, torn=False)
            scan.end = 0
            return
        start = SEGMENT_HEADER_SIZE
    offset = start
    scan.end = offset
    if offset > size:
        scan.damage = Damage(offset, f"position {offset} is past the end of the segment", torn=False)
        return
    expected_seq: int | None = None if start > SEGMENT_HEADER_SIZE else first_seq
    while offset < size:
        if size - offset < RECORD_HEADER_SIZE:
            scan.damage = _tail_damage(data, offset, "incomplete record header", last)
            return
        length, seq, payload_crc = RECORD_HEADER.unpack_from(data, offset)
        (header_crc,) = _CRC.unpack_from(data, offset + RECORD_HEADER.size)
        if zlib.crc32(data[offset : offset + RECORD_HEADER.size]) != header_crc:
            scan.damage = _tail_damage(data, offset, "record header checksum mismatch", last, zeros_only=True)
            return
        if length > MAX_PAYLOAD:
            scan.damage = Damage(offset, f"record length {length} exceeds the limit", torn=False)
            return
        end = offset + RECORD_HEADER_SIZE + length
        if end > size:
            scan.damage = _tail_damage(data, offset, "incomplete record payload", last)
            return
        if expected_seq is not None and seq != expected_seq:
            scan.damage = Damage(offset, f"expected seq {expected_seq}, found {seq}", torn=False)
            return
        payload = data[offset + RECORD_HEADER_SIZE : end]
        if zlib.crc32(payload) != payload_crc:
            # Only the very last record of the run can be a write that power loss cut short.
            scan.damage = Damage(offset, "record payload checksum mismatch", torn=last and end == size)
            return
        yield seq, payload, end
        expected_seq = seq + 1
        offset = end
        scan.end = end


def _tail_damage(data: bytes, offset: int, reason: str, last: bool, zeros_only: bool = False) -> Damage:
    """Damage that reaches the end of the file: torn if this is the newest segment.

    A crashed writer leaves a prefix of its last write; a power loss can leave
    zeros where unsynced bytes were. A checksum failure with real bytes after it is
    corruption even at the end.
    """
    if zeros_only:
        torn = last and not any(data[offset:])
    else:
        torn = last
    return Damage(offset, reason, torn=torn)

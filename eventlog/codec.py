"""Payload encoding: MessagePack plus extensions for datetimes and big ints.

MessagePack keeps what JSON loses (NaN and ±inf, int vs float, bytes) and decodes
data only: no object is ever constructed from journal bytes except the types
below, so nothing in a journal can run code.
"""

from __future__ import annotations

import datetime as dt
import reprlib
import struct
import threading
from typing import Any

import msgpack

_DATETIME = 1  # extension code: int64 µs since the epoch, int32 UTC offset in s
_NAIVE = 0x7FFFFFFF  # offset marker for a naive datetime (Sacred's utcnow())
_DATETIME_LAYOUT = struct.Struct(">qi")
_EPOCH = dt.datetime(1970, 1, 1)
_MICROSECOND = dt.timedelta(microseconds=1)
_BIG_INT = 2  # extension code: an int outside MessagePack's 64 bits, big-endian two's complement
# At most 8191 bits: far under Python's 4300-digit limit on int <-> str, which sinks meet in JSON.
MAX_INT_BYTES = 1024

UNJOURNALED = "runrelay/unjournaled"  # the key of the marker that stands for a value not journaled
MAX_DEPTH = 250  # under MessagePack's nesting limit (511) and Python's recursion limit
CUT_NOTE = "[runrelay: {cut} characters cut here, too large to journal]"
_KEPT_AT_LEAST = 64  # bytes a part too large to journal is cut to at the least
_PLAIN = frozenset({str, int, float, bool, type(None), bytes, dt.datetime})  # never holds a part
_FITTED_PARTS = 10_000  # a larger dict or list too large to journal becomes a marker
_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = _repr.maxlong = 200


class EncodeError(TypeError):
    """A value that cannot be journaled."""


def _encode_extra(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        offset = value.utcoffset()
        if offset is None:  # the hot path: Sacred's naive utcnow() timestamps
            return msgpack.ExtType(_DATETIME, _DATETIME_LAYOUT.pack((value - _EPOCH) // _MICROSECOND, _NAIVE))
        micros = (value.replace(tzinfo=None) - offset - _EPOCH) // _MICROSECOND
        return msgpack.ExtType(_DATETIME, _DATETIME_LAYOUT.pack(micros, int(offset.total_seconds())))
    if isinstance(value, int):  # MessagePack calls this only for ints beyond its 64 bits
        bits = value.bit_length()
        if bits // 8 + 1 > MAX_INT_BYTES:
            raise EncodeError(f"an int of {bits} bits is too big to journal (at most {8 * MAX_INT_BYTES - 1})")
        return msgpack.ExtType(_BIG_INT, value.to_bytes(bits // 8 + 1, "big", signed=True))
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return value.item()  # numpy scalars become their Python equivalent
    raise EncodeError(
        f"cannot journal a value of type {type(value).__name__}: journal str, int, float, bool, None, "
        "bytes, datetime, or lists and dicts of them (e.g. str(value) or array.tolist())"
    )


def _decode_extra(code: int, data: bytes) -> Any:
    if code == _BIG_INT and 0 < len(data) <= MAX_INT_BYTES:
        return int.from_bytes(data, "big", signed=True)
    if code != _DATETIME or len(data) != _DATETIME_LAYOUT.size:
        raise ValueError(f"unknown extension type {code} in journal payload")
    micros, offset_seconds = _DATETIME_LAYOUT.unpack(data)
    naive = _EPOCH + _MICROSECOND * micros
    if offset_seconds == _NAIVE:
        return naive
    offset = dt.timedelta(seconds=offset_seconds)
    return (naive + offset).replace(tzinfo=dt.timezone(offset))


_packer = msgpack.Packer(default=_encode_extra, use_bin_type=True, datetime=False)
_packer_lock = threading.Lock()


def encode(value: Any) -> bytes:
    try:
        with _packer_lock:  # one reusable Packer is faster than packb; it is not thread-safe
            return _packer.pack(value)
    except (TypeError, ValueError, OverflowError) as error:
        if isinstance(error, EncodeError):
            raise
        raise EncodeError(f"cannot journal value: {error}") from error


def metric_packer() -> msgpack.Packer:
    """A Packer for metric column payloads (docs/journal-format.md): plain values only, no
    callback; one per writer, used under its lock (a Packer is not thread-safe)."""
    return msgpack.Packer(use_bin_type=True, datetime=False)


def naive_from_micros(micros: int) -> dt.datetime:
    """The naive UTC datetime of a metric column timestamp."""
    return _EPOCH + _MICROSECOND * micros


def decode(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, ext_hook=_decode_extra, raw=False, strict_map_key=False)
    except TypeError:  # a tuple key comes back as an (unhashable) list: the rare slow path
        return msgpack.unpackb(data, ext_hook=_decode_extra, raw=False, strict_map_key=False,
                               object_pairs_hook=_dict_with_tuple_keys)


def _dict_with_tuple_keys(pairs: list) -> dict:
    return {_frozen(key): value for key, value in pairs}


def _frozen(key: Any) -> Any:
    return tuple(map(_frozen, key)) if isinstance(key, list) else key


def marker(value: Any) -> dict:
    """What stands in the journal for a value that cannot be journaled: its type, and the
    start of its repr."""
    return {UNJOURNALED: type(value).__name__, "repr": _text(value)}


def _text(value: Any) -> str:
    try:
        return _repr.repr(value)
    except ValueError:  # an int beyond Python's own limit on converting ints to text
        return f"<an int of {value.bit_length()} bits>" if isinstance(value, int) else "<no repr>"


def too_deep(value: Any) -> bool:
    """Whether ``value`` holds a list or dict more than ``MAX_DEPTH`` levels down
    (``journalable`` replaces those by markers; a reader calls a record nested much deeper
    corruption). Each level takes a byte of payload at least: only a payload longer than
    ``MAX_DEPTH`` bytes needs the look. Level by level, and a container of plain values
    only is passed over in C: a long list of numbers costs little."""
    level = [value] if isinstance(value, (dict, list, tuple)) else []
    for _ in range(MAX_DEPTH + 1):
        below = []
        for container in level:
            parts = container.values() if isinstance(container, dict) else container
            if not _PLAIN.issuperset(map(type, parts)):
                below.extend(part for part in parts if isinstance(part, (dict, list, tuple)))
        if not below:
            return False
        level = below
    return True


def journalable(value: Any) -> tuple[Any, list[str]]:
    """``value`` with each part ``encode`` refuses replaced: a str by its text with what
    UTF-8 cannot hold escaped, a dict key by its repr, anything else by a ``marker``; and
    where each replacement is, and why (for a warning). Slow: it is for a value that
    ``encode`` has refused."""
    problems: list[str] = []
    return _journalable(value, "", 0, problems), problems


def _journalable(value: Any, path: str, depth: int, problems: list[str]) -> Any:
    if depth >= MAX_DEPTH and isinstance(value, (dict, list, tuple)):
        problems.append(f"{_short(path)}: nested more than {MAX_DEPTH} deep")
        return marker(value)
    if isinstance(value, dict):
        kept = {}
        for key, item in value.items():
            error = _refused(key)
            if error is not None:
                problems.append(f"{_short(path) or 'value'} key {_text(key)}: {error}")
                key = _escaped(key) if isinstance(key, str) else _text(key)  # a key stays hashable
            kept[key] = _journalable(item, f"{path}.{key}" if path else str(key), depth + 1, problems)
        return kept
    if isinstance(value, (list, tuple)):
        return [_journalable(item, f"{path}[{index}]", depth + 1, problems) for index, item in enumerate(value)]
    error = _refused(value)
    if error is None:
        return value
    problems.append(f"{_short(path) or 'value'}: {error}")
    return _escaped(value) if isinstance(value, str) else marker(value)


def fitted(value: Any, max_bytes: int) -> tuple[Any, list[str]]:
    """``value`` (one ``encode`` takes) made to encode within about ``max_bytes``: where it
    is large, a str is cut in the middle around a note saying how much was cut (a str stays a
    str, so a traceback or a status keeps its type), a dict or list has its largest parts made
    smaller, and anything else (bytes, a container of very many parts) becomes a ``marker``;
    and what was changed, for a warning. Only the large parts are looked into, each encoded
    once per level: it is for a value too large for one journal record."""
    problems: list[str] = []
    return _fitted(value, "", max_bytes, len(encode(value)), problems), problems


def _fitted(value: Any, path: str, budget: int, size: int, problems: list[str]) -> Any:
    """``value``, of encoded ``size``, within about ``budget`` bytes."""
    if size <= budget:
        return value
    where = _short(path) or "value"
    if isinstance(value, str) and budget > _KEPT_AT_LEAST:
        keep = int(len(value) * budget / size) - len(CUT_NOTE) - 24  # at its bytes per character
        half = max(keep // 2, 1)
        problems.append(f"{where}: {len(value) - 2 * half} of its {len(value)} characters cut (too large to journal)")
        return value[:half] + CUT_NOTE.format(cut=len(value) - 2 * half) + value[-half:]
    if isinstance(value, (dict, list)) and len(value) <= _FITTED_PARTS:
        parts = list(value.items()) if isinstance(value, dict) else list(enumerate(value))
        sizes = [len(encode(item)) for _, item in parts]
        cap = _fair_share(sizes, budget - (size - sum(sizes)))  # the container's own bytes stay
        fitted = [_fitted(item, f"{path}.{key}" if path else str(key), cap, part_size, problems)
                  for (key, item), part_size in zip(parts, sizes)]
        return dict(zip(value, fitted)) if isinstance(value, dict) else fitted
    problems.append(f"{where}: a {type(value).__name__} of {size} bytes, too large to journal")
    return marker(value)


def _fair_share(sizes: list[int], room: int) -> int:
    """The most each part may keep so that together they fit ``room``: the small ones whole,
    the large ones alike."""
    left = len(sizes)
    for part in sorted(sizes):
        share = room // left
        if part > share:
            return max(share, _KEPT_AT_LEAST)
        room, left = room - part, left - 1
    return max(sizes, default=0)


def _short(path: str) -> str:
    """A path to a value, for a warning: its ends when it is long (a deep one is very long)."""
    return path if len(path) <= 120 else f"{path[:60]}…{path[-60:]}"


def _escaped(text: str) -> str:
    """``text`` with what UTF-8 cannot hold (lone surrogates, e.g. from a file name that is
    not UTF-8) as backslash escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _refused(value: Any) -> str | None:
    """Why ``encode`` refuses ``value`` (a dict key or anything but a dict or list), or None."""
    try:
        encode(value)
    except EncodeError as error:
        return str(error)
    return None

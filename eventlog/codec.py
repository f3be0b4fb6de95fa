"""Payload encoding: MessagePack plus one extension for datetimes.

MessagePack keeps what JSON loses (NaN and ±inf, int vs float, bytes) and decodes
data only: no object is ever constructed from journal bytes except the types
below, so nothing in a journal can run code.
"""

from __future__ import annotations

import datetime as dt
import struct
import threading
from typing import Any

import msgpack

_DATETIME = 1  # extension code: int64 µs since the epoch, int32 UTC offset in s
_NAIVE = 0x7FFFFFFF  # offset marker for a naive datetime (Sacred's utcnow())
_DATETIME_LAYOUT = struct.Struct(">qi")
_EPOCH = dt.datetime(1970, 1, 1)
_MICROSECOND = dt.timedelta(microseconds=1)


class EncodeError(TypeError):
    """A value that cannot be journaled."""


def _encode_extra(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        offset = value.utcoffset()
        if offset is None:  # the hot path: Sacred's naive utcnow() timestamps
            return msgpack.ExtType(_DATETIME, _DATETIME_LAYOUT.pack((value - _EPOCH) // _MICROSECOND, _NAIVE))
        micros = (value.replace(tzinfo=None) - offset - _EPOCH) // _MICROSECOND
        return msgpack.ExtType(_DATETIME, _DATETIME_LAYOUT.pack(micros, int(offset.total_seconds())))
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return value.item()  # numpy scalars become their Python equivalent
    raise EncodeError(
        f"cannot journal a value of type {type(value).__name__}: use str, int, float, "
        "bool, None, bytes, datetime, lists and dicts"
    )


def _decode_extra(code: int, data: bytes) -> Any:
    if code != _DATETIME or len(data) != _DATETIME_LAYOUT.size:
        raise ValueError(f"unknown extension type {code} in journal payload")
    micros, marker = _DATETIME_LAYOUT.unpack(data)
    naive = _EPOCH + _MICROSECOND * micros
    if marker == _NAIVE:
        return naive
    offset = dt.timedelta(seconds=marker)
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


def decode(data: bytes) -> Any:
    return msgpack.unpackb(data, ext_hook=_decode_extra, raw=False, strict_map_key=False)

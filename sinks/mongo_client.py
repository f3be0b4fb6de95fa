"""Connecting to MongoDB for the Mongo sink: URLs, a client whose waits are bounded, and
what a driver error means (transient, permanent, unusable).

pymongo is imported only when a client is made, so a missing driver matters only to
those who configure a Mongo sink.
"""

from __future__ import annotations

import importlib.util
import re
from typing import Any
from urllib.parse import unquote

from runrelay.sinks.base import (
    PermanentSinkError, SinkConfigError, TransientSinkError, UnusableSinkError, redact,
)

SCHEMES = ("mongodb", "mongodb+srv")
DEFAULT_DATABASE = "sacred"  # Sacred's MongoObserver's default db_name
DEFAULT_PORT = 27017
ERROR_TEXT_CHARS = 300
_BAD_DATABASE_CHARS = re.compile(r'[/\\. "$\x00*<>:|?]')
_BAD_PREFIX_CHARS = re.compile(r"[$\x00]")

# Server error codes (src/mongo/base/error_codes.yml)
_UNUSABLE_CODES = {
    13,     # Unauthorized
    18,     # AuthenticationFailed
    73,     # InvalidNamespace
    85, 86,  # IndexOptionsConflict, IndexKeySpecsConflict: an index of ours exists otherwise
}
_PERMANENT_WRITE_CODES = {
    2,      # BadValue
    14,     # TypeMismatch
    52,     # DollarPrefixedFieldName
    55,     # InvalidDBRef
    56,     # EmptyFieldName
    57,     # DottedFieldName
    121,    # DocumentValidationFailure
    10334,  # BSONObjectTooLarge
    17419, 17420,  # resulting document too large
}


def parse(url: str) -> dict[str, Any]:
    """The parts of a MongoDB URL that name a database, without I/O: scheme, user, hosts
    (default port added), database (None if the path names none). SinkConfigError, without
    the URL (it may hold a password), if it cannot work."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        raise SinkConfigError("not a MongoDB URL (expected mongodb://host:27017/db or mongodb+srv://host/db)")
    scheme = scheme.lower()
    rest, _, _query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    user = unquote(userinfo.partition(":")[0]) if at else None
    if not hosts:
        raise SinkConfigError("the MongoDB URL names no host")
    spelled = []
    for host in hosts.split(","):
        if not host:
            raise SinkConfigError("the MongoDB URL has an empty host in its host list")
        name, colon, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
        if not colon:
            name, port = host, ""
        if port and not port.isdigit():
            raise SinkConfigError(f"the port of MongoDB host {name!r} is not a number")
        if scheme == "mongodb+srv":
            if port or len(hosts.split(",")) > 1:
                raise SinkConfigError("a mongodb+srv URL names exactly one host, without a port")
            spelled.append(name.lower())
        else:
            spelled.append(f"{name.lower()}:{int(port) if port else DEFAULT_PORT}")
    database = unquote(path) or None
    if database is not None:
        check_database(database)
    return {"scheme": scheme, "user": user, "hosts": spelled, "database": database}


def check_database(name: Any) -> str:
    if not isinstance(name, str) or not name or len(name.encode()) >= 64 or _BAD_DATABASE_CHARS.search(name):
        raise SinkConfigError(f"{name!r} is not a MongoDB database name (1-63 bytes, none of / \\ . \" $ * < > : | ? or space)")
    return name


def check_prefix(prefix: Any) -> str:
    if not isinstance(prefix, str) or _BAD_PREFIX_CHARS.search(prefix) or prefix.startswith("system."):
        raise SinkConfigError(f"{prefix!r} is not a collection name prefix (a string without $ or NUL, not system.)")
    return prefix


def check_driver() -> None:
    if importlib.util.find_spec("pymongo") is None:
        raise SinkConfigError("the driver pymongo is not installed: pip install 'runrelay[mongo]'")


def identity(url: str) -> str:
    """The database ``url`` names, in one spelling (see ``Sink.identity``)."""
    parts = parse(url)
    check_driver()
    user = f"{parts['user']}@" if parts["user"] else ""
    return f"{parts['scheme']}://{user}{','.join(parts['hosts'])}/{parts['database'] or DEFAULT_DATABASE}"


def client(url: str, timeout_seconds: float):
    """A MongoClient whose every operation, retries included, ends within ``timeout_seconds``
    (pymongo's client-side operation timeout), so the daemon's retry loop owns waiting."""
    import pymongo

    millis = int(timeout_seconds * 1000)
    return pymongo.MongoClient(
        url, timeoutMS=millis, serverSelectionTimeoutMS=millis, connectTimeoutMS=millis,
        socketTimeoutMS=millis, tz_aware=False, connect=False, appname="runrelay",
    )


def summary(error: Exception) -> str:
    """One line about ``error``, the password of any URL in it hidden."""
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {redact(lines[0])[:ERROR_TEXT_CHARS]}"


def classified(error: Exception, message: str, seq: int | None = None) -> Exception:
    """A pymongo or bson ``error`` as the exception the daemon acts on, saying ``message``."""
    import bson.errors
    from pymongo import errors

    if isinstance(error, (errors.DocumentTooLarge, bson.errors.InvalidDocument, bson.errors.InvalidStringData,
                          OverflowError)):  # OverflowError: bson's "only up to 8-byte ints"
        return PermanentSinkError(message, seq)
    if isinstance(error, (errors.ConfigurationError, errors.InvalidName, errors.InvalidURI)):
        return UnusableSinkError(message)
    if isinstance(error, (errors.ConnectionFailure, errors.ExecutionTimeout, errors.WTimeoutError)):
        return TransientSinkError(message)
    if getattr(error, "timeout", False):  # PyMongoError.timeout: the operation timed out
        return TransientSinkError(message)
    code = _code(error)
    if code in _UNUSABLE_CODES:
        return UnusableSinkError(message)
    if isinstance(error, errors.BulkWriteError):
        codes = {entry.get("code") for entry in error.details.get("writeErrors", [])}
        if codes & _PERMANENT_WRITE_CODES:
            return PermanentSinkError(message, seq)
        return TransientSinkError(message)
    if isinstance(error, errors.WriteError) and code in _PERMANENT_WRITE_CODES:
        return PermanentSinkError(message, seq)
    if isinstance(error, errors.OperationFailure) and code in _PERMANENT_WRITE_CODES:
        return PermanentSinkError(message, seq)
    return TransientSinkError(message)


def _code(error: Exception) -> int | None:
    code = getattr(error, "code", None)
    return code if isinstance(code, int) else None

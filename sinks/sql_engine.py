"""Connecting to SQL databases for the SQL sink: URLs and their drivers, engines with
bounded waits, and what a driver error means (transient, permanent, unusable or a bug)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import socket
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Iterator

import sqlalchemy as sa

from runrelay.eventlog.fsutil import FILE_MODE, make_private_dir
from runrelay.sinks.base import PermanentSinkError, SinkConfigError, TransientSinkError, UnusableSinkError
from runrelay.sinks.sql_tables import MYSQL_DIALECTS

MYSQL_STRICT_MODE = "SET SESSION sql_mode = 'TRADITIONAL'"  # never truncate silently
ERROR_TEXT_CHARS = 300

# URL scheme -> (backend, the driver runrelay uses, the module it needs, the extra that installs it)
_BACKENDS = {
    "sqlite": ("sqlite", "sqlite", None, None),
    "postgresql": ("postgresql", "postgresql+psycopg", "psycopg", "postgres"),
    "postgresql+psycopg": ("postgresql", "postgresql+psycopg", "psycopg", "postgres"),
    "mysql": ("mysql", "mysql+pymysql", "pymysql", "mysql"),
    "mysql+pymysql": ("mysql", "mysql+pymysql", "pymysql", "mysql"),
    "mariadb+pymysql": ("mysql", "mariadb+pymysql", "pymysql", "mysql"),
}
_MYSQL_PERMANENT = {1118, 1153}  # row size too large, packet too large: PyMySQL calls them operational
# unknown database, access denied (user, database), command denied, no privilege
_MYSQL_UNUSABLE = {1049, 1045, 1044, 1142, 1227}
# PostgreSQL reports these at connect time without an SQLSTATE (libpq's text, English messages)
_POSTGRES_UNUSABLE = re.compile(
    r"FATAL: +(database \S+ does not exist|role \S+ does not exist|password authentication failed"
    r"|no pg_hba\.conf entry|permission denied for database)")
_POSTGRES_UNUSABLE_STATES = {"3D000", "28000", "28P01", "42501"}


def scheme(url: str) -> str:
    return url.partition("://")[0].lower()


def engine_url(url: str) -> sa.engine.URL:
    """The URL SQLAlchemy connects to: runrelay's driver for the scheme, an absolute SQLite
    path. SinkConfigError (without the URL: it may hold a password) if it cannot work."""
    if scheme(url) not in _BACKENDS:
        raise SinkConfigError(f"not an SQL URL; SQL schemes: {', '.join(sorted(_BACKENDS))}")
    _backend, driver, module, extra = _BACKENDS[scheme(url)]
    try:
        parsed = sa.engine.make_url(url)
    except (sa.exc.ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise SinkConfigError("not a database URL (expected e.g. postgresql+psycopg://user@host/db)") from None
    if module and importlib.util.find_spec(module) is None:
        raise SinkConfigError(f"the driver {module} is not installed: pip install 'runrelay[{extra}]'")
    parsed = parsed.set(drivername=driver)
    if driver == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise SinkConfigError("an SQLite sink needs a file: sqlite:///relative/path.db or sqlite:////absolute.db")
        parsed = parsed.set(database=str(Path(parsed.database).expanduser().absolute()))
    elif not parsed.database:
        raise SinkConfigError("the URL names no database (…/DATABASE at its end)")
    return parsed



def identity(url: str) -> str:
    """The database ``url`` names, in one spelling (see ``Sink.identity``)."""
    parsed = engine_url(url)
    if parsed.get_backend_name() == "sqlite":
        return f"sqlite:///{parsed.database}"
    backend = _BACKENDS[scheme(url)][0]
    port = parsed.port or {"postgresql": 5432, "mysql": 3306}[backend]
    user = f"{parsed.username}@" if parsed.username else ""
    return f"{backend}://{user}{parsed.host or 'localhost'}:{port}/{parsed.database or ''}"


def create_engine(url: sa.engine.URL, timeout_seconds: float) -> tuple[sa.Engine, "Deadline | None"]:
    """An engine whose every wait is bounded by ``timeout_seconds``: SQLite's wait for a
    lock, PyMySQL's reads and writes by their own timeouts, PostgreSQL's by a Deadline
    (returned, to bound transactions with)."""
    backend = url.get_backend_name()
    options: dict[str, Any] = {"connect_timeout": max(1, round(timeout_seconds))}
    if backend == "sqlite":
        options = {"timeout": timeout_seconds}  # how long to wait for a lock
        _create_private_file(Path(url.database))
    elif backend in MYSQL_DIALECTS:
        options.update(init_command=MYSQL_STRICT_MODE, read_timeout=timeout_seconds, write_timeout=timeout_seconds)
    # No pre-ping: its reconnect would wait a second timeout inside the first. A connection
    # the server dropped fails once (transient; the pool is then invalidated) and is retried.
    engine = sa.create_engine(url, connect_args=options)
    deadline = None
    if backend == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_connected)
        sa.event.listen(engine, "begin", _sqlite_begin)
    elif backend == "postgresql":
        deadline = Deadline(timeout_seconds)
        sa.event.listen(engine, "connect", lambda dbapi_connection, _record: deadline.watch(dbapi_connection))
    return engine, deadline

def _create_private_file(path: Path) -> None:
    """Create the SQLite file and its directory owner-only, as the journal is (SQLite gives
    its -wal and -shm files the database file's mode). An existing file is never opened:
    closing any descriptor of it would drop every POSIX lock this process's SQLite
    connections hold on it (another engine's, here), and their writes could be lost."""
    make_private_dir(path.parent)
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE))
    except FileExistsError:
        pass


def _sqlite_connected(dbapi_connection, _record) -> None:
    """WAL lets readers in while a batch is written; synchronous=FULL makes a committed
    batch survive power loss (NORMAL could lose it after the daemon saved its cursor)."""
    dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


def _sqlite_begin(conn: sa.Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")  # take the write lock first: SQLite's FOR UPDATE


class Deadline:
    """Bounds each PostgreSQL transaction by the sink's timeout.

    libpq has no read timeout, and a frozen (SIGSTOPped) server's kernel still acknowledges
    every packet, so neither TCP keepalives nor tcp_user_timeout ever fire. When a
    transaction outlives the timeout, the sockets of the sink's connections are shut down:
    the blocked call fails as a lost connection (transient) and the pool reconnects.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._connections: weakref.WeakSet = weakref.WeakSet()
        self._changed = threading.Condition()
        self._expires: float | None = None
        self._stopped = False
        threading.Thread(target=self._guard, name="runrelay-sql-deadline", daemon=True).start()

    def watch(self, dbapi_connection) -> None:
        self._connections.add(dbapi_connection)

    @contextlib.contextmanager
    def bounding(self) -> Iterator[None]:
        with self._changed:
            self._expires = time.monotonic() + self.seconds
            self._changed.notify()
        try:
            yield
        finally:
            with self._changed:
                self._expires = None

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify()

    def _guard(self) -> None:
        with self._changed:
            while not self._stopped:
                if self._expires is None:
                    self._changed.wait()
                elif time.monotonic() < self._expires:
                    self._changed.wait(self._expires - time.monotonic())
                else:
                    self._expires = None
                    for connection in list(self._connections):
                        _shut_down(connection)


def _shut_down(dbapi_connection) -> None:
    """Shut down a psycopg connection's socket, if it still has one."""
    import psycopg  # only PostgreSQL engines have a Deadline

    try:
        fd = dbapi_connection.pgconn.socket
    except psycopg.OperationalError:  # closed already
        return
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as sock:
        sock.shutdown(socket.SHUT_RDWR)


class SqlBug(Exception):
    """A statement the database could not parse: runrelay's bug, never the data's."""


def _bug(error: sa.exc.SQLAlchemyError) -> bool:
    if not isinstance(error, sa.exc.DBAPIError):
        return False
    code = error.orig.args[0] if error.orig.args else None
    return (getattr(error.orig, "sqlstate", None) == "42601" or code == 1064
            or type(error.orig).__module__.startswith("sqlite3") and "syntax error" in str(error.orig))


def _unusable(error: sa.exc.SQLAlchemyError) -> bool:
    """True if the database refuses this sink as configured (retrying soon cannot help)."""
    if not isinstance(error, sa.exc.DBAPIError):
        return False
    code = error.orig.args[0] if error.orig.args else None
    text = str(error.orig)
    return (code in _MYSQL_UNUSABLE
            or getattr(error.orig, "sqlstate", None) in _POSTGRES_UNUSABLE_STATES
            or bool(_POSTGRES_UNUSABLE.search(text))
            or "unable to open database file" in text or "readonly database" in text)


def _permanent(error: sa.exc.SQLAlchemyError) -> bool:
    """True if retrying cannot help: the database can never take this value."""
    if isinstance(error, sa.exc.DBAPIError):
        if error.connection_invalidated:
            return False
        state = getattr(error.orig, "sqlstate", None) or ""
        code = error.orig.args[0] if error.orig.args else None
        # SQLSTATE 22 data exception, 23 integrity constraint, 54 program limit exceeded
        if state[:2] in ("22", "23", "54") or code in _MYSQL_PERMANENT:
            return True
        return isinstance(error, (sa.exc.DataError, sa.exc.IntegrityError))
    return isinstance(error, sa.exc.StatementError)  # a value the driver cannot bind


def summary(error: sa.exc.SQLAlchemyError) -> str:
    """One line about ``error``: the driver's message, never the statement or its parameters."""
    cause = error.orig if isinstance(error, sa.exc.DBAPIError) else error
    lines = str(cause).strip().splitlines() or [""]
    return f"{type(cause).__name__}: {lines[0][:ERROR_TEXT_CHARS]}"


def classified(error: sa.exc.SQLAlchemyError, message: str) -> Exception:
    """``error`` as the exception the daemon acts on, saying ``message``."""
    if _bug(error):
        return SqlBug(message)
    if _unusable(error):
        return UnusableSinkError(message)
    if _permanent(error):
        return PermanentSinkError(message)
    return TransientSinkError(message)

"""The daemon's durable state: per sink, per run cursors and per sink health.

One small SQLite database in the state directory (WAL, ``synchronous=FULL``: a saved
cursor survives power loss). A cursor is a hint, never the truth: the sink's own
``applied(run)`` is. After a crash between a sink's commit and the cursor save the
cursor lags, the daemon re-sends from it and the sink skips what it holds. The cursors of
the runs the daemon delivered together are saved in one transaction (one commit).

So the state is never worth a crash loop. A damaged database (at open or at any later
query) is moved aside (``state.sqlite.damaged-<time>``), logged, and started afresh: the
sinks say what they hold. A state that cannot be written now (disk full, I/O error,
read-only) raises ``StateUnavailable``; the daemon waits for it (``daemon.delivery``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

from runrelay.eventlog.fsutil import (FILE_MODE, NotRegularFile, fsync_dir, is_locked, make_private_dir, open_regular,
                                      try_lock)
from runrelay.eventlog.reader import Position

log = logging.getLogger("runrelay.state")
T = TypeVar("T")

STATE_DB = "state.sqlite"
DAMAGED_SUFFIX = ".damaged-"
# SQLite's primary result codes (error.sqlite_errorcode & 0xff)
_DAMAGED_CODES = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB
_UNAVAILABLE_CODES = frozenset({8, 10, 13, 14, 15})  # READONLY, IOERR, FULL, CANTOPEN, PROTOCOL
_UNAVAILABLE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})
LOCK_FILE = "delivery.lock"
BUSY_TIMEOUT_MS = 10_000
SCHEMA_VERSION = 2  # 1 keyed sinks by URL; its cursors are hints, so they are dropped

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cursors (
    sink TEXT NOT NULL,
    run TEXT NOT NULL,
    seq INTEGER NOT NULL,          -- the next seq to deliver
    segment INTEGER NOT NULL,      -- Position.segment of that seq
    byte INTEGER NOT NULL,         -- Position.offset of that seq
    done INTEGER NOT NULL,         -- 1: the run's ending (completed/failed/interrupted) is delivered
    dead_lettered INTEGER NOT NULL,
    last_error TEXT,               -- the last permanent error of this run
    updated REAL NOT NULL,
    snapshot BLOB,                 -- the run folded through seq - 1 (eventlog.fold.snapshot), or NULL
    PRIMARY KEY (sink, run)
);
CREATE TABLE IF NOT EXISTS health (
    sink TEXT PRIMARY KEY,
    retries INTEGER NOT NULL,      -- transient failures retried, ever
    failing_since REAL,            -- set while the sink is failing
    last_error TEXT,
    updated REAL NOT NULL,
    condition TEXT NOT NULL DEFAULT 'ok',  -- ok | retrying | unusable | crashed
    identity TEXT                  -- what the sink's URL names, without secrets
);
CREATE TABLE IF NOT EXISTS outputs (  -- the snapshot's captured output, in the pieces it grew by
    sink TEXT NOT NULL,
    run TEXT NOT NULL,
    start INTEGER NOT NULL,        -- where the piece starts in the output, in characters
    piece TEXT NOT NULL,
    PRIMARY KEY (sink, run, start)
);
CREATE TABLE IF NOT EXISTS redrive_requests (
    sink TEXT NOT NULL,
    letter INTEGER NOT NULL,       -- a dead letter's id in the sink's queue
    PRIMARY KEY (sink, letter)
);
"""


@dataclass
class Cursor:
    """Where a sink is in one run, and what went wrong there."""

    position: Position = Position()
    done: bool = False
    dead_lettered: int = 0
    last_error: str | None = None


@dataclass(frozen=True)
class CursorSave:
    """One run's cursor to save, with what lets a restart resume a live run without folding
    its journal from the start: ``snapshot``, the run's folded state at the cursor, and its
    captured output, which only grows between beats and can be large, saved beside it by
    pieces: ``output`` is the whole of it, of which the first ``output_kept`` characters
    are saved already (the last save's), so only the rest is written. No snapshot: no
    output kept either."""

    run: str
    cursor: Cursor
    snapshot: bytes | None = None
    output: str | None = None
    output_kept: int = 0


OK, RETRYING, UNUSABLE, CRASHED = "ok", "retrying", "unusable", "crashed"


@dataclass
class Health:
    retries: int = 0
    failing_since: float | None = None
    last_error: str | None = None
    condition: str = OK


class StateUnavailable(Exception):
    """The state cannot be written now (disk full, I/O error, read-only): wait and try again."""


def unavailable(error: BaseException) -> StateUnavailable | None:
    """``error`` as a StateUnavailable when it says the state's disk cannot take writes now."""
    if isinstance(error, StateUnavailable):
        return error
    if isinstance(error, sqlite3.Error) and (getattr(error, "sqlite_errorcode", 0) & 0xFF) in _UNAVAILABLE_CODES:
        return StateUnavailable(f"the state cannot be written: {error}")
    if isinstance(error, sqlite3.OperationalError) and "disk is full" in str(error):  # persist-queue's own
        return StateUnavailable(f"the state cannot be written: {error}")
    if isinstance(error, OSError) and error.errno in _UNAVAILABLE_ERRNOS:
        return StateUnavailable(f"the state cannot be written: {error.strerror}")
    return None


def _damaged(error: BaseException) -> bool:
    return isinstance(error, sqlite3.DatabaseError) and (
        (getattr(error, "sqlite_errorcode", 0) & 0xFF) in _DAMAGED_CODES or "malformed" in str(error))


class StateStore:
    """Cursors and health, safe to share between threads; readable while a daemon writes."""

    def __init__(self, connection: sqlite3.Connection, path: Path | None = None):
        self._db = connection
        self._path = path  # None: read-only, never rebuilt
        self._lock = threading.Lock()

    @classmethod
    def open(cls, state_dir: Path) -> "StateStore":
        """The state, created if missing and rebuilt if damaged; StateUnavailable when its
        disk cannot take it now."""
        try:
            make_private_dir(state_dir)
            path = state_dir / STATE_DB
            try:
                db = _connect(path)
            except sqlite3.DatabaseError as error:
                if not _damaged(error):
                    raise
                _move_aside(path, error)
                db = _connect(path)
        except (sqlite3.Error, OSError) as error:
            raise unavailable(error) or error
        return cls(db, path)

    @classmethod
    def open_readonly(cls, state_dir: Path) -> "StateStore | None":
        """For inspection (status, dlq list): None when no state exists yet, or when it is
        damaged (said once; the daemon rebuilds it); never creates it."""
        path = state_dir / STATE_DB
        if not path.exists():
            return None
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None,
                             timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError as error:
            db.close()
            if not _damaged(error):
                raise
            log.warning("the state %s is damaged (%s): shown without cursors; the next delivery rebuilds it",
                        path, error)
            return None
        return cls(db)

    def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """``work`` on the database, under the lock: a damaged database is rebuilt and
        ``work`` done again on the fresh one; a full disk is StateUnavailable."""
        with self._lock:
            try:
                return work(self._db)
            except sqlite3.DatabaseError as error:
                if not _damaged(error) or self._path is None:
                    raise unavailable(error) or error
                self._db.close()
                _move_aside(self._path, error)
                try:
                    self._db = _connect(self._path)
                    return work(self._db)
                except (sqlite3.Error, OSError) as again:
                    raise unavailable(again) or again

    def cursors(self, sink: str) -> dict[str, Cursor]:
        rows = self._run(lambda db: db.execute(
            "SELECT run, seq, segment, byte, done, dead_lettered, last_error FROM cursors WHERE sink = ?", (sink,)
        ).fetchall())
        return {
            run: Cursor(Position(seq, segment, byte), bool(done), dead_lettered, last_error)
            for run, seq, segment, byte, done, dead_lettered, last_error in rows
        }

    def save_cursors(self, sink: str, saves: Sequence[CursorSave]) -> None:
        """Durable on return, all in one transaction (one commit for many runs). A cursor
        never moves back (another process may have saved further)."""
        now = time.time()

        def save(db: sqlite3.Connection) -> None:
            with _immediate(db):
                for one in saves:
                    _save_cursor(db, sink, one, now)

        self._run(save)

    def rewind_cursor(self, sink: str, run: str, cursor: Cursor) -> None:
        """Move a cursor back (the sink lost data it had): the one exception to never moving back."""
        position = cursor.position
        def rewind(db: sqlite3.Connection) -> None:
            with _immediate(db):
                db.execute("UPDATE cursors SET seq = ?, segment = ?, byte = ?, done = 0, snapshot = NULL, updated = ? "
                           "WHERE sink = ? AND run = ?",
                           (position.seq, position.segment, position.offset, time.time(), sink, run))
                db.execute("DELETE FROM outputs WHERE sink = ? AND run = ?", (sink, run))

        self._run(rewind)

    def output(self, sink: str, run: str) -> str:
        """The captured output saved with the run's snapshot ("" when none is)."""
        rows = self._run(lambda db: db.execute("SELECT piece FROM outputs WHERE sink = ? AND run = ? ORDER BY start",
                                               (sink, run)).fetchall())
        return "".join(piece for (piece,) in rows)

    def snapshot(self, sink: str, run: str) -> bytes | None:
        row = self._run(lambda db: db.execute("SELECT snapshot FROM cursors WHERE sink = ? AND run = ?",
                                              (sink, run)).fetchone())
        return row[0] if row else None

    def health(self, sink: str) -> Health:
        row = self._run(lambda db: db.execute(
            "SELECT retries, failing_since, last_error, condition FROM health WHERE sink = ?", (sink,)
        ).fetchone())
        return Health(*row) if row else Health()

    def save_health(self, sink: str, health: Health, identity: str | None = None) -> None:
        self._run(lambda db: db.execute(
                "INSERT INTO health VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sink) DO UPDATE SET "
                "retries = excluded.retries, failing_since = excluded.failing_since, last_error = excluded.last_error, "
                "updated = excluded.updated, condition = excluded.condition, "
                "identity = coalesce(excluded.identity, health.identity)",
                (sink, health.retries, health.failing_since, health.last_error, time.time(), health.condition,
                 identity),
            ))

    def known_sinks(self) -> dict[str, str | None]:
        """Every sink this state has delivered to or tried to: name -> what its URL names."""
        rows = self._run(lambda db: db.execute(
            "SELECT sink, identity FROM health UNION SELECT DISTINCT sink, NULL FROM cursors "
            "WHERE sink NOT IN (SELECT sink FROM health)").fetchall())
        return dict(sorted(rows))

    def request_redrive(self, sink: str, letters: list[int]) -> None:
        """Ask the delivering worker to re-drive these dead letters (``runrelay dlq retry``)."""
        self._run(lambda db: db.executemany("INSERT OR IGNORE INTO redrive_requests VALUES (?, ?)",
                                            [(sink, letter) for letter in letters]))

    def redrive_requests(self, sink: str) -> set[int]:
        return self._run(lambda db: {row[0] for row in db.execute(
            "SELECT letter FROM redrive_requests WHERE sink = ?", (sink,))})

    def redrive_done(self, sink: str, letter: int) -> None:
        self._run(lambda db: db.execute("DELETE FROM redrive_requests WHERE sink = ? AND letter = ?", (sink, letter)))

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _save_cursor(db: sqlite3.Connection, sink: str, save: CursorSave, now: float) -> None:
    position, cursor = save.cursor.position, save.cursor
    moved = db.execute(
        "INSERT INTO cursors VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (sink, run) DO UPDATE SET seq = excluded.seq, segment = excluded.segment, "
        "byte = excluded.byte, done = excluded.done, dead_lettered = excluded.dead_lettered, "
        "last_error = excluded.last_error, updated = excluded.updated, snapshot = excluded.snapshot "
        "WHERE excluded.seq >= cursors.seq",
        (sink, save.run, position.seq, position.segment, position.offset, int(cursor.done),
         cursor.dead_lettered, cursor.last_error, now, save.snapshot),
    ).rowcount
    if moved:
        output = save.output if save.snapshot is not None else None
        kept = save.output_kept if output is not None else 0
        db.execute("DELETE FROM outputs WHERE sink = ? AND run = ? AND start >= ?", (sink, save.run, kept))
        if output is not None and len(output) > kept:
            db.execute("INSERT INTO outputs VALUES (?, ?, ?, ?)", (sink, save.run, kept, output[kept:]))


@contextlib.contextmanager
def _immediate(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction, taking the write lock at once; rolled back if anything fails."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:  # SQLite rolls back itself on a full disk
            db.execute("ROLLBACK")
        raise


def _connect(path: Path) -> sqlite3.Connection:
    """Open (creating if missing, owner-only) and check the state database: DatabaseError
    when it is damaged."""
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE))
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        if db.execute("PRAGMA quick_check(1)").fetchone()[0] != "ok":
            raise sqlite3.DatabaseError("database disk image is malformed (quick_check)")
        if db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
            db.executescript("DROP TABLE IF EXISTS cursors; DROP TABLE IF EXISTS health;"
                             f"PRAGMA user_version = {SCHEMA_VERSION};")
        db.executescript(_SCHEMA)
    except BaseException:
        db.close()
        raise
    return db


def _move_aside(path: Path, error: BaseException) -> None:
    """Keep a damaged state (and its WAL) beside the fresh one, for whoever wants to look."""
    aside = path.with_name(f"{path.name}{DAMAGED_SUFFIX}{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    for suffix in ("", "-wal", "-shm"):
        try:
            os.replace(f"{path}{suffix}", f"{aside}{suffix}")
        except FileNotFoundError:
            pass
    fsync_dir(path.parent)
    log.error("the state %s is damaged (%s): moved aside to %s, starting afresh; cursors are hints, the sinks "
              "say what they hold (a run may be read again from its start, once)", path, error, aside.name)


class DeliveryLock:
    """Only one delivering process (daemon or sync) per state directory.

    The kernel drops the lock when its holder dies, so a crash never leaves it stale.
    """

    def __init__(self, state_dir: Path):
        self.path = state_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> bool:
        """True once held; StateUnavailable when the state's disk cannot even take the lock file."""
        try:
            make_private_dir(self.path.parent)
            fd = try_lock(self.path)
        except OSError as error:
            raise unavailable(error) or error
        if fd is None:
            return False
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as error:  # the lock holds without it; status then says "pid unknown"
            log.warning("cannot write the delivering pid into %s: %s", self.path, error.strerror)
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def holder(self) -> int | None:
        """The pid of the process delivering now, or None (also for a lock file that is not a
        regular file: ``acquire`` never takes one)."""
        try:
            fd = open_regular(self.path)
        except (FileNotFoundError, NotRegularFile):
            return None
        try:
            if not is_locked(fd):
                return None
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        finally:
            os.close(fd)

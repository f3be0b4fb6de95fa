"""The daemon's durable state: per sink, per run cursors and per sink health.

One small SQLite database in the state directory (WAL, ``synchronous=FULL``: a saved
cursor survives power loss). A cursor is a hint, never the truth: the sink's own
``applied(run)`` is. After a crash between a sink's commit and the cursor save the
cursor lags, the daemon re-sends from it and the sink skips what it holds.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from runrelay.eventlog.fsutil import FILE_MODE, make_private_dir
from runrelay.eventlog.reader import Position

STATE_DB = "state.sqlite"
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


OK, RETRYING, UNUSABLE, CRASHED = "ok", "retrying", "unusable", "crashed"


@dataclass
class Health:
    retries: int = 0
    failing_since: float | None = None
    last_error: str | None = None
    condition: str = OK


class StateStore:
    """Cursors and health, safe to share between threads; readable while a daemon writes."""

    def __init__(self, connection: sqlite3.Connection):
        self._db = connection
        self._lock = threading.Lock()

    @classmethod
    def open(cls, state_dir: Path) -> "StateStore":
        make_private_dir(state_dir)
        path = state_dir / STATE_DB
        if not path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE))
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        if db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
            db.executescript("DROP TABLE IF EXISTS cursors; DROP TABLE IF EXISTS health;"
                             f"PRAGMA user_version = {SCHEMA_VERSION};")
        db.executescript(_SCHEMA)
        return cls(db)

    @classmethod
    def open_readonly(cls, state_dir: Path) -> "StateStore | None":
        """For inspection (status, dlq list): None when no state exists yet; never creates it."""
        path = state_dir / STATE_DB
        if not path.exists():
            return None
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None,
                             timeout=BUSY_TIMEOUT_MS / 1000)
        return cls(db)

    def cursors(self, sink: str) -> dict[str, Cursor]:
        with self._lock:
            rows = self._db.execute(
                "SELECT run, seq, segment, byte, done, dead_lettered, last_error FROM cursors WHERE sink = ?", (sink,)
            ).fetchall()
        return {
            run: Cursor(Position(seq, segment, byte), bool(done), dead_lettered, last_error)
            for run, seq, segment, byte, done, dead_lettered, last_error in rows
        }

    def save_cursor(self, sink: str, run: str, cursor: Cursor, snapshot: bytes | None = None) -> None:
        """Durable on return. A cursor never moves back (another process may have saved further).

        ``snapshot`` (the run's folded state at the cursor) lets a restart resume a live
        run without folding its journal from the start.
        """
        position = cursor.position
        with self._lock:
            self._db.execute(
                "INSERT INTO cursors VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (sink, run) DO UPDATE SET seq = excluded.seq, segment = excluded.segment, "
                "byte = excluded.byte, done = excluded.done, dead_lettered = excluded.dead_lettered, "
                "last_error = excluded.last_error, updated = excluded.updated, snapshot = excluded.snapshot "
                "WHERE excluded.seq >= cursors.seq",
                (sink, run, position.seq, position.segment, position.offset, int(cursor.done), cursor.dead_lettered,
                 cursor.last_error, time.time(), snapshot),
            )

    def rewind_cursor(self, sink: str, run: str, cursor: Cursor) -> None:
        """Move a cursor back (the sink lost data it had): the one exception to never moving back."""
        position = cursor.position
        with self._lock:
            self._db.execute(
                "UPDATE cursors SET seq = ?, segment = ?, byte = ?, done = 0, snapshot = NULL, updated = ? "
                "WHERE sink = ? AND run = ?",
                (position.seq, position.segment, position.offset, time.time(), sink, run),
            )

    def snapshot(self, sink: str, run: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT snapshot FROM cursors WHERE sink = ? AND run = ?", (sink, run)).fetchone()
        return row[0] if row else None

    def health(self, sink: str) -> Health:
        with self._lock:
            row = self._db.execute(
                "SELECT retries, failing_since, last_error, condition FROM health WHERE sink = ?", (sink,)
            ).fetchone()
        return Health(*row) if row else Health()

    def save_health(self, sink: str, health: Health, identity: str | None = None) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO health VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sink) DO UPDATE SET "
                "retries = excluded.retries, failing_since = excluded.failing_since, last_error = excluded.last_error, "
                "updated = excluded.updated, condition = excluded.condition, "
                "identity = coalesce(excluded.identity, health.identity)",
                (sink, health.retries, health.failing_since, health.last_error, time.time(), health.condition,
                 identity),
            )

    def known_sinks(self) -> dict[str, str | None]:
        """Every sink this state has delivered to or tried to: name -> what its URL names."""
        with self._lock:
            rows = self._db.execute("SELECT sink, identity FROM health UNION SELECT DISTINCT sink, NULL FROM cursors "
                                    "WHERE sink NOT IN (SELECT sink FROM health)").fetchall()
        return dict(sorted(rows))

    def request_redrive(self, sink: str, letters: list[int]) -> None:
        """Ask the delivering worker to re-drive these dead letters (``runrelay dlq retry``)."""
        with self._lock:
            self._db.executemany("INSERT OR IGNORE INTO redrive_requests VALUES (?, ?)",
                                 [(sink, letter) for letter in letters])

    def redrive_requests(self, sink: str) -> set[int]:
        with self._lock:
            return {row[0] for row in self._db.execute("SELECT letter FROM redrive_requests WHERE sink = ?", (sink,))}

    def redrive_done(self, sink: str, letter: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM redrive_requests WHERE sink = ? AND letter = ?", (sink, letter))

    def close(self) -> None:
        with self._lock:
            self._db.close()


class DeliveryLock:
    """Only one delivering process (daemon or sync) per state directory.

    The kernel drops the lock when its holder dies, so a crash never leaves it stale.
    """

    def __init__(self, state_dir: Path):
        self.path = state_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> bool:
        make_private_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def holder(self) -> int | None:
        """The pid of the process delivering now, or None."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        finally:
            os.close(fd)
        return None

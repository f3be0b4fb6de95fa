"""The SQL sink: Sacred's ``SqlObserver`` tables, a metrics table, and runrelay's bookkeeping.

SQLite (the default), PostgreSQL (psycopg 3) and MariaDB/MySQL (PyMySQL) through
SQLAlchemy Core. The layout, URL forms and the effectively-once scheme are described
in docs/sinks.md; where it differs from Sacred's own observer, docs/compatibility.md.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.util
import math
import os
import re
import socket
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from runrelay.eventlog.fold import RunState
from runrelay.eventlog.fsutil import FILE_MODE, make_private_dir
from runrelay.sinks import sacred
from runrelay.sinks.base import (
    Batch, PermanentSinkError, RunSource, Sink, SinkConfigError, TransientSinkError, UnusableSinkError,
)

SQLITE_BUSY_TIMEOUT_SECONDS = 30
# The largest single value (artifact, config, output) sent in one statement. MySQL takes
# less: half its max_allowed_packet (escaping can double binary data), less a margin.
DEFAULT_MAX_VALUE_BYTES = 256 * 1024 * 1024
MYSQL_PACKET_MARGIN = 1024 * 1024
MYSQL_STRICT_MODE = "SET SESSION sql_mode = 'TRADITIONAL'"  # never truncate silently
SCHEMA_LOCK_NAME = "runrelay_schema"  # MySQL named lock held while creating tables
SCHEMA_LOCK_KEY = int.from_bytes(b"runrelay", "big")  # PostgreSQL advisory lock key
SCHEMA_LOCK_SECONDS = 60
ERROR_TEXT_CHARS = 300

RUN_ID_WIDTH = 24
NAME_WIDTH = 255
PATH_WIDTH = 1024
STATUS_WIDTH = 64

# URL scheme -> (backend, the driver runrelay uses, the module it needs, the extra that installs it)
_BACKENDS = {
    "sqlite": ("sqlite", "sqlite", None, None),
    "postgresql": ("postgresql", "postgresql+psycopg", "psycopg", "postgres"),
    "postgresql+psycopg": ("postgresql", "postgresql+psycopg", "psycopg", "postgres"),
    "mysql": ("mysql", "mysql+pymysql", "pymysql", "mysql"),
    "mysql+pymysql": ("mysql", "mysql+pymysql", "pymysql", "mysql"),
    "mariadb+pymysql": ("mysql", "mariadb+pymysql", "pymysql", "mysql"),
}
_MYSQL_DIALECTS = ("mysql", "mariadb")
_MYSQL_PERMANENT = {1118, 1153}  # row size too large, packet too large: PyMySQL calls them operational
# unknown database, access denied (user, database), command denied, no privilege
_MYSQL_UNUSABLE = {1049, 1045, 1044, 1142, 1227}
# PostgreSQL reports these at connect time without an SQLSTATE (libpq's text, English messages)
_POSTGRES_UNUSABLE = re.compile(
    r"FATAL: +(database \S+ does not exist|role \S+ does not exist|password authentication failed"
    r"|no pg_hba\.conf entry|permission denied for database)")
_POSTGRES_UNUSABLE_STATES = {"3D000", "28000", "28P01", "42501"}

# --- the tables ------------------------------------------------------------------------------
# Sacred's (sacred/observers/sql_bases.py): same names, columns and column types, with the
# differences listed in docs/compatibility.md (wider strings, a string status, MySQL types
# that hold microseconds and more than 64 KB).

metadata = sa.MetaData()
_TEXT = sa.Text().with_variant(mysql.LONGTEXT(), *_MYSQL_DIALECTS)
_BYTES = sa.LargeBinary().with_variant(mysql.LONGBLOB(), *_MYSQL_DIALECTS)
_TIME = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), *_MYSQL_DIALECTS)
_BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite autoincrements INTEGER only


# utf8mb4_bin: all of Unicode, and names compare case-sensitively as they do elsewhere.
# SQLAlchemy's "mariadb" dialect (mariadb+pymysql://) reads only mariadb_ options.
_MYSQL_TABLE = {"engine": "InnoDB", "charset": "utf8mb4", "collate": "utf8mb4_bin"}
_MYSQL_OPTIONS = {f"{dialect}_{name}": value for dialect in _MYSQL_DIALECTS for name, value in _MYSQL_TABLE.items()}


class _Status(sa.types.UserDefinedType):
    """VARCHAR bound without a type: PostgreSQL then also fits it into the status_enum of
    tables Sacred created (a VARCHAR parameter would not be cast to the enum)."""

    cache_ok = True

    def get_col_spec(self, **_kw) -> str:
        return f"VARCHAR({STATUS_WIDTH})"


def _table(name: str, *columns: sa.SchemaItem) -> sa.Table:
    return sa.Table(name, metadata, *columns, **_MYSQL_OPTIONS)


def _link(name: str, left: str, right: str, left_type: sa.types.TypeEngine = sa.Integer()) -> sa.Table:
    """A many-to-many association table, as Sacred declares them."""
    return _table(
        name,
        sa.Column(f"{left}_id", left_type, sa.ForeignKey(f"{left}.{left}_id")),
        sa.Column(f"{right}_id", sa.Integer, sa.ForeignKey(f"{right}.{right}_id")),
    )


source = _table(
    "source",
    sa.Column("source_id", sa.Integer, primary_key=True),
    sa.Column("filename", sa.String(PATH_WIDTH)),
    sa.Column("md5sum", sa.String(32)),
    sa.Column("content", _TEXT),
)
repository = _table(
    "repository",
    sa.Column("repository_id", sa.Integer, primary_key=True),
    sa.Column("url", sa.String(2048)),
    sa.Column("commit", sa.String(40)),
    sa.Column("dirty", sa.Boolean),
)
dependency = _table(
    "dependency",
    sa.Column("dependency_id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(NAME_WIDTH)),
    sa.Column("version", sa.String(NAME_WIDTH)),
)
resource = _table(
    "resource",
    sa.Column("resource_id", sa.Integer, primary_key=True),
    sa.Column("filename", sa.String(PATH_WIDTH)),
    sa.Column("md5sum", sa.String(32)),
    sa.Column("content", _BYTES),
)
host = _table(
    "host",
    sa.Column("host_id", sa.Integer, primary_key=True),
    sa.Column("cpu", sa.String(NAME_WIDTH)),
    sa.Column("hostname", sa.String(NAME_WIDTH)),
    sa.Column("os", sa.String(NAME_WIDTH)),
    sa.Column("os_info", sa.String(NAME_WIDTH)),
    sa.Column("python_version", sa.String(NAME_WIDTH)),
)
experiment = _table(
    "experiment",
    sa.Column("experiment_id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(NAME_WIDTH)),
    sa.Column("md5sum", sa.String(32)),
    sa.Column("base_dir", sa.String(PATH_WIDTH)),
)
experiments_sources = _link("experiments_sources", "experiment", "source")
experiments_repositories = _link("experiments_repositories", "experiment", "repository")
experiments_dependencies = _link("experiments_dependencies", "experiment", "dependency")
run = _table(
    "run",
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("run_id", sa.String(RUN_ID_WIDTH), unique=True),
    sa.Column("command", sa.String(NAME_WIDTH)),
    sa.Column("start_time", _TIME),
    sa.Column("heartbeat", _TIME),
    sa.Column("stop_time", _TIME),
    sa.Column("queue_time", _TIME),
    sa.Column("priority", sa.Double),
    sa.Column("comment", _TEXT),
    sa.Column("fail_trace", _TEXT),
    sa.Column("captured_out", _TEXT),
    sa.Column("config", _TEXT),
    sa.Column("info", _TEXT),
    sa.Column("status", _Status()),  # Sacred: a fixed Enum without DIED or custom statuses
    sa.Column("host_id", sa.Integer, sa.ForeignKey("host.host_id")),
    sa.Column("experiment_id", sa.Integer, sa.ForeignKey("experiment.experiment_id")),
    sa.Column("result", sa.Double),
)
artifact = _table(
    "artifact",
    sa.Column("artifact_id", sa.Integer, primary_key=True),
    sa.Column("filename", sa.String(NAME_WIDTH)),
    sa.Column("content", _BYTES),
    sa.Column("run_id", sa.String(RUN_ID_WIDTH), sa.ForeignKey("run.run_id")),
)
runs_resources = _link("runs_resources", "run", "resource", sa.String(RUN_ID_WIDTH))  # to run.run_id

# runrelay's own tables. No foreign keys to run: MySQL refuses them when run (created by
# Sacred) has another collation, and the sink writes both sides in one transaction.
metric = _table(
    "metric",
    sa.Column("metric_id", _BIG_ID, primary_key=True),
    sa.Column("run_id", sa.String(RUN_ID_WIDTH), nullable=False),
    sa.Column("name", sa.String(NAME_WIDTH), nullable=False),
    sa.Column("step", sa.BigInteger),
    sa.Column("value", sa.Double),  # NULL when the value is not finite ...
    sa.Column("nonfinite", sa.String(4)),  # ... and then 'nan', 'inf' or '-inf'
    sa.Column("timestamp", _TIME),
    sa.Index("metric_run_name", "run_id", "name"),
)
runrelay_run = _table(
    "runrelay_run",
    sa.Column("uid", sa.String(36), primary_key=True),
    sa.Column("run_id", sa.String(RUN_ID_WIDTH), nullable=False, unique=True),
    sa.Column("applied_seq", sa.BigInteger, nullable=False),
    sa.Column("result", _TEXT),  # the whole result as JSON; run.result holds finite numbers only
    sa.Column("death_reason", _TEXT),  # set while a death verdict stands ('' if it gave no reason)
)
runrelay_redelivered = _table(
    "runrelay_redelivered",
    sa.Column("uid", sa.String(36), sa.ForeignKey("runrelay_run.uid"), primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
)

# --- the run-row columns each RunState field sets ---------------------------------------------

# eventlog.fold.SETS says which fields each kind of event sets; a batch rewrites the columns
# of the fields it changed, from its folded state. runrelay_run.result and death_reason
# follow result and death.
_COLUMNS = {
    "status": ("status",),
    "command": ("command",),
    "config": ("config",),
    "meta": ("priority", "comment"),
    "queue_time": ("queue_time",),
    "start_time": ("start_time",),
    "heartbeat": ("heartbeat",),
    "stop_time": ("stop_time",),
    "info": ("info",),
    "result": ("result",),
    "captured_out": ("captured_out",),
    "fail_trace": ("fail_trace",),
}
_FROM_STATE: dict[str, Callable[[RunState], Any]] = {
    "status": lambda state: state.status,
    "command": lambda state: state.command,
    "config": lambda state: sacred.sacred_json(state.config),
    "priority": lambda state: sacred.finite(state.meta.get("priority", 0)),
    "comment": lambda state: state.meta.get("comment", ""),
    "queue_time": lambda state: sacred.naive_utc(state.queue_time),
    "start_time": lambda state: sacred.naive_utc(state.start_time),
    "heartbeat": lambda state: sacred.naive_utc(state.heartbeat),
    "stop_time": lambda state: sacred.naive_utc(state.stop_time),
    "info": lambda state: sacred.sacred_json(state.info),
    "result": lambda state: sacred.finite(state.result),
    "fail_trace": lambda state: None if state.fail_trace is None else "\n".join(state.fail_trace),
}


class SqlSink(Sink):
    """Runs in Sacred's SqlObserver tables, one transaction per batch (docs/sinks.md).

    Effectively once: ``runrelay_run`` holds each run's uid, its Sacred run id and the
    highest seq applied; it is read (``FOR UPDATE``; SQLite: ``BEGIN IMMEDIATE``) and
    advanced in the same transaction as the batch's writes, and the batch's part at or
    below it is skipped. A re-delivered dead letter is recorded in ``runrelay_redelivered``
    in its transaction instead. Driver errors become TransientSinkError, PermanentSinkError
    (a value the database cannot take) or UnusableSinkError (no such database, refused
    credentials, a file that cannot be opened); see docs/sinks.md.
    """

    def __init__(self, name: str, url: str, options: dict, source: RunSource):
        super().__init__(name, url, options, source)
        self._url = _engine_url(url)
        self._engine: sa.Engine | None = None
        self._max_value_bytes = DEFAULT_MAX_VALUE_BYTES
        self._ids = _Ids()
        self._deadline: _Deadline | None = None

    @classmethod
    def identity(cls, url: str) -> str:
        parsed = _engine_url(url)
        if parsed.get_backend_name() == "sqlite":
            return f"sqlite:///{parsed.database}"
        backend = _BACKENDS[_scheme(url)][0]
        port = parsed.port or {"postgresql": 5432, "mysql": 3306}[backend]
        user = f"{parsed.username}@" if parsed.username else ""
        return f"{backend}://{user}{parsed.host or 'localhost'}:{port}/{parsed.database or ''}"

    # --- the Sink verbs ----------------------------------------------------------------------

    def open(self) -> None:
        if self._engine is None:
            try:
                self._engine = self._create_engine()
            except OSError as error:  # the SQLite file or its directory
                raise UnusableSinkError(f"{self!r}: cannot create the database file: {error}") from None
        with self._transaction() as conn:
            self._create_tables(conn)
            self._max_value_bytes = self._value_limit(conn)

    def applied(self, run: str) -> int:
        with self._transaction(run) as conn:
            seq = conn.execute(sa.select(runrelay_run.c.applied_seq).where(runrelay_run.c.uid == run)).scalar()
        return -1 if seq is None else seq

    def apply(self, batch: Batch) -> None:
        self._write(batch, redelivery=False)

    def redeliver(self, batch: Batch) -> None:
        self._write(batch, redelivery=True)

    def close(self) -> None:
        if self._deadline is not None:
            self._deadline.stop()
            self._deadline = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    # --- connecting --------------------------------------------------------------------------

    def _create_engine(self) -> sa.Engine:
        backend = self._url.get_backend_name()
        options: dict[str, Any] = {"connect_timeout": max(1, round(self.timeout_seconds))}
        if backend == "sqlite":
            options = {"timeout": SQLITE_BUSY_TIMEOUT_SECONDS}
            _create_private_file(Path(self._url.database))
        elif backend in _MYSQL_DIALECTS:  # PyMySQL bounds every read and write itself
            options.update(init_command=MYSQL_STRICT_MODE, read_timeout=self.timeout_seconds,
                           write_timeout=self.timeout_seconds)
        engine = sa.create_engine(self._url, connect_args=options, pool_pre_ping=True)
        if backend == "sqlite":
            sa.event.listen(engine, "connect", _sqlite_connected)
            sa.event.listen(engine, "begin", _sqlite_begin)
        elif backend == "postgresql":
            self._deadline = _Deadline(self.timeout_seconds)
            sa.event.listen(engine, "connect", lambda dbapi_connection, _record: self._deadline.watch(dbapi_connection))
        return engine

    @contextlib.contextmanager
    def _transaction(self, run: str | None = None) -> Iterator[sa.Connection]:
        """One transaction, bounded by the timeout, every driver error converted."""
        bound = self._deadline.bounding() if self._deadline else contextlib.nullcontext()
        try:
            with bound, self._engine.begin() as conn:
                yield conn
        except sa.exc.SQLAlchemyError as error:
            raise self._converted(error, run) from None
        except OSError as error:  # the SQLite file or its directory
            raise UnusableSinkError(f"{self!r}: {error}") from None

    def _create_tables(self, conn: sa.Connection) -> None:
        """Create missing tables; a lock makes two daemons opening at once take turns."""
        dialect = conn.dialect.name
        if dialect == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
        elif dialect in _MYSQL_DIALECTS:  # DDL commits in MySQL: a session lock, released below
            locked = conn.execute(
                sa.text("SELECT GET_LOCK(:name, :seconds)"), {"name": SCHEMA_LOCK_NAME, "seconds": SCHEMA_LOCK_SECONDS}
            ).scalar()
            if locked != 1:
                raise TransientSinkError(f"{self!r}: another process holds {SCHEMA_LOCK_NAME} (creating tables)")
        try:
            metadata.create_all(conn)  # SQLite: serialized by BEGIN IMMEDIATE
        finally:
            if dialect in _MYSQL_DIALECTS:
                conn.execute(sa.text("SELECT RELEASE_LOCK(:name)"), {"name": SCHEMA_LOCK_NAME})

    def _value_limit(self, conn: sa.Connection) -> int:
        if conn.dialect.name not in _MYSQL_DIALECTS:
            return DEFAULT_MAX_VALUE_BYTES
        packet = conn.execute(sa.text("SELECT @@max_allowed_packet")).scalar()
        return min(DEFAULT_MAX_VALUE_BYTES, (int(packet) - MYSQL_PACKET_MARGIN) // 2)

    # --- writing a batch ---------------------------------------------------------------------

    def _write(self, batch: Batch, redelivery: bool) -> None:
        with self._transaction(batch.run) as conn:
            found = conn.execute(
                sa.select(runrelay_run.c.run_id, runrelay_run.c.applied_seq)
                .where(runrelay_run.c.uid == batch.run)
                .with_for_update()
            ).first()
            part = self._unwritten(conn, batch, redelivery, found)
            if part is None:
                return
            run_id = found.run_id if found else self._create_run(conn, part)
            values = self._add_rows(conn, run_id, part)
            values.update(self._run_columns(part))
            if values:
                self._check_size(values)
                conn.execute(run.update().where(run.c.run_id == run_id).values(**values))
            ours = self._bookkeeping(part, redelivery)
            if ours:
                conn.execute(runrelay_run.update().where(runrelay_run.c.uid == batch.run).values(**ours))
            if redelivery:
                conn.execute(runrelay_redelivered.insert().values(uid=batch.run, seq=batch.last_seq))
        self._ids.committed()

    def _unwritten(self, conn: sa.Connection, batch: Batch, redelivery: bool, found) -> Batch | None:
        if not redelivery:
            return batch.after(-1 if found is None else found.applied_seq)
        if batch.first_seq != batch.last_seq:
            raise ValueError("a re-delivery carries one dead letter")  # the daemon's contract
        done = conn.execute(sa.select(runrelay_redelivered.c.seq).where(
            runrelay_redelivered.c.uid == batch.run, runrelay_redelivered.c.seq == batch.last_seq)).first()
        return None if done else batch

    def _create_run(self, conn: sa.Connection, batch: Batch) -> str:
        """Give a new run its Sacred run id, recorded beside its uid: the ``_id`` Sacred
        settled on if it is free, else SqlObserver's rule (0 for the first run, then the
        highest ``run.id`` + 1)."""
        given = batch.state.sacred_id
        run_id = None if given is None else str(given)
        taken = sa.select(run.c.id).where(run.c.run_id == run_id)
        if run_id is None or len(run_id) > RUN_ID_WIDTH or conn.execute(taken).first():
            last = conn.execute(sa.select(run.c.id).order_by(run.c.id.desc()).limit(1)).scalar()
            run_id = "0" if last is None else str(last + 1)
        try:
            conn.execute(run.insert().values(run_id=run_id))
            conn.execute(runrelay_run.insert().values(uid=batch.run, run_id=run_id, applied_seq=-1))
        except sa.exc.IntegrityError:
            raise TransientSinkError(
                f"{self!r}: run {batch.run}: another writer took run id {run_id} at the same moment; retrying"
            ) from None
        return run_id

    def _add_rows(self, conn: sa.Connection, run_id: str, batch: Batch) -> dict[str, int]:
        """Metric points, artifacts, resources; for a queued or started event the experiment
        and host rows, whose ids are returned for the run row."""
        ids = {}
        if len(batch.points):
            _insert_points(conn, run_id, batch.points)
        for entry in batch.artifacts:
            content = self._blob(batch.run, entry, f"artifact {entry['name']!r}")
            conn.execute(artifact.insert().values(filename=entry["name"], content=content, run_id=run_id))
        for entry in batch.resources:
            key = {"filename": entry["filename"], "md5sum": entry["md5"]}
            found = self._ids.get_or_create(
                conn, resource, key, lambda: {"content": self._blob(batch.run, entry, f"resource {key['filename']!r}")})
            conn.execute(runs_resources.insert().values(run_id=run_id, resource_id=found))
        if "experiment" in batch.changed:
            ids["experiment_id"] = self._experiment(conn, batch)
            ids["host_id"] = self._ids.get_or_create(conn, host, sacred.host_key(batch.state.host))
        return ids

    def _run_columns(self, batch: Batch) -> dict[str, Any]:
        columns = {column for name in batch.changed for column in _COLUMNS.get(name, ())}
        values = {column: _FROM_STATE[column](batch.state) for column in columns if column in _FROM_STATE}
        if "captured_out" in columns:
            values["captured_out"] = self._captured_out(batch.state.captured_out)
        return values

    def _bookkeeping(self, batch: Batch, redelivery: bool) -> dict[str, Any]:
        ours: dict[str, Any] = {} if redelivery else {"applied_seq": batch.last_seq}
        if "result" in batch.changed:
            ours["result"] = sacred.sacred_json(batch.state.result)
        if "death" in batch.changed:
            death = batch.state.death
            ours["death_reason"] = None if death is None else str(death.get("reason") or "")
        self._check_size(ours)
        return ours

    def _experiment(self, conn: sa.Connection, batch: Batch) -> int:
        """Sacred's Experiment.get_or_create: one row per distinct experiment info."""
        ex_info = sacred.untuple(batch.state.experiment)
        name, md5 = sacred.experiment_key(batch.state.experiment)
        key = {"name": name, "md5sum": md5}
        found = self._ids.find(conn, experiment, key)
        if found is not None:
            return found
        experiment_id = self._ids.insert(conn, experiment, key, {**key, "base_dir": ex_info.get("base_dir")})
        blobs = {entry["name"]: entry for entry in batch.state.sources}
        dependencies = [self._ids.get_or_create(conn, dependency, sacred.requirement(text))
                        for text in ex_info.get("dependencies", [])]
        sources = [self._source(conn, batch.run, name, md5, blobs) for name, md5 in ex_info.get("sources", [])]
        repositories = [
            self._ids.get_or_create(conn, repository, {column: repo.get(column) for column in ("url", "commit", "dirty")})
            for repo in ex_info.get("repositories", [])
        ]
        for table, column, linked in (
            (experiments_dependencies, "dependency_id", dependencies),
            (experiments_sources, "source_id", sources),
            (experiments_repositories, "repository_id", repositories),
        ):
            rows = [{"experiment_id": experiment_id, column: id_} for id_ in dict.fromkeys(linked)]  # linked once
            if rows:
                conn.execute(table.insert(), rows)
        return experiment_id

    def _source(self, conn: sa.Connection, uid: str, name: str, md5: str, blobs: dict[str, dict]) -> int:
        def content() -> dict:
            if name not in blobs:
                raise PermanentSinkError(f"{self!r} run {uid}: source {name!r} was not captured into the journal")
            data = self._blob(uid, blobs[name], f"source {name!r}")
            try:
                return {"content": data.decode("utf-8")}
            except UnicodeDecodeError:
                raise PermanentSinkError(f"{self!r} run {uid}: source {name!r} is not UTF-8 text") from None

        return self._ids.get_or_create(conn, source, {"filename": name, "md5sum": md5}, content)

    # --- values ------------------------------------------------------------------------------

    def _blob(self, run_uid: str, entry: dict, what: str) -> bytes:
        """A blob's bytes; one that is missing, damaged or too large is permanent for its event."""
        seq = entry.get("seq")
        try:
            with self.source.open_blob(run_uid, entry["digest"]) as file:
                size = os.fstat(file.fileno()).st_size
                if size > self._max_value_bytes:
                    raise PermanentSinkError(f"{self!r} run {run_uid}: {what} is {size} bytes; {self._too_large_hint()}",
                                             seq)
                return file.read()
        except (FileNotFoundError, ValueError) as error:
            raise PermanentSinkError(f"{self!r} run {run_uid}: {what}: {error}", seq) from None
        except OSError as error:
            raise TransientSinkError(f"{self!r} run {run_uid}: cannot read {what} from the journal: {error}") from None

    def _captured_out(self, text: str) -> str:
        """The output as stored: no NUL on PostgreSQL, its end kept within half the value limit."""
        if self._url.get_backend_name() == "postgresql":
            text = text.replace("\x00", "\ufffd")
        return sacred.cut_front(text, self._max_value_bytes // 2, "output", "too large for this database")

    def _check_size(self, values: dict) -> None:
        sizes = {name: len(v.encode("utf-8", "replace")) for name, v in values.items() if isinstance(v, str)}
        if sum(sizes.values()) > self._max_value_bytes:
            detail = ", ".join(f"{name} {size} bytes" for name, size in sizes.items() if size)
            raise PermanentSinkError(f"{self!r}: the run's {detail}: together {self._too_large_hint()}")

    def _too_large_hint(self) -> str:
        hint = " (raise the server's max_allowed_packet)" if self._url.get_backend_name() in _MYSQL_DIALECTS else ""
        return f"more than the {self._max_value_bytes} this database takes in one write{hint}"

    # --- errors ------------------------------------------------------------------------------

    def _converted(self, error: sa.exc.SQLAlchemyError, run_uid: str | None) -> Exception:
        message = f"{self!r}{f' run {run_uid}' if run_uid else ''}: {_summary(error)}"
        if _bug(error):
            return SqlBug(message)
        if _unusable(error):
            return UnusableSinkError(message)
        if _permanent(error):
            return PermanentSinkError(message)
        return TransientSinkError(message)


# --- helpers -------------------------------------------------------------------------------------


def _scheme(url: str) -> str:
    return url.partition("://")[0].lower()


def _engine_url(url: str) -> sa.engine.URL:
    """The URL SQLAlchemy connects to: runrelay's driver for the scheme, an absolute SQLite
    path. SinkConfigError (without the URL: it may hold a password) if it cannot work."""
    if _scheme(url) not in _BACKENDS:
        raise SinkConfigError(f"not an SQL URL; SQL schemes: {', '.join(sorted(_BACKENDS))}")
    _backend, driver, module, extra = _BACKENDS[_scheme(url)]
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
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


def _create_private_file(path: Path) -> None:
    """Create the SQLite file and its directory owner-only, as the journal is (SQLite gives
    its -wal and -shm files the database file's mode)."""
    make_private_dir(path.parent)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE))


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


class _Ids:
    """Sacred's get_or_create for shared rows (hosts, experiments, resources, …), with the
    ids already found remembered: rows are only ever added, so an id found stays right.
    What a transaction found joins the memory only once it commits."""

    def __init__(self):
        self._known: dict[tuple, int] = {}
        self._pending: dict[tuple, int] = {}

    def find(self, conn: sa.Connection, table: sa.Table, key: dict) -> int | None:
        memo = (table.name, *sorted(key.items()))
        found = self._known.get(memo) or self._pending.get(memo)
        if found is None:
            primary = next(iter(table.primary_key))
            where = [table.c[name] == value for name, value in key.items()]
            found = conn.execute(sa.select(primary).where(*where).order_by(primary).limit(1)).scalar()
            if found is not None:
                self._pending[memo] = found
        return found

    def insert(self, conn: sa.Connection, table: sa.Table, key: dict, values: dict) -> int:
        found = conn.execute(table.insert().values(**values)).inserted_primary_key[0]
        self._pending[(table.name, *sorted(key.items()))] = found
        return found

    def get_or_create(self, conn: sa.Connection, table: sa.Table, key: dict, more: Callable[[], dict] = dict) -> int:
        """The first row matching ``key``, else a new one (``more`` adds the other columns,
        read only when needed)."""
        found = self.find(conn, table, key)
        return found if found is not None else self.insert(conn, table, key, {**key, **more()})

    def committed(self) -> None:
        self._known.update(self._pending)
        self._pending.clear()


class _Deadline:
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
    with contextlib.suppress(Exception):  # already closed, or never connected
        fd = dbapi_connection.driver_connection.pgconn.socket
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)


_METRIC_COLUMNS = ("run_id", "name", "step", "value", "nonfinite", "timestamp")


def _metric_rows(run_id: str, points, sqlite: bool) -> list[tuple]:
    """(run_id, name, step, value, nonfinite, timestamp) per point. A non-finite value is
    NULL plus 'nan', 'inf' or '-inf' (MySQL has no NaN; Python's float() reads them back)."""
    values = [float(value) for value in points.values]
    nonfinite = [None] * len(values)
    if not all(map(math.isfinite, values)):
        nonfinite = [None if math.isfinite(value) else repr(value) for value in values]
        values = [value if text is None else None for value, text in zip(values, nonfinite)]
    timestamps = points.timestamps
    if sqlite:
        timestamps = [None if timestamp is None else _sqlite_time(timestamp) for timestamp in timestamps]
    return list(zip([run_id] * len(values), points.names, points.steps, values, nonfinite, timestamps))


def _sqlite_time(value: dt.datetime) -> str:
    """SQLAlchemy's storage format for DateTime on SQLite (which its reader parses back),
    made with isoformat: strftime took a fifth of the metric insert time."""
    text = value.isoformat(" ")
    return text if value.microsecond else text + ".000000"


def _insert_points(conn: sa.Connection, run_id: str, points) -> None:
    """Metric rows straight through the driver, in the batch's transaction: SQLAlchemy's
    per-row parameter processing was a quarter of the replay time for metric batches."""
    rows = _metric_rows(run_id, points, conn.dialect.name == "sqlite")
    if conn.dialect.name == "postgresql":
        statement = f"COPY {metric.name} ({', '.join(_METRIC_COLUMNS)}) FROM STDIN"
        driver_error = conn.dialect.loaded_dbapi.Error
        try:
            with conn.connection.driver_connection.cursor() as cursor, cursor.copy(statement) as copy:
                for row in rows:
                    copy.write_row(row)
        except driver_error as error:  # raw driver errors: wrap them as SQLAlchemy would
            raise sa.exc.DBAPIError.instance(statement, None, error, driver_error, dialect=conn.dialect) from None
    else:
        conn.exec_driver_sql(_metric_insert_sql(conn.dialect), rows)


def _metric_insert_sql(dialect: sa.Dialect) -> str:
    marker = "?" if dialect.paramstyle == "qmark" else "%s"
    names = ", ".join(dialect.identifier_preparer.quote(name) for name in _METRIC_COLUMNS)
    return f"INSERT INTO {metric.name} ({names}) VALUES ({', '.join([marker] * len(_METRIC_COLUMNS))})"


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


def _summary(error: sa.exc.SQLAlchemyError) -> str:
    """One line about ``error``: the driver's message, never the statement or its parameters."""
    cause = error.orig if isinstance(error, sa.exc.DBAPIError) else error
    lines = str(cause).strip().splitlines() or [""]
    return f"{type(cause).__name__}: {lines[0][:ERROR_TEXT_CHARS]}"

"""The SQL sink: Sacred's ``SqlObserver`` tables, a metrics table, and runrelay's bookkeeping.

SQLite (the default), PostgreSQL (psycopg 3) and MariaDB/MySQL (PyMySQL) through
SQLAlchemy Core. The layout, URL forms and the effectively-once scheme are described
in docs/sinks.md; where it differs from Sacred's own observer, docs/compatibility.md.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from runrelay.eventlog.events import Event, Kind
from runrelay.eventlog.fold import RunState
from runrelay.sinks.base import Batch, BlobSource, PermanentSinkError, Sink, TransientSinkError

CONNECT_TIMEOUT_SECONDS = 10
SQLITE_BUSY_TIMEOUT_SECONDS = 30
# The largest single value (artifact, config, output) sent in one statement. MySQL takes
# less: half its max_allowed_packet (escaping can double binary data), less a margin.
DEFAULT_MAX_VALUE_BYTES = 256 * 1024 * 1024
MYSQL_PACKET_MARGIN = 1024 * 1024
MYSQL_STRICT_MODE = "SET SESSION sql_mode = 'TRADITIONAL'"  # never truncate silently
SCHEMA_LOCK_NAME = "runrelay_schema"  # MySQL named lock held while creating tables
SCHEMA_LOCK_KEY = int.from_bytes(b"runrelay", "big")  # PostgreSQL advisory lock key
SCHEMA_LOCK_SECONDS = 60
CUT_MARKER = "[runrelay: the first {} bytes of this output were cut: too large for this database]\n"
ERROR_TEXT_CHARS = 300

RUN_ID_WIDTH = 24
NAME_WIDTH = 255
PATH_WIDTH = 1024
STATUS_WIDTH = 64

_DRIVERS = {"postgresql": "postgresql+psycopg", "mysql": "mysql+pymysql", "mariadb": "mariadb+pymysql"}
_MYSQL_DIALECTS = ("mysql", "mariadb")
_MYSQL_PERMANENT = {1118, 1153}  # row size too large, packet too large: PyMySQL calls them operational

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

# --- which run-row columns each kind of event sets (as the fold does) -----------------------

# An event writes only what its kind sets, so an event set aside as unwritable (say, a
# status the column cannot hold) does not make the rest of its batch fail with it.
# runrelay_run's result and death_reason go with run's result and status.

_DESCRIBED = frozenset({"experiment_id", "host_id", "command", "config", "priority", "comment", "status"})
_ENDED = frozenset({"status", "stop_time"})
_SETS = {
    Kind.QUEUED: _DESCRIBED | {"queue_time"},
    Kind.STARTED: _DESCRIBED | {"start_time"},
    Kind.HEARTBEAT: frozenset({"heartbeat", "info", "captured_out", "result"}),
    Kind.COMPLETED: _ENDED | {"result"},
    Kind.INTERRUPTED: _ENDED,
    Kind.FAILED: _ENDED | {"fail_trace"},
    Kind.DIED: _ENDED,
}
_REVIVED = _ENDED  # any event after a standing death verdict withdraws it (docs/events.md)

_FROM_STATE: dict[str, Callable[[RunState], Any]] = {
    "command": lambda state: state.command,
    "config": lambda state: _sacred_json(state.config),
    "priority": lambda state: _finite(state.meta.get("priority", 0)),
    "comment": lambda state: state.meta.get("comment", ""),
    "queue_time": lambda state: _naive_utc(state.queue_time),
    "start_time": lambda state: _naive_utc(state.start_time),
    "heartbeat": lambda state: _naive_utc(state.heartbeat),
    "stop_time": lambda state: _naive_utc(state.stop_time),
    "info": lambda state: _sacred_json(state.info),
    "result": lambda state: _finite(state.result),
    "fail_trace": lambda state: None if state.fail_trace is None else "\n".join(state.fail_trace),
    "status": lambda state: state.status,
}

# Errors converted to TransientSinkError or PermanentSinkError (see SqlSink).
_CONVERTED = (sa.exc.SQLAlchemyError, OSError, ValueError, TypeError, LookupError, ArithmeticError, AttributeError)


class SqlSink(Sink):
    """Runs in Sacred's SqlObserver tables, one transaction per batch (docs/sinks.md).

    Effectively once: ``runrelay_run`` holds each run's uid, its Sacred run id and the
    highest seq applied; it is read (``FOR UPDATE``; SQLite: ``BEGIN IMMEDIATE``) and
    advanced in the same transaction as the batch's writes. Events at or below it are
    skipped. The run row is rewritten from the batch's state, only the columns the new
    events' kinds set, each by the last event of the batch that sets it, so an event the
    daemon sets aside does not take the others with it. A re-drive (``redelivery``) is
    recorded event by event in ``runrelay_redelivered`` instead.

    Errors: driver errors become ``TransientSinkError`` (connection lost or refused,
    timeouts, deadlocks, lock waits, missing tables or privileges: fix and retry) or
    ``PermanentSinkError`` (a value the database cannot take: too long, too large,
    invalid, a constraint, a missing blob). After a permanent error the batch is applied
    again one event at a time in a fresh transaction: the first event that fails gives
    the error's ``seq`` and that transaction is rolled back, so the daemon can
    dead-letter that event and apply the rest. If no event fails the second time, that
    transaction commits and ``apply`` returns normally. ``seq`` is None only when the
    failure belongs to no event (creating the run's row).
    """

    def __init__(self, url: str, blobs: BlobSource):
        super().__init__(url, blobs)
        self._engine: sa.Engine | None = None
        self._max_value_bytes = DEFAULT_MAX_VALUE_BYTES

    # --- the Sink verbs ----------------------------------------------------------------------

    def open(self) -> None:
        if self._engine is None:
            self._engine = self._create_engine()
        try:
            with self._engine.begin() as conn:
                self._create_tables(conn)
                self._max_value_bytes = self._value_limit(conn)
        except _CONVERTED as error:
            raise self._converted(error) from None

    def check(self) -> None:
        try:
            with self._engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except _CONVERTED as error:
            raise TransientSinkError(str(self._converted(error))) from None

    def applied(self, run: str) -> int:
        try:
            with self._engine.connect() as conn:
                seq = conn.execute(sa.select(runrelay_run.c.applied_seq).where(runrelay_run.c.uid == run)).scalar()
        except _CONVERTED as error:
            raise self._converted(error, run) from None
        return -1 if seq is None else seq

    def apply(self, batch: Batch) -> None:
        try:
            self._transaction(batch, careful=False)
        except PermanentSinkError:
            self._transaction(batch, careful=True)  # names the event at fault, or commits

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    # --- connecting --------------------------------------------------------------------------

    def _create_engine(self) -> sa.Engine:
        try:
            url = sa.engine.make_url(self.url)
            url = url.set(drivername=_DRIVERS.get(url.drivername, url.drivername))
            options: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT_SECONDS}
            if url.get_backend_name() == "sqlite":
                options = {"timeout": SQLITE_BUSY_TIMEOUT_SECONDS}
                if url.database:
                    Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            elif url.get_backend_name() in _MYSQL_DIALECTS:
                options["init_command"] = MYSQL_STRICT_MODE
            engine = sa.create_engine(url, connect_args=options, pool_pre_ping=True)
        except (sa.exc.ArgumentError, ImportError) as error:
            # ArgumentError's text would repeat the URL, password included
            missing = f": driver {error.name} is not installed" if isinstance(error, ImportError) else ""
            raise PermanentSinkError(f"{self!r}: not a usable database URL{missing}") from None
        except OSError as error:
            raise PermanentSinkError(f"{self!r}: cannot create the database's directory: {error}") from None
        if engine.dialect.name == "sqlite":
            sa.event.listen(engine, "connect", _sqlite_connected)
            sa.event.listen(engine, "begin", _sqlite_begin)
        return engine

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

    # --- applying a batch --------------------------------------------------------------------

    def _transaction(self, batch: Batch, careful: bool) -> None:
        """Apply ``batch`` in one transaction; ``careful``: one event at a time, naming a failure's seq."""
        seq = None  # the event being written, when careful
        try:
            with self._engine.begin() as conn:
                found = conn.execute(
                    sa.select(runrelay_run.c.run_id, runrelay_run.c.applied_seq, runrelay_run.c.death_reason)
                    .where(runrelay_run.c.uid == batch.run)
                    .with_for_update()
                ).first()
                new = self._unapplied(conn, batch, found.applied_seq if found else -1)
                if not new:
                    return
                run_id = found.run_id if found else self._create_run(conn, batch.run, new)
                state = batch.state
                revived = found is not None and found.death_reason is not None and state.death is None
                plan = _plan(new, revived)
                for events in [[event] for event in new] if careful else [new]:
                    seq = events[0].seq if careful else None
                    self._write(conn, batch.run, run_id, state, events, plan)
                seq = new[-1].seq if careful else None
                self._finish(conn, batch, new)
        except _CONVERTED as error:
            raise self._converted(error, batch.run, seq) from None

    def _unapplied(self, conn: sa.Connection, batch: Batch, applied: int) -> list[Event]:
        if not batch.redelivery:
            return [event for event in batch.events if event.seq > applied]
        done = set(
            conn.execute(
                sa.select(runrelay_redelivered.c.seq).where(
                    runrelay_redelivered.c.uid == batch.run,
                    runrelay_redelivered.c.seq.in_([event.seq for event in batch.events]),
                )
            ).scalars()
        )
        return [event for event in batch.events if event.seq not in done]

    def _create_run(self, conn: sa.Connection, uid: str, new: list[Event]) -> str:
        """Give a new run its Sacred run id, recorded beside its uid: the ``_id`` Sacred was
        given if it is free, else SqlObserver's rule (0 for the first run, then the highest
        ``run.id`` + 1)."""
        given = next((e.body.get("sacred_id") for e in new if e.kind in (Kind.QUEUED, Kind.STARTED)), None)
        run_id = None if given is None else str(given)
        taken = sa.select(run.c.id).where(run.c.run_id == run_id)
        if run_id is None or len(run_id) > RUN_ID_WIDTH or conn.execute(taken).first():
            last = conn.execute(sa.select(run.c.id).order_by(run.c.id.desc()).limit(1)).scalar()
            run_id = "0" if last is None else str(last + 1)
        try:
            conn.execute(run.insert().values(run_id=run_id))
            conn.execute(runrelay_run.insert().values(uid=uid, run_id=run_id, applied_seq=-1))
        except sa.exc.IntegrityError:
            raise TransientSinkError(
                f"{self!r}: run {uid}: another writer took run id {run_id} at the same moment; retrying"
            ) from None
        return run_id

    def _write(
        self, conn: sa.Connection, uid: str, run_id: str, state: RunState, events: list[Event], plan: dict
    ) -> None:
        """Insert the rows ``events`` add, then update the run-row columns they own."""
        values = self._add_rows(conn, uid, run_id, events, plan)
        columns = frozenset().union(*(plan.get(event.seq, ()) for event in events))
        values.update({column: derive(state) for column, derive in _FROM_STATE.items() if column in columns})
        if "captured_out" in columns:
            values["captured_out"] = self._captured_out(state.captured_out)
        if values:
            self._check_size(values)
            conn.execute(run.update().where(run.c.run_id == run_id).values(**values))
        ours = {}
        if "result" in columns:
            ours["result"] = _sacred_json(state.result)
        if "status" in columns:
            ours["death_reason"] = None if state.death is None else str(state.death.get("reason") or "")
        if ours:
            self._check_size(ours)
            conn.execute(runrelay_run.update().where(runrelay_run.c.uid == uid).values(**ours))

    def _add_rows(self, conn: sa.Connection, uid: str, run_id: str, events: list[Event], plan: dict) -> dict[str, int]:
        """Metric points, artifacts, resources; the experiment and host rows of the batch's
        last queued or started event, whose ids are returned for the run row."""
        ids = {}
        points = []
        sqlite = conn.dialect.name == "sqlite"
        for event in events:
            body = event.body
            if event.kind is Kind.METRICS:
                points.append(_metric_row(run_id, body, sqlite))
            elif event.kind is Kind.ARTIFACT:
                content = self._blob(uid, body["digest"], f"artifact {body['name']!r}")
                conn.execute(artifact.insert().values(filename=body["name"], content=content, run_id=run_id))
            elif event.kind is Kind.RESOURCE:
                what = f"resource {body['filename']!r}"
                key = {"filename": body["filename"], "md5sum": body["md5"]}
                found = _get_or_create(conn, resource, key, lambda: {"content": self._blob(uid, body["digest"], what)})
                conn.execute(runs_resources.insert().values(run_id=run_id, resource_id=found))
            elif "experiment_id" in plan.get(event.seq, ()):
                ids["experiment_id"] = self._experiment(conn, uid, body)
                ids["host_id"] = _host(conn, _untuple(body.get("host_info") or {}))
        if points:
            _insert_points(conn, points)
        return ids

    def _finish(self, conn: sa.Connection, batch: Batch, new: list[Event]) -> None:
        """Record what has been applied, in the batch's transaction."""
        if batch.redelivery:  # the cursor has passed these events: remember them one by one
            conn.execute(runrelay_redelivered.insert(), [{"uid": batch.run, "seq": event.seq} for event in new])
        else:
            update = runrelay_run.update().where(runrelay_run.c.uid == batch.run)
            conn.execute(update.values(applied_seq=new[-1].seq))

    def _experiment(self, conn: sa.Connection, uid: str, body: dict) -> int:
        """Sacred's Experiment.get_or_create: one row per distinct experiment info."""
        ex_info = _untuple(body.get("ex_info") or {})
        key = {"name": ex_info.get("name"), "md5sum": hashlib.md5(json.dumps(ex_info).encode()).hexdigest()}
        found = _find(conn, experiment, key)
        if found is not None:
            return found
        experiment_id = _insert(conn, experiment, {**key, "base_dir": ex_info.get("base_dir")})
        blobs = {entry["name"]: entry["digest"] for entry in body.get("sources") or []}
        requirements = ex_info.get("dependencies", [])
        dependencies = [_get_or_create(conn, dependency, _requirement(text)) for text in requirements]
        sources = [self._source(conn, uid, name, md5, blobs) for name, md5 in ex_info.get("sources", [])]
        repositories = [
            _get_or_create(conn, repository, {column: repo.get(column) for column in ("url", "commit", "dirty")})
            for repo in ex_info.get("repositories", [])
        ]
        for table, column, ids in (
            (experiments_dependencies, "dependency_id", dependencies),
            (experiments_sources, "source_id", sources),
            (experiments_repositories, "repository_id", repositories),
        ):
            rows = [{"experiment_id": experiment_id, column: id_} for id_ in dict.fromkeys(ids)]  # linked once
            if rows:
                conn.execute(table.insert(), rows)
        return experiment_id

    def _source(self, conn: sa.Connection, uid: str, name: str, md5: str, blobs: dict[str, str]) -> int:
        def content() -> dict:
            return {"content": self._blob(uid, blobs[name], f"source {name!r}").decode("utf-8")}

        return _get_or_create(conn, source, {"filename": name, "md5sum": md5}, content)

    # --- values ------------------------------------------------------------------------------

    def _blob(self, uid: str, digest: str, what: str) -> bytes:
        path = self.blobs(uid, digest)
        size = path.stat().st_size
        if size > self._max_value_bytes:
            raise ValueError(f"{what} is {size} bytes; {self._too_large_hint()}")
        return path.read_bytes()

    def _captured_out(self, text: str) -> str:
        """The output as stored: valid UTF-8, no NUL on PostgreSQL, cut from the front to
        half the value limit (a marker says how much was cut)."""
        data = text.encode("utf-8", "replace")  # lone surrogates fit no database
        if self._engine.dialect.name == "postgresql":
            data = data.replace(b"\x00", "\ufffd".encode())
        budget = self._max_value_bytes // 2
        if len(data) > budget:
            data = CUT_MARKER.format(len(data) - budget).encode() + data[-budget:]
        return data.decode("utf-8", "ignore")  # "ignore": the cut may split a character

    def _check_size(self, values: dict) -> None:
        sizes = {name: len(v.encode("utf-8", "replace")) for name, v in values.items() if isinstance(v, str)}
        if sum(sizes.values()) > self._max_value_bytes:
            detail = ", ".join(f"{name} {size} bytes" for name, size in sizes.items() if size)
            raise ValueError(f"the run's {detail}: together {self._too_large_hint()}")

    def _too_large_hint(self) -> str:
        hint = " (raise the server's max_allowed_packet)" if self._engine.dialect.name in _MYSQL_DIALECTS else ""
        return f"more than the {self._max_value_bytes} this database takes in one write{hint}"

    # --- errors ------------------------------------------------------------------------------

    def _converted(self, error: BaseException, uid: str | None = None, seq: int | None = None) -> Exception:
        where = "".join([f" run {uid}" if uid else "", f" seq {seq}" if seq is not None else ""])
        message = f"{self!r}{where}: {_summary(error)}"
        if _permanent(error):
            return PermanentSinkError(message, seq=seq)
        return TransientSinkError(message)


# --- helpers -------------------------------------------------------------------------------------


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


def _plan(new: list[Event], revived: bool) -> dict[int, frozenset]:
    """The run-row columns each new event writes: those its kind sets that no later event
    of the batch sets again. When the batch withdraws a stored death verdict, its first
    event writes the status and stop time unless a later one does. Events that write no
    column (metric points, most of a batch) are left out."""
    plan, later = {}, frozenset()
    for event in reversed(new):
        sets = _SETS.get(event.kind)
        if sets:
            plan[event.seq] = sets - later
            later |= sets
    if revived:
        plan[new[0].seq] = plan.get(new[0].seq, frozenset()) | (_REVIVED - later)
    return plan


def _find(conn: sa.Connection, table: sa.Table, key: dict) -> int | None:
    primary = next(iter(table.primary_key))
    where = [table.c[name] == value for name, value in key.items()]
    return conn.execute(sa.select(primary).where(*where).order_by(primary).limit(1)).scalar()


def _insert(conn: sa.Connection, table: sa.Table, values: dict) -> int:
    return conn.execute(table.insert().values(**values)).inserted_primary_key[0]


def _get_or_create(conn: sa.Connection, table: sa.Table, key: dict, more: Callable[[], dict] = dict) -> int:
    """Sacred's get_or_create: the first row matching ``key``, else a new one (``more`` adds
    the other columns, read only when needed)."""
    found = _find(conn, table, key)
    return found if found is not None else _insert(conn, table, {**key, **more()})


def _host(conn: sa.Connection, host_info: dict) -> int:
    os_name, os_info = (list(host_info.get("os") or []) + [None, None])[:2]
    key = {
        "hostname": host_info.get("hostname"),
        "cpu": host_info.get("cpu"),
        "os": os_name,
        "os_info": os_info,
        "python_version": host_info.get("python_version"),
    }
    return _get_or_create(conn, host, key)


def _requirement(text: str) -> dict:
    """A dependency as Sacred splits it: ``name==version``."""
    name, _, version = text.partition("==")
    return {"name": name, "version": version}


_METRIC_COLUMNS = ("run_id", "name", "step", "value", "nonfinite", "timestamp")


def _sqlite_time(value: dt.datetime) -> str:
    """SQLAlchemy's storage format for DateTime on SQLite (which its reader parses back),
    made with isoformat: strftime took a fifth of the metric insert time."""
    text = value.isoformat(" ")
    return text if value.microsecond else text + ".000000"


def _insert_points(conn: sa.Connection, points: list[tuple]) -> None:
    """Metric rows straight through the driver, in the batch's transaction: SQLAlchemy's
    per-row parameter processing was a quarter of the replay time for metric batches."""
    if conn.dialect.name == "postgresql":
        statement = f"COPY {metric.name} ({', '.join(_METRIC_COLUMNS)}) FROM STDIN"
        driver_error = conn.dialect.loaded_dbapi.Error
        try:
            with conn.connection.driver_connection.cursor() as cursor, cursor.copy(statement) as copy:
                for point in points:
                    copy.write_row(point)
        except driver_error as error:  # raw driver errors: wrap them as SQLAlchemy would
            raise sa.exc.DBAPIError.instance(statement, None, error, driver_error, dialect=conn.dialect) from None
    else:
        conn.exec_driver_sql(_metric_insert_sql(conn.dialect), points)


def _metric_insert_sql(dialect: sa.Dialect) -> str:
    marker = "?" if dialect.paramstyle == "qmark" else "%s"
    names = ", ".join(dialect.identifier_preparer.quote(name) for name in _METRIC_COLUMNS)
    return f"INSERT INTO {metric.name} ({names}) VALUES ({', '.join([marker] * len(_METRIC_COLUMNS))})"


def _metric_row(run_id: str, body: dict, sqlite: bool) -> tuple:
    value, step = body["value"], body["step"]
    if not isinstance(value, (int, float)):
        raise ValueError(f"metric {body['name']!r}: value {value!r} is not a number")
    if isinstance(step, float) and step.is_integer():
        step = int(step)
    if step is not None and type(step) is not int:  # else the driver's "cannot bind" looks transient
        raise ValueError(f"metric {body['name']!r}: step {step!r} is not an integer")
    number = float(value)
    finite = math.isfinite(number)
    timestamp = _naive_utc(body["timestamp"])
    if sqlite and timestamp is not None:
        timestamp = _sqlite_time(timestamp)
    # a non-finite value is NULL plus 'nan', 'inf' or '-inf', which float() reads back
    return run_id, body["name"], step, number if finite else None, None if finite else repr(number), timestamp


def _finite(value: Any) -> float | None:
    """``value`` for Sacred's numeric columns: a finite number, else None."""
    if not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _naive_utc(value: dt.datetime | None) -> dt.datetime | None:
    """Naive UTC, as Sacred's observers store times (columns without a time zone)."""
    if value is None or value.tzinfo is None:
        return value
    return value.astimezone(dt.timezone.utc).replace(tzinfo=None)


def _untuple(value: Any) -> Any:
    """Undo ``flatten``'s tuple form ({"py/tuple": [...]}), so ``json.dumps`` sees what it
    saw in Sacred (tuples as lists): Sacred's experiment md5 is taken over that text."""
    if isinstance(value, dict):
        if value.keys() == {"py/tuple"}:
            return _untuple(value["py/tuple"])
        return {key: _untuple(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_untuple(item) for item in value]
    return value


def _sacred_json(value: Any) -> str:
    """``json.dumps(flatten(value))``, as Sacred's SqlObserver stores config and info. The
    journal keeps datetimes as datetimes; they are put back in jsonpickle's form here."""
    return json.dumps(value, default=_pickled_datetime)


def _pickled_datetime(value: Any) -> dict:
    if not isinstance(value, dt.datetime):
        raise TypeError(f"a {type(value).__name__} cannot be stored as JSON")
    state = _naive_utc(value).__reduce__()[1][0]  # the 10 bytes pickle keeps
    reduced = [{"py/type": "datetime.datetime"}, [base64.b64encode(state).decode("ascii")]]
    return {"py/object": "datetime.datetime", "__reduce__": reduced}


def _permanent(error: BaseException) -> bool:
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
    if isinstance(error, OSError):
        return isinstance(error, FileNotFoundError)  # a blob that is gone stays gone
    # a value that cannot be converted (bind processing, our own checks), or a malformed body
    return isinstance(error, (sa.exc.StatementError, ValueError, TypeError, LookupError, ArithmeticError,
                              AttributeError))


def _summary(error: BaseException) -> str:
    """One line about ``error``: the driver's message, never the statement or its parameters."""
    cause = error.orig if isinstance(error, sa.exc.DBAPIError) else error
    lines = str(cause).strip().splitlines() or [""]
    return f"{type(cause).__name__}: {lines[0][:ERROR_TEXT_CHARS]}"

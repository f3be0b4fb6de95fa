"""The SQL sink: runs in Sacred's ``SqlObserver`` tables (sinks/sql_tables.py), one
transaction per batch, or per group of several runs' batches (``apply_runs``).

SQLite (the default), PostgreSQL (psycopg 3) and MariaDB/MySQL (PyMySQL) through
SQLAlchemy Core; connecting and error classification in sinks/sql_engine.py. The layout,
URL forms and the effectively-once scheme are described in docs/sinks.md; where it
differs from Sacred's own observer, docs/compatibility.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import math
import os
from typing import Any, Callable, Iterable, Iterator, Sequence

import sqlalchemy as sa

from runrelay.eventlog.fold import REVIVED, RunState, death_trace
from runrelay.sinks import sacred, sql_engine
from runrelay.sinks.base import (
    Batch, PermanentSinkError, RunSource, SilentRun, Sink, TakesCentralVerdicts, TransientSinkError, UnusableSinkError,
)
from runrelay.sinks.sql_tables import (
    MYSQL_DIALECTS, NAME_WIDTH, RUN_ID_WIDTH, artifact, dependency, experiment, experiments_dependencies,
    experiments_repositories, experiments_sources, host, metadata, metric, repository, resource, run,
    runrelay_host, runrelay_redelivered, runrelay_run, runrelay_run_host, runs_resources, source,
)

# The largest single value (artifact, config, output) sent in one statement. MySQL takes
# less: half its max_allowed_packet (escaping can double binary data), less a margin.
DEFAULT_MAX_VALUE_BYTES = 256 * 1024 * 1024
MYSQL_PACKET_MARGIN = 1024 * 1024
SCHEMA_LOCK_NAME = "runrelay_schema"  # MySQL named lock held while creating tables
SCHEMA_LOCK_KEY = int.from_bytes(b"runrelay", "big")  # PostgreSQL advisory lock key
SCHEMA_LOCK_SECONDS = 60
RUNS_PER_QUERY = 500  # uids in one IN (...) of applied_runs: within every backend's parameter limit

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
    "status": lambda state: sacred.stored_status(state.status),
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


class SqlSink(Sink, TakesCentralVerdicts):
    """Runs in Sacred's SqlObserver tables, one transaction per batch or per group of
    several runs' batches (docs/sinks.md).

    Effectively once: ``runrelay_run`` holds each run's uid, its Sacred run id and the
    highest seq applied; it is read (``FOR UPDATE``; SQLite: ``BEGIN IMMEDIATE``) and
    advanced in the same transaction as the batch's writes, and the batch's part at or
    below it is skipped. A group's runs are locked in uid order, so that two writers of
    the same runs never wait for each other in a cycle. A re-delivered dead letter is recorded in ``runrelay_redelivered``
    in its transaction instead. Driver errors become TransientSinkError, PermanentSinkError
    (a value the database cannot take) or UnusableSinkError (no such database, refused
    credentials, a file that cannot be opened); see docs/sinks.md.
    """

    def __init__(self, name: str, url: str, options: dict, source: RunSource):
        super().__init__(name, url, options, source)
        self._url = sql_engine.engine_url(url)
        self._engine: sa.Engine | None = None
        self._max_value_bytes = DEFAULT_MAX_VALUE_BYTES
        self._ids = _Ids()
        self._deadline: sql_engine.Deadline | None = None

    @classmethod
    def identity(cls, url: str) -> str:
        return sql_engine.identity(url)

    # --- the Sink verbs ----------------------------------------------------------------------

    def open(self) -> None:
        if self._engine is None:
            try:
                self._engine, self._deadline = sql_engine.create_engine(self._url, self.timeout_seconds)
            except OSError as error:  # the SQLite file or its directory
                raise UnusableSinkError(f"{self!r}: cannot create the database file: {error}") from None
        with self._transaction() as conn:
            self._create_tables(conn)
            self._max_value_bytes = self._value_limit(conn)

    def applied(self, run: str) -> int:
        return self.applied_runs([run])[run]

    def applied_runs(self, runs: Iterable[str]) -> dict[str, int]:
        runs = list(runs)
        found = {}
        with self._transaction(_only_run(runs)) as conn:
            for start in range(0, len(runs), RUNS_PER_QUERY):
                chunk = runs[start:start + RUNS_PER_QUERY]
                found.update(conn.execute(sa.select(runrelay_run.c.uid, runrelay_run.c.applied_seq)
                                          .where(runrelay_run.c.uid.in_(chunk))).all())
        return {run: found.get(run, -1) for run in runs}

    def apply(self, batch: Batch) -> None:
        self.apply_runs([batch])

    def apply_runs(self, batches: Sequence[Batch]) -> None:
        """All the batches in one transaction (one commit), each run's applied seq with its writes."""
        self._write(sorted(batches, key=lambda batch: batch.run), redelivery=False)

    def redeliver(self, batch: Batch) -> None:
        self._write([batch], redelivery=True)

    def close(self) -> None:
        if self._deadline is not None:
            self._deadline.stop()
            self._deadline = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    # --- connecting --------------------------------------------------------------------------

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
        elif dialect in MYSQL_DIALECTS:  # DDL commits in MySQL: a session lock, released below
            locked = conn.execute(
                sa.text("SELECT GET_LOCK(:name, :seconds)"), {"name": SCHEMA_LOCK_NAME, "seconds": SCHEMA_LOCK_SECONDS}
            ).scalar()
            if locked != 1:
                raise TransientSinkError(f"{self!r}: another process holds {SCHEMA_LOCK_NAME} (creating tables)")
        try:
            metadata.create_all(conn)  # SQLite: serialized by BEGIN IMMEDIATE
        finally:
            if dialect in MYSQL_DIALECTS:
                conn.execute(sa.text("SELECT RELEASE_LOCK(:name)"), {"name": SCHEMA_LOCK_NAME})

    def _value_limit(self, conn: sa.Connection) -> int:
        if conn.dialect.name not in MYSQL_DIALECTS:
            return DEFAULT_MAX_VALUE_BYTES
        packet = conn.execute(sa.text("SELECT @@max_allowed_packet")).scalar()
        return min(DEFAULT_MAX_VALUE_BYTES, (int(packet) - MYSQL_PACKET_MARGIN) // 2)

    # --- writing a batch ---------------------------------------------------------------------

    def _write(self, batches: Sequence[Batch], redelivery: bool) -> None:
        """The batches in one transaction. What does not vary per run (the lock, the new
        runs' rows, the metric points, ``runrelay_run``) is sent once for the group: on a
        server each statement is a round trip."""
        self._ids.begin()
        with self._transaction(_only_run([batch.run for batch in batches])) as conn:
            found = self._locked(conn, [batch.run for batch in batches])
            group = _GroupWrites()
            planned = [plan for batch in batches
                       if (plan := self._plan(conn, batch, redelivery, found.get(batch.run), group))]
            self._create_runs(conn, [plan for plan in planned if plan.run_id is None])
            for plan in planned:
                self._write_rows(conn, plan, group)
            group.send(conn)
        self._ids.committed()

    def _locked(self, conn: sa.Connection, runs: list[str]) -> dict[str, Any]:
        """The ``runrelay_run`` rows of these runs, locked in uid order (SQLite: the whole
        database, by ``BEGIN IMMEDIATE``)."""
        found = {}
        runs = sorted(runs)
        for start in range(0, len(runs), RUNS_PER_QUERY):
            chunk = runs[start:start + RUNS_PER_QUERY]
            query = (sa.select(runrelay_run.c.uid, runrelay_run.c.run_id, runrelay_run.c.applied_seq,
                               runrelay_run.c.death_reason)
                     .where(runrelay_run.c.uid.in_(chunk)).order_by(runrelay_run.c.uid).with_for_update())
            found.update((row.uid, row) for row in conn.execute(query))
        return found

    def _plan(self, conn: sa.Connection, batch: Batch, redelivery: bool, found, group: "_GroupWrites"):
        """What a batch writes to its run row and ``runrelay_run``; None when it is written."""
        part = self._unwritten(conn, batch, redelivery, found)
        if part is None:
            return None
        if found is not None and found.death_reason is not None and part.state.death is None:
            part = dataclasses.replace(part, changed=part.changed | REVIVED)  # undo a central verdict
        values = {**self._run_columns(part), **self._shared_rows(conn, part, new=found is None, group=group)}
        self._check_size(values)
        if redelivery:
            group.redelivered.append({"uid": batch.run, "seq": batch.last_seq})
        return _Planned(part, None if found is None else found.run_id, values, self._bookkeeping(part, redelivery))

    def _create_runs(self, conn: sa.Connection, new: list["_Planned"]) -> None:
        """The rows of new runs, each under its Sacred run id (docs/sinks.md, "Run ids")."""
        if not new:
            return
        for plan, run_id in zip(new, _new_run_ids(conn, [plan.batch.state.sacred_id for plan in new])):
            plan.run_id = run_id
        try:
            for rows in _by_columns([{"run_id": plan.run_id, **plan.values} for plan in new]):
                conn.execute(run.insert(), rows)
            conn.execute(runrelay_run.insert(), [
                {"uid": plan.batch.run, "run_id": plan.run_id, "result": None, "death_reason": None,
                 **plan.bookkeeping, "applied_seq": plan.bookkeeping.get("applied_seq", -1)} for plan in new])
        except sa.exc.IntegrityError:
            raise TransientSinkError(
                f"{self!r}: another writer created one of these {len(new)} runs or took its run id at the same "
                "moment; retrying") from None
        for plan in new:
            plan.values, plan.bookkeeping = {}, {}  # written whole

    def _write_rows(self, conn: sa.Connection, plan: "_Planned", group: "_GroupWrites") -> None:
        if plan.values:
            conn.execute(run.update().where(run.c.run_id == plan.run_id).values(**plan.values))
        if plan.bookkeeping:
            group.applied.append({"_uid": plan.batch.run, **plan.bookkeeping})
        self._add_rows(conn, plan.run_id, plan.batch, group)

    def _unwritten(self, conn: sa.Connection, batch: Batch, redelivery: bool, found) -> Batch | None:
        if not redelivery:
            return batch.after(-1 if found is None else found.applied_seq)
        if batch.first_seq != batch.last_seq:
            raise ValueError("a re-delivery carries one dead letter")  # the daemon's contract
        done = conn.execute(sa.select(runrelay_redelivered.c.seq).where(
            runrelay_redelivered.c.uid == batch.run, runrelay_redelivered.c.seq == batch.last_seq)).first()
        return None if done else batch

    def _add_rows(self, conn: sa.Connection, run_id: str, batch: Batch, group: "_GroupWrites") -> None:
        """Metric points (sent with the group), artifacts, resources."""
        if len(batch.points):
            group.points.extend(_metric_rows(run_id, batch.points, conn.dialect.name == "sqlite"))
        for entry in batch.artifacts:
            content = self._blob(batch.run, entry, f"artifact {entry['name']!r}")
            conn.execute(artifact.insert().values(filename=sacred.stored_name(entry["name"]), content=content,
                                                  run_id=run_id))
        for entry in batch.resources:
            key = {"filename": entry["filename"], "md5sum": entry["md5"]}
            found = self._ids.get_or_create(
                conn, resource, key, lambda: {"content": self._blob(batch.run, entry, f"resource {key['filename']!r}")})
            conn.execute(runs_resources.insert().values(run_id=run_id, resource_id=found))

    def _shared_rows(self, conn: sa.Connection, batch: Batch, new: bool, group: "_GroupWrites") -> dict[str, int]:
        """For a queued or started event: the experiment and host rows, whose ids are
        returned for the run row, and the host the run's process is on."""
        if "process" in batch.changed and isinstance((batch.state.process or {}).get("host"), str):
            if new or not self._has_host(conn, batch.run):  # a new run has no host row yet
                group.hosts.append({"uid": batch.run, "host": batch.state.process["host"][:NAME_WIDTH]})
        if "experiment" not in batch.changed:
            return {}
        return {"experiment_id": self._experiment(conn, batch),
                "host_id": self._ids.get_or_create(conn, host, sacred.host_key(batch.state.host))}

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

    def _has_host(self, conn: sa.Connection, uid: str) -> bool:
        return conn.execute(sa.select(runrelay_run_host.c.uid).where(runrelay_run_host.c.uid == uid)).first() is not None

    # --- central verdicts (docs/daemon.md, "Dead runs") --------------------------------------

    def report_host(self, host_name: str, at: dt.datetime) -> None:
        host_name = host_name[:NAME_WIDTH]
        with self._transaction() as conn:
            seen = runrelay_host.update().where(runrelay_host.c.host == host_name).values(seen_time=at)
            if conn.execute(seen).rowcount == 0:
                conn.execute(runrelay_host.insert().values(host=host_name, seen_time=at))

    def silent_runs(self, host_silent_since: dt.datetime, heartbeat_before: dt.datetime) -> list[SilentRun]:
        beat = _last_beat()
        query = (
            sa.select(runrelay_run.c.uid, runrelay_run_host.c.host, beat.label("heartbeat"), runrelay_host.c.seen_time)
            .select_from(runrelay_run)
            .join(run, run.c.run_id == runrelay_run.c.run_id)
            .join(runrelay_run_host, runrelay_run_host.c.uid == runrelay_run.c.uid)
            .outerjoin(runrelay_host, runrelay_host.c.host == runrelay_run_host.c.host)
            .where(run.c.status == "RUNNING", beat < heartbeat_before,
                   sa.or_(runrelay_host.c.seen_time.is_(None), runrelay_host.c.seen_time < host_silent_since))
        )
        with self._transaction() as conn:
            return [SilentRun(*row) for row in conn.execute(query)]

    def mark_dead(self, silent: SilentRun, status: str, reason: str) -> bool:
        with self._transaction(silent.uid) as conn:  # runrelay_run locked first, as a batch does
            found = conn.execute(sa.select(runrelay_run.c.run_id).where(runrelay_run.c.uid == silent.uid)
                                 .with_for_update()).first()
            if found is None:
                return False
            still = run.update().where(run.c.run_id == found.run_id, run.c.status == "RUNNING",
                                       _last_beat() == silent.heartbeat)
            trace = "".join(death_trace(reason))
            if conn.execute(still.values(status=status, stop_time=silent.heartbeat, fail_trace=trace)).rowcount != 1:
                return False  # changed meanwhile: delivered again, or another watchdog was first
            conn.execute(runrelay_run.update().where(runrelay_run.c.uid == silent.uid).values(death_reason=reason))
        return True

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
        hint = " (raise the server's max_allowed_packet)" if self._url.get_backend_name() in MYSQL_DIALECTS else ""
        return f"more than the {self._max_value_bytes} this database takes in one write{hint}"

    # --- errors ------------------------------------------------------------------------------

    def _converted(self, error: sa.exc.SQLAlchemyError, run_uid: str | None) -> Exception:
        message = f"{self!r}{f' run {run_uid}' if run_uid else ''}: {sql_engine.summary(error)}"
        return sql_engine.classified(error, message)




def _only_run(runs: Sequence[str]) -> str | None:
    """The run an error names: the one run, or none for several (each names itself when the
    daemon applies them one by one)."""
    return runs[0] if len(runs) == 1 else None


def _last_beat() -> sa.ColumnElement:
    """The run's heartbeat, or its start before the first beat."""
    return sa.func.coalesce(run.c.heartbeat, run.c.start_time)


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

    def begin(self) -> None:
        """Forget what an earlier transaction found if it never committed (its rows are gone)."""
        self._pending.clear()

    def committed(self) -> None:
        self._known.update(self._pending)
        self._pending.clear()


@dataclasses.dataclass
class _Planned:
    """A batch to write: its run id (None for a new run, until it is given one), its run
    row's values and its ``runrelay_run`` columns."""

    batch: Batch
    run_id: str | None
    values: dict[str, Any]
    bookkeeping: dict[str, Any]


def _new_run_ids(conn: sa.Connection, given: list[int | str | None]) -> list[str]:
    """Run ids for new runs, in order, by SqlObserver's rule: the ``_id`` Sacred settled on
    if it is free and fits, else 0 for the first run and then the highest ``run.id`` + 1,
    where each new row's ``run.id`` is taken to be one more than the last (so the highest is
    read once). An id of the rule that is already taken (a handed ``_id`` that looked like a
    number) is passed over for the next free one."""
    wanted = [None if value is None or len(str(value)) > RUN_ID_WIDTH else str(value) for value in given]
    taken = _taken_run_ids(conn, [value for value in wanted if value is not None])
    highest = conn.execute(sa.select(sa.func.max(run.c.id))).scalar()
    ids: list[str | None] = []
    for value in wanted:
        if value is not None and value not in taken:
            ids.append(value)
            taken.add(value)
        else:
            ids.append("0" if highest is None else str(highest + 1))
        highest = (highest or 0) + 1
    ruled = [index for index, value in enumerate(wanted) if ids[index] != value]
    handed = {ids[index] for index in range(len(ids))} - {ids[index] for index in ruled}
    pending = ruled
    while pending:
        clash = _taken_run_ids(conn, [ids[index] for index in pending]) | handed
        pending = [index for index in pending if ids[index] in clash]
        beyond = max(int(ids[index]) for index in ruled) + 1
        for number, index in enumerate(pending, start=beyond):
            ids[index] = str(number)
    return ids


def _taken_run_ids(conn: sa.Connection, run_ids: list[str]) -> set[str]:
    taken = set()
    for start in range(0, len(run_ids), RUNS_PER_QUERY):
        chunk = run_ids[start:start + RUNS_PER_QUERY]
        taken.update(conn.execute(sa.select(run.c.run_id).where(run.c.run_id.in_(chunk))).scalars())
    return taken


@dataclasses.dataclass
class _GroupWrites:
    """What a group's batches write with one statement each, after every batch's own
    writes: the metric points, the ``runrelay_run`` updates, hosts and re-deliveries."""

    points: list[tuple] = dataclasses.field(default_factory=list)
    applied: list[dict] = dataclasses.field(default_factory=list)
    hosts: list[dict] = dataclasses.field(default_factory=list)
    redelivered: list[dict] = dataclasses.field(default_factory=list)

    def send(self, conn: sa.Connection) -> None:
        if self.points:
            _insert_points(conn, self.points)
        for rows in _by_columns(self.applied):
            conn.execute(runrelay_run.update().where(runrelay_run.c.uid == sa.bindparam("_uid")), rows)
        if self.hosts:
            conn.execute(runrelay_run_host.insert(), self.hosts)
        if self.redelivered:  # refers to runrelay_run: last
            conn.execute(runrelay_redelivered.insert(), self.redelivered)


def _by_columns(rows: list[dict]) -> Iterator[list[dict]]:
    """Rows grouped by the columns they set, for one executemany each (``_uid`` names the row)."""
    groups: dict[tuple[str, ...], list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(sorted(row)), []).append(row)
    yield from groups.values()


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
    names = sacred.stored_names(points.names)
    return list(zip([run_id] * len(values), names, points.steps, values, nonfinite, timestamps))


def _sqlite_time(value: dt.datetime) -> str:
    """SQLAlchemy's storage format for DateTime on SQLite (which its reader parses back),
    made with isoformat: strftime took a fifth of the metric insert time."""
    text = value.isoformat(" ")
    return text if value.microsecond else text + ".000000"


def _insert_points(conn: sa.Connection, rows: list[tuple]) -> None:
    """Metric rows straight through the driver, in the batch's transaction: SQLAlchemy's
    per-row parameter processing was a quarter of the replay time for metric batches."""
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

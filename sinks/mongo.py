"""The Mongo sink: runs in Sacred's MongoObserver layout (``runs``, ``metrics``, GridFS
``fs``), read unchanged by Omniboard, incense and Sacredboard.

Effectively once without transactions (a standalone mongod has none): every write is
idempotent on its own, and the run document's ``runrelay.applied`` is advanced last, in
the same single-document update as the run's fields, conditional on the value read at the
batch's start. docs/sinks.md describes the scheme; docs/compatibility.md the deviations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import math
import mimetypes
import os
from typing import Any, Iterator

from runrelay.eventlog.fold import REVIVED, RunState, death_trace
from runrelay.sinks import mongo_client, sacred
from runrelay.sinks.base import (
    Batch, PermanentSinkError, RunSource, SilentRun, Sink, SinkConfigError, TakesCentralVerdicts, TransientSinkError,
    death_reason, run_host,
)

FORMAT = "MongoObserver-0.7.0"  # what Sacred's MongoObserver writes in "format"
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024  # MongoDB's BSON document limit
DOCUMENT_MARGIN = 64 * 1024  # room for the runrelay fields and the update's own bytes
OUTPUT_BUDGET = 8 * 1024 * 1024  # captured output kept in a run document, at most
DEFAULT_POINTS_PER_DOCUMENT = 250_000  # ≈12 MB of steps, values and timestamps
ID_ATTEMPTS = 20  # integer ids tried before a run's creation is called transient
PART_NAME = "{name} [runrelay part {part}]"  # a metric's continuation document
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # BSON's widest integer


def _points_option(value: Any) -> int:
    if type(value) is not int or not 1 <= value <= DEFAULT_POINTS_PER_DOCUMENT:
        raise SinkConfigError(f"expected a whole number from 1 to {DEFAULT_POINTS_PER_DOCUMENT}, got {value!r}")
    return value


# --- the run document's fields each RunState field sets --------------------------------------

_UNSET_WHEN_NONE = ("stop_time", "fail_trace")


class MongoSink(Sink, TakesCentralVerdicts):
    """Runs in Sacred's MongoObserver layout (docs/sinks.md, docs/compatibility.md)."""

    OPTIONS = {
        **Sink.OPTIONS,
        "database": mongo_client.check_database,
        "prefix": mongo_client.check_prefix,
        "points_per_document": _points_option,
    }

    def __init__(self, name: str, url: str, options: dict, source: RunSource):
        super().__init__(name, url, options, source)
        named = mongo_client.parse(url)["database"]
        given = self.options.get("database")
        if named and given and named != given:
            raise SinkConfigError(f"the URL names database {named!r} but the option database is {given!r}")
        self.database_name = given or named or mongo_client.DEFAULT_DATABASE
        prefix = self.options.get("prefix", "")
        self.runs_name, self.metrics_name, self.bucket = f"{prefix}runs", f"{prefix}metrics", f"{prefix}fs"
        self.hosts_name = f"{prefix}runrelay_hosts"  # the daemons' reports that their host lives
        self.points_per_document = self.options.get("points_per_document", DEFAULT_POINTS_PER_DOCUMENT)
        self._client = None
        self._db = None
        self._known: dict[str, Known] = {}  # uid -> what this sink wrote for a live run

    @classmethod
    def identity(cls, url: str) -> str:
        return mongo_client.identity(url)

    # --- the Sink verbs ----------------------------------------------------------------------

    def open(self) -> None:
        with self._converted():
            if self._client is None:
                self._client = mongo_client.client(self.url, self.timeout_seconds)
                self._db = self._client[self.database_name]
            runs, metrics = self._db[self.runs_name], self._db[self.metrics_name]
            runs.create_index("runrelay.uid", unique=True, sparse=True, name="runrelay_uid")
            metrics.create_index([("run_id", 1), ("name", 1)], name="runrelay_run_id_name")
            self._db[f"{self.bucket}.files"].create_index([("filename", 1), ("uploadDate", 1)])
            self._db[f"{self.bucket}.chunks"].create_index([("files_id", 1), ("n", 1)], unique=True)

    def applied(self, run: str) -> int:
        with self._converted(run):
            known = self._found(run)
        return -1 if known is None else known.applied

    def apply(self, batch: Batch) -> None:
        with self._converted(batch.run):
            known = self._known.pop(batch.run, None) or self._found(batch.run)  # back only on success
            applied = -1 if known is None else known.applied
            part = batch.after(applied)
            if part is None:
                self._keep(batch, known)
                return
            if known is None:
                known = Known(self._create_run(part), applied)
            self._write(known, part, redelivery=False)
            update = self._update(known, part, {"runrelay.applied": part.last_seq})
            done = self._runs.update_one({"_id": known.run_id, "runrelay.applied": applied}, update)
            if done.matched_count != 1:
                raise TransientSinkError(f"{self!r} run {batch.run}: another writer advanced the run meanwhile")
            known.applied, known.listed = part.last_seq, known.listed or "info" in update["$set"]
            self._keep(batch, known)

    def redeliver(self, batch: Batch) -> None:
        if batch.first_seq != batch.last_seq:
            raise ValueError("a re-delivery carries one dead letter")  # the daemon's contract
        with self._converted(batch.run):
            self._known.pop(batch.run, None)  # its metric documents change outside their seq
            known = self._found(batch.run) or Known(self._create_run(batch), -1)
            self._write(known, batch, redelivery=True)
            self._runs.update_one({"_id": known.run_id}, self._update(known, batch, {}))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = self._db = None

    # --- connecting and errors ---------------------------------------------------------------

    @property
    def _runs(self):
        return self._db[self.runs_name]

    @property
    def _metrics(self):
        return self._db[self.metrics_name]

    @contextlib.contextmanager
    def _converted(self, run: str | None = None) -> Iterator[None]:
        import bson.errors
        import gridfs.errors
        import pymongo.errors

        try:
            yield
        except (pymongo.errors.PyMongoError, bson.errors.BSONError, gridfs.errors.GridFSError, OverflowError) as error:
            message = f"{self!r}{f' run {run}' if run else ''}: {mongo_client.summary(error)}"
            raise mongo_client.classified(error, message) from None

    # --- the run document --------------------------------------------------------------------

    def _found(self, uid: str) -> "Known | None":
        found = self._runs.find_one({"runrelay.uid": uid}, {"runrelay.applied": 1})
        return None if found is None else Known(found["_id"], found["runrelay"]["applied"])

    def _keep(self, batch: Batch, known: "Known | None") -> None:
        """Remember what was written for a live run: its next batch need not read it again.
        A failed batch is never kept (``apply`` took it out), so a retry reads the database."""
        if known is not None and not batch.state.ended:
            self._known[batch.run] = known

    def _create_run(self, batch: Batch) -> int:
        """Insert the run's document, its fields as of this batch and ``applied`` -1, under
        a new integer ``_id``: the ``_id`` Sacred settled on if it is an int and free, else
        Sacred's rule (the highest integer ``_id`` + 1, 1 for the first). The unique index on
        ``runrelay.uid`` makes a second document for one run impossible, whoever inserts it."""
        from pymongo.errors import DuplicateKeyError

        given = batch.state.sacred_id
        document = {**self._fields(None, batch.state, full=True),
                    "runrelay": {"uid": batch.run, "applied": -1, "death": death_reason(batch.state)}}
        self._check_size(document, batch)
        for _attempt in range(ID_ATTEMPTS):
            if type(given) is int and self._runs.find_one({"_id": given}, {"_id": 1}) is None:
                run_id = given
            else:
                last = list(self._runs.find({"_id": {"$type": "number"}}, {"_id": 1}).sort("_id", -1).limit(1))
                run_id = int(last[0]["_id"]) + 1 if last else 1
            try:
                self._runs.insert_one({"_id": run_id, **document})
                return run_id
            except DuplicateKeyError as error:
                if "runrelay.uid" in (error.details or {}).get("keyPattern", {}):
                    return self._runs.find_one({"runrelay.uid": batch.run}, {"_id": 1})["_id"]
                given = None  # another writer took that id at the same moment: the next one
        raise TransientSinkError(f"{self!r} run {batch.run}: {ID_ATTEMPTS} integer ids were taken meanwhile")

    def _fields(self, run_id: int | None, state: RunState, full: bool, changed: frozenset = frozenset()) -> dict:
        """The run document's fields from ``state``: all of them (``full``), else those the
        ``changed`` state fields set. Fields needing GridFS ids are left to ``_update``."""
        fields = storable(sacred.run_document(state) if full else sacred.run_fields_changed(state, changed))
        if "start_time" in fields:
            fields["format"] = FORMAT
        if full:
            fields.update(info=_info(state), artifacts=[], resources=[],
                          experiment=storable(sacred.untuple({**state.experiment, "sources": []})))
            fields["captured_out"] = self._output(state, fields)
        return fields

    def _update(self, known: "Known", batch: Batch, ours: dict) -> dict:
        """The update of the run document for ``batch``: ``$set`` of the sink's own fields
        only (Omniboard's ``omniboard.*`` survive), ``$unset`` of those that became empty."""
        state, changed = batch.state, _with_verdict_withdrawn(batch)
        fields = self._fields(known.run_id, state, full=False, changed=changed)
        if "experiment" in changed:
            fields["experiment"] = {**storable(sacred.untuple(state.experiment)), "sources": self._sources(batch)}
        if "artifacts" in changed:
            fields["artifacts"] = [{"name": sacred.stored_name(entry["name"]),
                                    "file_id": _file_id(batch.run, "artifact", entry["seq"])}
                                   for entry in state.artifacts]
        if "resources" in changed:
            fields["resources"] = list({(entry["filename"], entry["md5"]): [entry["filename"], entry["md5"]]
                                        for entry in state.resources}.values())
        if "info" in changed or (len(batch.points) and not known.listed):
            fields["info"] = {**_info(state), **self._metrics_info(known)}
        if "captured_out" in changed:
            fields["captured_out"] = self._output(state, fields)
        if "death" in changed:
            ours["runrelay.death"] = death_reason(state)
        ours["runrelay.host"] = run_host(state)  # every batch: a run started before runrelay recorded it gets it too
        unset = {name: "" for name in _UNSET_WHEN_NONE if name in fields and fields[name] is None}
        update = {"$set": {**{k: v for k, v in fields.items() if k not in unset}, **ours}}
        if unset:
            update["$unset"] = unset
        self._check_size(update["$set"], batch)
        return update

    def _output(self, state: RunState, fields: dict) -> str:
        """The captured output, its end kept within what the document has room for."""
        import bson

        others = sum(len(bson.encode({key: value})) for key, value in fields.items() if key != "captured_out")
        budget = max(0, min(OUTPUT_BUDGET, MAX_DOCUMENT_BYTES - DOCUMENT_MARGIN - others))
        return sacred.cut_front(state.captured_out, budget, "output", "too large for a MongoDB document")

    def _check_size(self, fields: dict, batch: Batch) -> None:
        import bson

        try:
            size = len(bson.encode(fields))
        except (bson.errors.InvalidDocument, OverflowError) as error:
            raise PermanentSinkError(f"{self!r} run {batch.run}: a value MongoDB cannot store: {error}") from None
        if size > MAX_DOCUMENT_BYTES - DOCUMENT_MARGIN:
            big = sorted(((len(bson.encode({k: v})), k) for k, v in fields.items()), reverse=True)[:3]
            detail = ", ".join(f"{name} {size} bytes" for size, name in big)
            raise PermanentSinkError(f"{self!r} run {batch.run}: the run document would pass MongoDB's 16 MB ({detail})")

    # --- central verdicts (docs/daemon.md, "Dead runs") --------------------------------------

    def report_host(self, host: str, at: dt.datetime) -> None:
        with self._converted():
            self._db[self.hosts_name].update_one({"_id": host}, {"$set": {"seen": at}}, upsert=True)

    def silent_runs(self, host_silent_since: dt.datetime, heartbeat_before: dt.datetime) -> list[SilentRun]:
        with self._converted():
            running = list(self._runs.find(
                {"status": "RUNNING", "runrelay.host": {"$type": "string"}, "heartbeat": {"$lt": heartbeat_before}},
                {"runrelay.uid": 1, "runrelay.host": 1, "heartbeat": 1}))
            hosts = {run["runrelay"]["host"] for run in running}
            seen = {found["_id"]: found.get("seen")
                    for found in self._db[self.hosts_name].find({"_id": {"$in": sorted(hosts)}})}
        silent = []
        for run in running:
            host = run["runrelay"]["host"]
            reported = seen.get(host) if isinstance(seen.get(host), dt.datetime) else None
            if reported is None or reported < host_silent_since:
                silent.append(SilentRun(run["runrelay"]["uid"], host, run["heartbeat"], reported))
        return silent

    def mark_dead(self, silent: SilentRun, status: str, reason: str) -> bool:
        """One conditional update_one: only while the run is still RUNNING with the heartbeat
        seen. ``stop_time`` is that heartbeat (Sacred's heartbeat field falls back to the start)."""
        verdict = {"status": status, "stop_time": silent.heartbeat, "fail_trace": list(death_trace(reason)),
                   "runrelay.death": reason}
        with self._converted(silent.uid):
            done = self._runs.update_one(
                {"runrelay.uid": silent.uid, "status": "RUNNING", "heartbeat": silent.heartbeat}, {"$set": verdict})
        return done.matched_count == 1

    # --- GridFS ------------------------------------------------------------------------------

    def _write(self, known: "Known", batch: Batch, redelivery: bool) -> None:
        """GridFS files and metric points of ``batch``; each write is idempotent."""
        run_id = known.run_id
        for entry in batch.artifacts:
            self._put(batch.run, entry, _file_id(batch.run, "artifact", entry["seq"]),
                      f"artifact {entry['name']!r}",
                      filename=f"artifact://{self.runs_name}/{run_id}/{sacred.stored_name(entry['name'])}",
                      metadata=storable(entry.get("metadata")), contentType=_content_type(entry))
        for entry in batch.resources:
            self._shared(batch.run, entry, entry["filename"], _file_id(batch.run, "resource", entry["seq"]), "resource")
        MetricWriter(self, known, batch, redelivery).write()

    def _sources(self, batch: Batch) -> list[list]:
        """``experiment.sources`` as Sacred writes it: [[relative name, GridFS id]]; the file
        is named by its absolute path, one already stored with that name and md5 reused."""
        blobs = {entry["name"]: entry for entry in batch.state.sources}
        base_dir = batch.state.experiment.get("base_dir") or ""
        sources = []
        for pair in batch.state.experiment.get("sources", []):
            name, md5 = sacred.untuple(pair)
            if name not in blobs:
                raise PermanentSinkError(f"{self!r} run {batch.run}: source {name!r} was not captured into the journal")
            file_id = self._shared(batch.run, {**blobs[name], "md5": md5}, os.path.join(base_dir, name),
                                   _file_id(batch.run, "source", name), "source")
            sources.append([name, file_id])
        return sources

    def _shared(self, uid: str, entry: dict, filename: str, file_id, what: str):
        """A source or resource: the file stored under ``filename`` with that md5, else ours."""
        found = self._db[f"{self.bucket}.files"].find_one({"filename": filename, "md5": entry["md5"]}, {"_id": 1})
        if found is not None:
            return found["_id"]
        self._put(uid, entry, file_id, f"{what} {filename!r}", filename=filename, md5=entry["md5"])
        return file_id

    def _put(self, uid: str, entry: dict, file_id, what: str, **fields) -> None:
        """Store a blob as the GridFS file ``file_id`` unless it is there. The files document
        is written after the chunks: a crash between leaves chunks no file names, removed here."""
        import gridfs

        files = self._db[f"{self.bucket}.files"]
        if files.find_one({"_id": file_id}, {"_id": 1}) is not None:
            return
        self._db[f"{self.bucket}.chunks"].delete_many({"files_id": file_id})
        try:
            with self.source.open_blob(uid, entry["digest"]) as blob:
                gridfs.GridFS(self._db, self.bucket).put(blob, _id=file_id, **fields)
        except (FileNotFoundError, ValueError) as error:
            raise PermanentSinkError(f"{self!r} run {uid}: {what}: {error}", entry.get("seq")) from None
        except gridfs.errors.FileExists:
            return  # stored meanwhile
        except OSError as error:
            raise TransientSinkError(f"{self!r} run {uid}: cannot read {what} from the journal: {error}") from None

    # --- metrics -----------------------------------------------------------------------------

    def _metrics_info(self, known: "Known") -> dict:
        """``info.metrics`` as Sacred writes it: {"id": str(ObjectId), "name"} per metric
        document, in the order they were made; nothing when the run has no metrics."""
        documents = sorted((document for documents in self._parts(known).values() for document in documents),
                           key=lambda document: document["_id"])
        listed = [{"id": str(document["_id"]), "name": document["name"]} for document in documents]
        return {"metrics": listed} if listed else {}

    def _parts(self, known: "Known") -> dict[str, list[dict]]:
        """The run's metric documents by metric name, each in part order, as ``Known.parts``
        holds them (read once per run and process, then kept up to date by its writes)."""
        if known.parts is None:
            known.parts = {}
            for document in self._metrics.find({"run_id": known.run_id}, {"name": 1, "runrelay": 1}).sort("_id", 1):
                ours = document.get("runrelay") or {"metric": document["name"], "part": 1, "seq": -1, "points": 0}
                known.parts.setdefault(ours["metric"], []).append(
                    {"_id": document["_id"], "name": document["name"], **ours})
            for documents in known.parts.values():
                documents.sort(key=lambda document: document["part"])
        return known.parts


@dataclasses.dataclass
class Known:
    """What the sink holds of a run, as its last batch left it: the run document's ``_id``
    and ``runrelay.applied``, its metric documents (``MongoSink._parts``), and whether the
    run document's ``info.metrics`` lists them all. The conditional updates check it: a
    run or metric document changed by another writer makes the batch transient, and the
    retry reads the database again."""

    run_id: int
    applied: int
    parts: dict[str, list[dict]] | None = None
    listed: bool = False


class MetricWriter:
    """One batch's metric points: one document per (run, name) as Sacred writes them, a
    name's points past ``points_per_document`` continued in documents named ``PART_NAME``.

    Idempotent: each document records the highest seq pushed into it (``runrelay.seq``,
    advanced in the same single-document update as the push, conditional on its old value),
    and only points above it are pushed. A re-delivered point is pushed with its seq added
    to the document's ``runrelay.redelivered`` in the same update, unless it is there.
    """

    def __init__(self, sink: MongoSink, known: Known, batch: Batch, redelivery: bool):
        self.sink, self.known, self.run_id, self.batch, self.redelivery = sink, known, known.run_id, batch, redelivery

    def write(self) -> None:
        from pymongo import InsertOne, UpdateOne

        points = self.batch.points
        if not len(points):
            return
        parts = self.sink._parts(self.known)
        by_name: dict[str, list[tuple]] = {}
        for row in zip(points.seqs, points.names, map(storable_number, points.steps),
                       map(storable_number, points.values), points.timestamps):
            by_name.setdefault(row[1], []).append(row)
        operations = []
        for name, rows in by_name.items():
            name = sacred.stored_name(name)
            documents = parts.get(name, [])
            if self.redelivery:
                rows = [row for row in rows if not documents or row[0] not in documents[-1].get("redelivered", ())]
            else:
                done = max((document["seq"] for document in documents), default=-1)
                rows = [row for row in rows if row[0] > done]
            while rows:
                last = documents[-1] if documents else None
                room = self.sink.points_per_document - last["points"] if last else 0
                if room > 0:
                    taken, rows = rows[:room], rows[room:]
                    operations.append(UpdateOne(self._current(last), self._push(last, taken)))
                    last.update(points=last["points"] + len(taken), seq=max(last["seq"], taken[-1][0]))
                else:
                    taken, rows = rows[: self.sink.points_per_document], rows[self.sink.points_per_document:]
                    document = self._document(name, len(documents) + 1, taken)
                    operations.append(InsertOne(document))
                    documents.append({"_id": document["_id"], "name": document["name"], **document["runrelay"]})
                    self.known.listed = False
            parts[name] = documents
        if operations:
            result = self.sink._metrics.bulk_write(operations, ordered=True)  # a prefix at most, in order
            updates = sum(isinstance(operation, UpdateOne) for operation in operations)
            if result.matched_count != updates and not self.redelivery:
                raise TransientSinkError(f"{self.sink!r} run {self.batch.run}: its metrics changed meanwhile")

    def _current(self, document: dict) -> dict:
        if self.redelivery:
            return {"_id": document["_id"]}
        return {"_id": document["_id"], "runrelay.seq": document["seq"]}

    def _push(self, document: dict, rows: list[tuple]) -> dict:
        update = {"$push": {"steps": {"$each": [row[2] for row in rows]},
                            "values": {"$each": [row[3] for row in rows]},
                            "timestamps": {"$each": [row[4] for row in rows]}},
                  "$inc": {"runrelay.points": len(rows)}}
        if self.redelivery:
            update["$addToSet"] = {"runrelay.redelivered": {"$each": [row[0] for row in rows]}}
        else:
            update["$set"] = {"runrelay.seq": rows[-1][0]}
        return update

    def _document(self, name: str, part: int, rows: list[tuple]) -> dict:
        from bson import ObjectId

        ours = {"metric": name, "part": part, "seq": -1 if self.redelivery else rows[-1][0], "points": len(rows)}
        if self.redelivery:
            ours["redelivered"] = [row[0] for row in rows]
        return {"_id": ObjectId(), "run_id": self.run_id, "name": name if part == 1 else PART_NAME.format(name=name, part=part),
                "steps": [row[2] for row in rows], "values": [row[3] for row in rows],
                "timestamps": [row[4] for row in rows], "runrelay": ours}


# --- values MongoDB cannot hold as they are ---------------------------------------------------


def storable(value: Any) -> Any:
    """A run field's value as MongoDB holds it, by Sacred's MongoObserver's rule
    (``force_valid_bson_key``, ``force_bson_encodeable``): a key starting with ``$`` starts
    with ``@`` instead and a ``.`` in a key is ``,`` (a second key renamed alike gets more
    commas: nothing is lost); an int beyond BSON's 64 bits is its decimal string."""
    if isinstance(value, dict):
        stored = {}
        for key, item in value.items():
            name = key if isinstance(key, str) else str(key)
            if name.startswith("$") or "." in name:
                name = "@" + name[1:] if name.startswith("$") else name
                name = name.replace(".", ",")
                while name in value or name in stored:
                    name += ","
            stored[name] = storable(item)
        return stored
    if isinstance(value, list):
        return [storable(item) for item in value]
    if type(value) is int and not INT64_MIN <= value <= INT64_MAX:
        return str(value)
    return value


def storable_number(value: Any) -> Any:
    """A metric step or value as MongoDB holds it: an int beyond BSON's 64 bits as the
    nearest float (a series stays numeric for the readers), ±inf past a float's range."""
    if type(value) is int and not INT64_MIN <= value <= INT64_MAX:
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    return value


# --- small helpers ----------------------------------------------------------------------------


def _file_id(uid: str, what: str, key: Any):
    """The GridFS id of a run's file, the same on every retry: a crash after the files
    document is written can never make a second file."""
    from bson import ObjectId

    return ObjectId(hashlib.sha256(f"runrelay\0{uid}\0{what}\0{key}".encode()).digest()[:12])


def _content_type(entry: dict) -> str | None:
    if entry.get("content_type"):
        return entry["content_type"]
    return mimetypes.guess_type(entry.get("filename") or entry["name"], strict=False)[0]


def _info(state: RunState) -> dict:
    """The run's info without ``metrics``: a MongoObserver beside runrelay adds its own
    metric ids there (it mutates the run's info); this database's are written instead."""
    return storable(sacred.flat({key: value for key, value in state.info.items() if key != "metrics"}))


def _with_verdict_withdrawn(batch: Batch) -> frozenset[str]:
    """The state fields a batch rewrites. Unless the run's fold holds a death, the ending
    fields are rewritten from it too: a central verdict the watchdog wrote (which no journal
    holds) is withdrawn by whichever batch comes next, even one read before the mark."""
    return batch.changed if batch.state.death is not None else batch.changed | REVIVED

"""The FileStorage sinks: runs in the layout of Sacred's FileStorageObserver, over a small
store interface with three stores (a local or shared directory, S3, GCS).

``<base>/<id>/run.json``, ``config.json``, ``info.json`` (always), ``cout.txt`` (whole),
``metrics.json``, artifacts by name; ``<base>/_sources/`` and ``<base>/_resources/`` at
the keys ``run.json`` names. runrelay's own records live under ``<base>/_runrelay/``.

Effectively once: every object is a deterministic overwrite from the run's folded state
(or, for ``metrics.json``, from the journal's points through the batch), and ``run.json``,
which holds the run's applied position, is written last. docs/sinks.md describes the
scheme and the cost; docs/compatibility.md the deviations from Sacred's observers.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from typing import Any, BinaryIO, ClassVar, Iterator
from urllib.parse import parse_qsl, urlsplit

from runrelay.eventlog.fold import RunState, death_trace
from runrelay.sinks import sacred
from runrelay.sinks.base import (
    Batch, PermanentSinkError, RunSource, SilentRun, Sink, SinkConfigError, TakesCentralVerdicts, TransientSinkError,
    death_reason, run_host, seconds_option,
)

RECORDS = "_runrelay"  # runrelay's own objects under the base: uid records, host reports, temp files
PROBE = f"{RECORDS}/probe"  # what the check that the store honours conditional writes writes
ID_ATTEMPTS = 50  # integer ids tried before a run's creation is called transient
DEFAULT_REWRITE_SECONDS = 30.0
DEFAULT_REWRITE_GROWTH = 0.5
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%f"  # microseconds always (Sacredboard parses with %f)
RESERVED = frozenset({"run.json", "config.json", "info.json", "cout.txt", "metrics.json"})
MAX_NAME_BYTES = 255
ITEM_SEPARATOR = b",\n      "  # between list items in metrics.json (indent 2, third level)


class Store(ABC):
    """Objects under one base, addressed by '/'-separated keys. Each verb raises the sink
    errors of ``sinks.base`` (never its driver's) and is bounded by the sink's timeout."""

    @abstractmethod
    def open(self) -> None:
        """Check the base can be written (create a local base directory)."""

    @abstractmethod
    def put(self, key: str, data: bytes | BinaryIO) -> None:
        """Write the object whole, atomically: readers see the old one or the new one."""

    @abstractmethod
    def get(self, key: str) -> bytes | None:
        """The object's bytes, None if there is none."""

    @abstractmethod
    def get_tagged(self, key: str) -> tuple[bytes, Any] | None:
        """The object's bytes and a tag naming this version of it (for ``put_if``), None if
        there is none."""

    @abstractmethod
    def put_if(self, key: str, data: bytes, tag: Any) -> bool:
        """Write the object whole only while it is still the version ``tag`` names; False if
        it is not (or is gone). Atomic against every other write of the key."""

    @abstractmethod
    def has(self, key: str) -> bool:
        """Whether the object exists."""

    @abstractmethod
    def claim_run(self, run_id: int, run_json: bytes) -> bool:
        """Create run directory ``run_id`` holding ``run.json``, atomically, unless it
        exists (then False): what two writers racing for one id can both do safely."""

    @abstractmethod
    def run_ids(self) -> list[int]:
        """The integer run directories under the base (a starting guess for a new id)."""

    @abstractmethod
    def location(self, key: str) -> str:
        """How ``run.json`` names the object (a path for a directory, else the key)."""

    def close(self) -> None:
        """Release the client; safe to call twice."""


class BucketStore(Store):
    """A store of objects under ``prefix`` in a bucket: run directories are '/'-delimited
    common prefixes, and run.json names objects by their key below the prefix."""

    def __init__(self, bucket: str, prefix: str, options: dict, timeout: float, label: str):
        self.bucket, self.prefix, self.options, self.timeout, self.label = bucket, prefix, options, timeout, label

    def location(self, key: str) -> str:
        return key

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _run_ids(self, prefixes: list[str]) -> list[int]:
        """The integer run directories among a listing's common prefixes (``<prefix>/<id>/``)."""
        names = [prefix.rstrip("/").rsplit("/", 1)[-1] for prefix in prefixes]
        return [int(name) for name in names if name.isdigit()]


def growth_option(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        raise SinkConfigError(f"expected a fraction from 0 to 100, got {value!r}")
    return float(value)


def text_option(value: Any) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise SinkConfigError(f"expected a non-empty string, got {type(value).__name__}")
    return value


def url_parts(url: str, scheme: str) -> tuple[str, str, dict[str, str]]:
    """(bucket, prefix, query) of ``scheme://bucket/prefix?query``; SinkConfigError if not."""
    parts = urlsplit(url)
    if parts.scheme.lower() != scheme or not parts.netloc or parts.fragment:
        raise SinkConfigError(f"expected {scheme}://BUCKET/PREFIX, got {url!r}")
    if "@" in parts.netloc or ":" in parts.netloc:
        raise SinkConfigError(f"{scheme}:// URLs name a bucket, not a host or credentials: {url!r}")
    prefix = parts.path.strip("/")
    if any(piece in ("", ".", "..") for piece in prefix.split("/")) and prefix:
        raise SinkConfigError(f"the prefix {prefix!r} has an empty, '.' or '..' part")
    return parts.netloc, prefix, dict(parse_qsl(parts.query, keep_blank_values=True))


def check_driver(module: str, extra: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise SinkConfigError(f"{module} is not installed: pip install 'runrelay[{extra}]'")


class FileStorageSink(Sink, TakesCentralVerdicts):
    """One run per integer directory, in Sacred's FileStorage layout (docs/sinks.md).

    A subclass names its store: ``_store()`` builds it from the URL and options.
    """

    OPTIONS: ClassVar[dict] = {
        **Sink.OPTIONS,
        "rewrite_seconds": seconds_option,
        "rewrite_growth": growth_option,
    }

    def __init__(self, name: str, url: str, options: dict, source: RunSource):
        super().__init__(name, url, options, source)
        self.rewrite_seconds = self.options.get("rewrite_seconds", DEFAULT_REWRITE_SECONDS)
        self.rewrite_growth = self.options.get("rewrite_growth", DEFAULT_REWRITE_GROWTH)
        self.store: Store | None = None
        self.clock = time.time  # when rewrites are due (a benchmark replays a run's own times)

    @abstractmethod
    def _store(self) -> Store:
        """The store the URL and options name (not yet opened)."""

    # --- the Sink verbs ----------------------------------------------------------------------

    def open(self) -> None:
        if self.store is None:
            self.store = self._store()
        self.store.open()

    def applied(self, run: str) -> int:
        found = self._find(run)
        return -1 if found is None else found[1]["applied"]

    def apply(self, batch: Batch) -> None:
        found = self._find(batch.run)
        part = batch.after(-1 if found is None else found[1]["applied"])
        if part is None:
            return
        run_id, book = found if found else self._create_run(part)
        fresh = found is None
        self._write(run_id, part, book, fresh)
        book["applied"] = part.last_seq
        book["points"] += len(part.points)
        self._put_json(f"{run_id}/run.json", self._run_json(part.state, book))

    def redeliver(self, batch: Batch) -> None:
        found = self._find(batch.run)
        run_id, book = found if found else self._create_run(batch)
        self._write(run_id, batch, book, fresh=found is None, redelivery=True)
        self._put_json(f"{run_id}/run.json", self._run_json(batch.state, book))

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None

    # --- run ids -----------------------------------------------------------------------------

    def _find(self, run: str) -> tuple[int, dict] | None:
        """(run id, the sink's book in its run.json) of ``run``, None if it has no directory."""
        run_id = self._recorded_id(run)
        book = None if run_id is None else self._book(run_id, run)
        return None if book is None else (run_id, book)

    def _recorded_id(self, run: str) -> int | None:
        """The id recorded for ``run`` (a record that is not a positive int is none)."""
        record = self._get_json(_record_key(run))
        run_id = record.get("id") if isinstance(record, dict) else None
        return run_id if type(run_id) is int and run_id > 0 else None

    def _book(self, run_id: int, run: str) -> dict | None:
        """The ``runrelay`` entry of ``run_id``'s run.json if that directory is ``run``'s; a
        damaged entry of the run's reads as nothing applied (everything is rewritten)."""
        document = self._get_json(f"{run_id}/run.json")
        book = document.get("runrelay") if isinstance(document, dict) else None
        if not isinstance(book, dict) or book.get("uid") != run:
            return None
        kinds = {"applied": int, "points": int, "written": dict}
        return book if all(type(book.get(key)) is kind for key, kind in kinds.items()) else _new_book(run)

    def _create_run(self, batch: Batch) -> tuple[int, dict]:
        """Give the run a new integer directory: the id Sacred settled on if it is a free
        int, else the highest existing id + 1. The id is recorded under ``_runrelay/runs/``
        before the directory is claimed, and only a claim that failed to another run moves
        it on, so however a crash falls the run never gets a second directory."""
        recorded = self._recorded_id(batch.run)
        given = batch.state.sacred_id
        candidate = recorded or (given if type(given) is int and given > 0 else None)
        book = _new_book(batch.run)
        for _attempt in range(ID_ATTEMPTS):
            if candidate is None:
                candidate = max(self.store.run_ids(), default=0) + 1
            if recorded != candidate:
                recorded = candidate
                self._put_json(_record_key(batch.run), {"id": candidate})
            if self.store.claim_run(candidate, _json_bytes(self._run_json(batch.state, book))):
                return candidate, book
            held = self._book(candidate, batch.run)
            if held is not None:
                return candidate, held
            candidate = None
        raise TransientSinkError(f"{self!r} run {batch.run}: {ID_ATTEMPTS} integer ids were taken meanwhile")

    # --- writing a batch ---------------------------------------------------------------------

    def _write(self, run_id: int, batch: Batch, book: dict, fresh: bool, redelivery: bool = False) -> None:
        """Every object but run.json that ``batch`` changes; each a deterministic overwrite."""
        state, changed = batch.state, batch.changed
        if fresh or "config" in changed:
            self._put_json(f"{run_id}/config.json", sacred.flat(state.config))
        if fresh or "info" in changed:
            self._put_json(f"{run_id}/info.json", sacred.flat(state.info))
        if fresh or "experiment" in changed:
            for name, md5 in (sacred.untuple(pair) for pair in state.experiment.get("sources", [])):
                entry = self._source(batch, name)
                self._copy_once(batch.run, {**entry, "md5": md5}, _shared_key("_sources", name, md5), "source")
        for entry in batch.resources:
            key = _shared_key("_resources", entry["filename"], entry["md5"])
            self._copy_once(batch.run, entry, key, "resource")
        # a name added again replaces its file
        latest = {sacred.stored_name(entry["name"]): entry["seq"] for entry in state.artifacts}
        for entry in batch.artifacts:
            if entry["seq"] == latest[sacred.stored_name(entry["name"])]:
                self._copy(batch.run, entry, f"{run_id}/{_artifact_name(self, batch.run, entry)}", "artifact")
        output = state.captured_out.encode("utf-8", "replace")
        if fresh or "captured_out" in changed or state.finished:
            if self._due(book, "cout.txt", len(output), state, fresh):
                self.store.put(f"{run_id}/cout.txt", output)
        points = book["points"] + (0 if redelivery else len(batch.points))
        if fresh or len(batch.points) or state.finished:
            if self._due(book, "metrics.json", points, state, fresh) or (redelivery and len(batch.points)):
                with self._metrics_json(batch.run, batch.last_seq if not redelivery else state.last_seq) as data:
                    self.store.put(f"{run_id}/metrics.json", data)

    def _due(self, book: dict, name: str, size: int, state: RunState, fresh: bool) -> bool:
        """Whether ``name`` is rewritten now (and note it in the book): when it is new,
        when the run has finished, or when it has grown by ``rewrite_growth`` since it was
        last written and ``rewrite_seconds`` have passed. Geometric growth keeps the bytes
        written for it within (2 + 1/growth) times its final size (docs/sinks.md)."""
        written_size, written_at = book["written"].get(name, (None, 0.0))
        now = self.clock()
        if written_size == size and not fresh:
            return False
        due = (fresh or written_size is None or state.finished
               or (size >= written_size * (1 + self.rewrite_growth) and now - written_at >= self.rewrite_seconds))
        if due:
            book["written"][name] = (size, now)
        return due

    @contextlib.contextmanager
    def _metrics_json(self, run: str, through_seq: int) -> Iterator[BinaryIO]:
        """metrics.json as ``json.dumps(..., sort_keys=True, indent=2)`` writes it, built from
        the journal's points through ``through_seq`` in two local temp files (``_stitch``)."""
        with contextlib.ExitStack() as files:
            try:
                spool, out = (files.enter_context(tempfile.TemporaryFile()) for _ in range(2))
                self._stitch(run, through_seq, spool, out)
                out.seek(0)
            except OSError as error:  # a full or failing temp directory
                raise TransientSinkError(f"{self!r} run {run}: cannot build metrics.json: {error}") from None
            yield out

    def _stitch(self, run: str, through_seq: int, spool: BinaryIO, out: BinaryIO) -> None:
        """Each chunk's items are encoded into ``spool`` as the points stream by, then
        stitched into ``out`` name by name, so no series is held in memory (only where each
        name's pieces lie in the spool)."""
        pieces: dict[str, dict[str, list[tuple[int, int]]]] = {}
        for chunk in self.source.points(run, through_seq):
            rows: dict[str, dict[str, list]] = {}
            for name, step, value, stamp in zip(sacred.stored_names(chunk.names), chunk.steps, chunk.values,
                                                chunk.timestamps):
                fields = rows.setdefault(name, {"steps": [], "timestamps": [], "values": []})
                fields["steps"].append(step)
                fields["values"].append(value)
                fields["timestamps"].append(_time(stamp) if stamp is not None else None)
            for name, fields in rows.items():
                for field, items in fields.items():
                    start = spool.tell()
                    spool.write(json.dumps(items, separators=(ITEM_SEPARATOR.decode(), ":")).encode()[1:-1])
                    pieces.setdefault(name, {}).setdefault(field, []).append((start, spool.tell() - start))
        out.write(b"{" if pieces else b"{}")
        for index, name in enumerate(sorted(pieces)):
            out.write(b"," if index else b"")
            out.write(b"\n  " + json.dumps(name).encode() + b": {")
            for number, field in enumerate(("steps", "timestamps", "values")):
                out.write(b"," if number else b"")
                out.write(b'\n    "' + field.encode() + b'": [\n      ')
                for count, (start, length) in enumerate(pieces[name][field]):
                    out.write(ITEM_SEPARATOR if count else b"")
                    spool.seek(start)
                    out.write(spool.read(length))
                out.write(b"\n    ]")
            out.write(b"\n  }")
        out.write(b"\n}" if pieces else b"")

    def _source(self, batch: Batch, name: str) -> dict:
        for entry in batch.state.sources:
            if entry["name"] == name:
                return entry
        raise PermanentSinkError(f"{self!r} run {batch.run}: source {name!r} was not captured into the journal")

    def _copy_once(self, run: str, entry: dict, key: str, what: str) -> None:
        """A source or resource, shared by runs: stored once under its md5."""
        if not self.store.has(key):
            self._copy(run, entry, key, what)

    def _copy(self, run: str, entry: dict, key: str, what: str) -> None:
        try:
            with self.source.open_blob(run, entry["digest"]) as blob:
                self.store.put(key, blob)
        except (FileNotFoundError, ValueError) as error:
            raise PermanentSinkError(f"{self!r} run {run}: {what} {key!r}: {error}", entry.get("seq")) from None
        except OSError as error:
            raise TransientSinkError(f"{self!r} run {run}: cannot read {what} {key!r} from the journal: {error}") from None

    # --- run.json ----------------------------------------------------------------------------

    def _run_json(self, state: RunState, book: dict) -> dict:
        """run.json as Sacred's FileStorageObserver writes it, plus the sink's book."""
        document = {key: value for key, value in sacred.run_document(state).items() if key != "config"}
        document.update(
            experiment=self._experiment(state), host=sacred.flat(state.host), meta=sacred.flat(state.meta),
            artifacts=[sacred.stored_name(entry["name"]) for entry in state.artifacts],
            resources=list({entry["filename"]: [entry["filename"], self.store.location(
                _shared_key("_resources", entry["filename"], entry["md5"]))] for entry in state.resources}.values()),
            runrelay={**book, "host": run_host(state), "death": death_reason(state)},
        )
        return document

    def _experiment(self, state: RunState) -> dict:
        experiment = sacred.flat(state.experiment)
        sources = [sacred.untuple(pair) for pair in experiment.get("sources", [])]
        experiment["sources"] = [[name, _shared_key("_sources", name, md5)] for name, md5 in sources]
        return experiment

    # --- central verdicts (docs/daemon.md, "Dead runs") --------------------------------------
    # Every write of run.json is a whole document from the run's fold, so the batch after a
    # verdict withdraws it (the fold holds no death); the verdict itself is a compare-and-swap
    # of run.json (``Store.put_if``), so it never lands over a batch written meanwhile.

    def report_host(self, host: str, at: dt.datetime) -> None:
        self._put_json(_host_key(host), {"host": host, "seen": at})

    def silent_runs(self, host_silent_since: dt.datetime, heartbeat_before: dt.datetime) -> list[SilentRun]:
        seen: dict[str, dt.datetime | None] = {}
        silent = []
        for run_id in sorted(self.store.run_ids()):
            running = _running(self._get_json(f"{run_id}/run.json"))
            if running is None or running[2] >= heartbeat_before:
                continue
            uid, host, heartbeat = running
            if host not in seen:
                seen[host] = self._host_seen(host)
            if seen[host] is None or seen[host] < host_silent_since:
                silent.append(SilentRun(uid, host, heartbeat, seen[host]))
        return silent

    def mark_dead(self, silent: SilentRun, status: str, reason: str) -> bool:
        run_id = self._recorded_id(silent.uid)
        key = f"{run_id}/run.json"
        tagged = None if run_id is None else self.store.get_tagged(key)
        document = None if tagged is None else _loaded(tagged[0])
        if _running(document) != (silent.uid, silent.host, silent.heartbeat):
            return False  # changed meanwhile: delivered again, or another watchdog was first
        document.update(status=status, stop_time=document["heartbeat"], fail_trace=list(death_trace(reason)))
        document["runrelay"]["death"] = reason
        return self.store.put_if(key, _json_bytes(document), tagged[1])

    def central_problem(self) -> str | None:
        """Whether the store refuses a write whose precondition no longer holds (an
        S3-compatible store may ignore If-Match): random contents, so that several checks
        at once cannot make one another's tag current again."""
        self.store.put(PROBE, uuid.uuid4().bytes)
        first = self.store.get_tagged(PROBE)
        self.store.put(PROBE, uuid.uuid4().bytes)
        if first is not None and not self.store.put_if(PROBE, uuid.uuid4().bytes, first[1]):
            return None
        return "the store wrote over a newer version in a conditional write (it ignores the precondition)"

    def _host_seen(self, host: str) -> dt.datetime | None:
        report = self._get_json(_host_key(host))
        return _parsed_time(report.get("seen")) if isinstance(report, dict) and report.get("host") == host else None

    # --- JSON objects ------------------------------------------------------------------------

    def _put_json(self, key: str, value: Any) -> None:
        try:
            data = _json_bytes(value)
        except (TypeError, ValueError) as error:
            raise PermanentSinkError(f"{self!r}: {key}: a value JSON cannot hold: {error}") from None
        self.store.put(key, data)

    def _get_json(self, key: str) -> Any:
        data = self.store.get(key)
        return None if data is None else _loaded(data)


def _loaded(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None  # not ours (a hand-edited or foreign file): treated as absent


def _json_bytes(value: Any) -> bytes:
    """JSON as Sacred's FileStorageObserver writes it (``sort_keys``, ``indent=2``, no
    trailing newline), its top-level times with microseconds always."""
    return json.dumps(value, sort_keys=True, indent=2, default=_time).encode()


def _time(value: Any) -> str:
    if not isinstance(value, dt.datetime):
        raise TypeError(f"a {type(value).__name__} cannot be stored as JSON")
    return sacred.naive_utc(value).strftime(TIME_FORMAT)


def _parsed_time(value: Any) -> dt.datetime | None:
    try:
        return dt.datetime.strptime(value, TIME_FORMAT) if isinstance(value, str) else None
    except ValueError:
        return None


def _running(document: Any) -> tuple[str, str, dt.datetime] | None:
    """(uid, host, heartbeat) of a run.json that runrelay wrote and shows RUNNING."""
    book = document.get("runrelay") if isinstance(document, dict) else None
    if not isinstance(book, dict) or document.get("status") != "RUNNING":
        return None
    uid, host, heartbeat = book.get("uid"), book.get("host"), _parsed_time(document.get("heartbeat"))
    return (uid, host, heartbeat) if isinstance(uid, str) and isinstance(host, str) and heartbeat else None


def _host_key(host: str) -> str:
    """A host's report: named by a digest, as a host name may be anything its journal says."""
    return f"{RECORDS}/hosts/{hashlib.sha256(host.encode('utf-8', 'surrogatepass')).hexdigest()}.json"


def _new_book(run: str) -> dict:
    return {"uid": run, "applied": -1, "points": 0, "written": {}}


def _record_key(run: str) -> str:
    return f"{RECORDS}/runs/{run}.json"  # run uids are validated by the journal (no '/')


def _shared_key(folder: str, filename: str, md5: str) -> str:
    """``_sources/<stem>_<md5><ext>``, as Sacred's FileStorageObserver names a shared file."""
    stem, ext = os.path.splitext(os.path.basename(filename.replace("\\", "/")))
    stem = "".join(char if char.isprintable() else "_" for char in stem)[:100] or "file"
    ext = ext if ext.isprintable() and len(ext) <= 20 else ""
    return f"{folder}/{stem}_{md5}{ext}"


def _artifact_name(sink: Sink, run: str, entry: dict) -> str:
    """The artifact's file name (its stored name); PermanentSinkError if it cannot be one in a
    run directory."""
    name = sacred.stored_name(entry["name"])
    if (name in RESERVED or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
            or not name.isprintable() or len(name.encode("utf-8", "replace")) > MAX_NAME_BYTES):
        raise PermanentSinkError(f"{sink!r} run {run}: artifact name {name!r} cannot be a file in the run directory",
                                 entry["seq"])
    return name

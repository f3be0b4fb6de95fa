"""Recording a run from plain Python code, without Sacred.

    with Recorder.start(config={"lr": 0.1}, experiment="demo") as run:
        run.log_metric("loss", 0.3)
        run.add_artifact("model.pt")
        run.result = 0.9

The run is journaled exactly as the Sacred observer journals one (docs/events.md):
``started``, heartbeats from a background thread, metrics, artifacts and resources
as they happen, and one ending: ``completed`` when the block exits normally,
``interrupted`` on KeyboardInterrupt, ``failed`` with the traceback otherwise.
Under ``runrelay exec`` the Recorder attaches to the wrapper's run (docs/exec.md).
Once started, a journal that cannot be written (a full disk) never fails the run: what
cannot be journaled meanwhile is lost, logged by the writer, and journaling goes on once
it can.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import platform
import socket
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

from runrelay.eventlog.errors import JournalWriteError
from runrelay.eventlog.events import Kind, metric_value
from runrelay.eventlog.lineproto import WrapperLink
from runrelay.eventlog.location import default_journal_dir
from runrelay.eventlog.writer import Durability, JournalWriter

DEFAULT_HEARTBEAT_SECONDS = 10.0  # Sacred's default beat interval
# Output per heartbeat event: at most 16 MiB of UTF-8, well inside one journal record.
OUTPUT_PIECE_CHARS = 4 * 1024 * 1024
RUNNING = "RUNNING"

log = logging.getLogger(__name__)


def utc_now() -> dt.datetime:
    """Naive UTC with microseconds: the form Sacred hands its observers."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def process_info() -> dict:
    """Where this run lives, for the dead-run watchdog (``process`` in docs/events.md)."""
    return {
        "host": socket.gethostname(),
        "boot_id": _read_proc("sys/kernel/random/boot_id"),
        "pid": os.getpid(),
        "start_ticks": start_ticks(),
    }


def _read_proc(name: str) -> str | None:
    try:
        return Path("/proc", name).read_text().strip()
    except OSError:
        return None  # not Linux


def proc_stat(pid: int | str = "self") -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` from field 3 (the state) on; None when there is no
    such process (or no /proc)."""
    stat = _read_proc(f"{pid}/stat")
    # Field 2 (the command name) may hold spaces and parentheses: split after its closing ')'.
    return None if stat is None else stat.rsplit(")", 1)[1].split()


def start_ticks(pid: int | str = "self") -> int | None:
    """When process ``pid`` started (clock ticks since boot): with the boot id, what tells
    a process from a later one given the same pid."""
    fields = proc_stat(pid)
    return None if fields is None else int(fields[22 - 3])


def append_heartbeat(writer: JournalWriter, body: dict, journaled: str, text: str) -> str:
    """Journal a heartbeat with the output ``text``: as ``captured_out_append`` (the text
    after ``journaled``) while the output only grows, else as ``captured_out``. Output too
    large for one record goes in several heartbeats of the same beat, a piece in each.

    Returns the output now journaled: ``text``, or as much as was when the journal failed
    (a JournalWriteError, logged by the writer, is not raised: the run goes on)."""
    grows = text.startswith(journaled)
    base = journaled if grows else ""
    field, new = ("captured_out_append" if grows else "captured_out"), text[len(base):]
    done = journaled
    for start in range(0, max(len(new), 1), OUTPUT_PIECE_CHARS):
        end = start + OUTPUT_PIECE_CHARS
        try:
            writer.append(Kind.HEARTBEAT, {**body, field: new[start:end]})
        except JournalWriteError:
            return done
        done, field = base + new[:end], "captured_out_append"
    return text


def journal_ending(writer: JournalWriter, kind: Kind, body: dict) -> None:
    """Journal the run's ending and close its writer; a journal that cannot take it is
    logged, never raised: the experiment comes first."""
    try:
        writer.append(kind, body)
    except JournalWriteError as error:
        log.error("run %s: its ending (%s) is not journaled: %s", writer.run, kind.value, error)
    finally:
        with contextlib.suppress(JournalWriteError):  # a failed last fsync: logged by the writer
            writer.close()


class Recorder:
    """One run recorded from plain Python; create it with ``Recorder.start``.

    ``info`` and ``result`` are journaled with every heartbeat and at the end, as Sacred
    does with its run's ``info`` and ``result``.
    """

    def __init__(self, writer: JournalWriter, heartbeat_seconds: float):
        self._writer = writer
        self._heartbeat_seconds = heartbeat_seconds
        self.info: dict = {}
        self.result: Any = None
        self.status = RUNNING
        self._lock = threading.Lock()  # guards the step counters and the output buffer
        self._steps: dict[str, int] = {}
        self._out = ""
        self._journaled_out = ""
        self._stop = threading.Event()
        self._beats = threading.Thread(
            target=self._beat_loop, name=f"runrelay-heartbeat-{writer.run[:8]}", daemon=True
        )

    @classmethod
    def start(
        cls,
        config: dict | None = None,
        journal_dir: str | os.PathLike | None = None,
        experiment: str | None = None,
        heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS,
        durability: Durability = Durability(),
    ) -> "Recorder":
        """Journal the run's start (durably) and start its heartbeats."""
        if not heartbeat_seconds > 0:
            raise ValueError("heartbeat_seconds must be a positive number of seconds")
        # Under `runrelay exec` the wrapper is the run's one writer: attach to its run.
        writer = WrapperLink.from_environment() or JournalWriter.create(
            default_journal_dir() if journal_dir is None else journal_dir, durability=durability)
        try:
            writer.append(
                Kind.STARTED,
                {
                    "ex_info": _experiment_info(experiment),
                    "command": "main",
                    "host_info": host_info(),
                    "start_time": utc_now(),
                    "config": config or {},
                    "meta_info": {},
                    "sources": [],
                    "process": process_info(),
                },
            )
        except BaseException:
            writer.abandon()
            raise
        run = cls(writer, heartbeat_seconds)
        run._beats.start()
        return run

    @property
    def uid(self) -> str:
        return self._writer.run

    def log_metric(self, name: str, value: float, step: int | None = None) -> None:
        """Journal one point now; without ``step``, one more than the name's last step."""
        with self._lock:
            self._check_running()
            if step is None:
                step = self._steps.get(name, -1) + 1
            self._steps[name] = step
            try:
                self._writer.append_metric(name, step, metric_value(value), utc_now())
            except JournalWriteError:
                pass  # logged by the writer; the run goes on

    def add_artifact(
        self,
        path: str | os.PathLike,
        name: str | None = None,
        metadata: dict | None = None,
        content_type: str | None = None,
    ) -> None:
        """Copy a file the run produced into the journal now; the file may change afterwards."""
        self._check_running()
        filename = os.path.abspath(path)
        with contextlib.suppress(JournalWriteError):  # logged by the writer; the run goes on
            stored = self._writer.store_file(filename)
            body = {"name": name or os.path.basename(filename), "filename": filename, **stored}
            self._writer.append(Kind.ARTIFACT, {**body, "metadata": metadata, "content_type": content_type})

    def add_resource(self, path: str | os.PathLike) -> None:
        """Copy a file the run read into the journal now."""
        self._check_running()
        filename = os.path.abspath(path)
        with contextlib.suppress(JournalWriteError):  # logged by the writer; the run goes on
            self._writer.append(Kind.RESOURCE, {"filename": filename, **self._writer.store_file(filename)})

    def print(self, *values: Any, sep: str = " ", end: str = "\n") -> None:
        """Print to stdout and add the text to the run's captured output."""
        text = sep.join(map(str, values)) + end
        sys.stdout.write(text)
        with self._lock:
            self._out += text

    def finish(self, result: Any = None) -> None:
        """End the run as COMPLETED; ``result`` (if given) replaces ``self.result``."""
        if result is not None:
            self.result = result
        self._end(Kind.COMPLETED, "COMPLETED", {"stop_time": utc_now(), "result": self.result})

    def fail(self, trace: list[str] | BaseException | None = None) -> None:
        """End the run as FAILED with ``trace``: lines as Sacred formats them, an
        exception to format, or (None) the exception being handled."""
        if trace is None:
            trace = sys.exc_info()[1] or []
        if isinstance(trace, BaseException):
            trace = traceback.format_exception(type(trace), trace, trace.__traceback__)
        self._end(Kind.FAILED, "FAILED", {"fail_time": utc_now(), "fail_trace": list(trace)})

    def interrupt(self, status: str = "INTERRUPTED") -> None:
        """End the run as interrupted with ``status`` (e.g. TIMEOUT)."""
        self._end(Kind.INTERRUPTED, status, {"interrupt_time": utc_now(), "status": status})

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.status != RUNNING:
            return False  # ended explicitly inside the block
        if exc is None:
            self.finish()
        elif isinstance(exc, KeyboardInterrupt) or isinstance(getattr(exc, "STATUS", None), str):
            # KeyboardInterrupt and Sacred's SacredInterrupt (which carries STATUS), as Sacred does
            self.interrupt(getattr(exc, "STATUS", "INTERRUPTED"))
        else:
            self.fail(exc)
        return False

    def _check_running(self) -> None:
        if self.status != RUNNING:
            raise RuntimeError(f"run {self.uid} has already ended ({self.status})")

    def _end(self, kind: Kind, status: str, body: dict) -> None:
        self._check_running()
        self.status = status
        self._stop.set()
        self._beats.join()
        try:
            self._heartbeat()  # the last info, result and output, like Sacred's final beat
        except Exception as error:  # noqa: BLE001 - the ending must still be journaled
            log.warning("run %s: last heartbeat not journaled: %s", self.uid, error)
        journal_ending(self._writer, kind, body)

    def _heartbeat(self) -> None:
        with self._lock:
            out = self._out
        body = {"beat_time": utc_now(), "info": self.info, "result": self.result}
        self._journaled_out = append_heartbeat(self._writer, body, self._journaled_out, out)

    def _beat_loop(self) -> None:
        while not self._stop.wait(self._heartbeat_seconds):
            try:
                self._heartbeat()
            except Exception as error:  # noqa: BLE001 - a missed beat must not end the run
                log.warning("run %s: heartbeat not journaled: %s", self.uid, error)


def _experiment_info(name: str | None) -> dict:
    """Sacred's ``ex_info`` shape, for the script that runs (if any)."""
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    main = os.path.abspath(main) if main else None
    return {
        "name": name or (Path(main).stem if main else "recorder"),
        "base_dir": os.path.dirname(main) if main else os.getcwd(),
        "sources": [],
        "dependencies": [],
        "repositories": [],
        "mainfile": os.path.basename(main) if main else None,
    }


def host_info() -> dict:
    """The keys Sacred's default host info has (GPUs are not probed)."""
    return {
        "hostname": platform.node(),
        "os": [platform.system(), platform.platform()],
        "python_version": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "ENV": {},
    }

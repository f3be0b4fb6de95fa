"""Dead runs on this host, known within a poll of the writer's death (docs/daemon.md, "Dead runs").

A run's writer holds an flock on the run's ``writer.lock`` while it lives, and the kernel
drops it the moment the process dies, however it dies (``kill -9``, the OOM killer). So a
free lock and no ending in the journal mean dead, and the watch appends a ``died`` verdict
as the run's new writer (taking that same lock, so a writer that came back wins), which
every sink then receives like any other event. The process the started event records
(boot id, pid, start time) only says how the run died: it never makes a verdict alone,
because a pid means nothing seen from another PID namespace (a container).

A writer that holds its lock but has written nothing for ``stalled_seconds`` (a stopped or
GIL-starved process) is stalled: reported, never judged dead. Runs started on other hosts
are left to the central watchdog; a queued run (Sacred's ``-q``) has no process and is never
dead.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from runrelay.daemon.supervisor import Liveness
from runrelay.eventlog.errors import JournalError, UnknownRun, WriterBusy
from runrelay.eventlog.events import TERMINAL_KINDS, Kind
from runrelay.eventlog.format import segment_name
from runrelay.eventlog.reader import Journal, Position
from runrelay.eventlog.recorder import proc_stat, process_info, utc_now
from runrelay.eventlog.writer import JournalWriter, writer_alive

log = logging.getLogger("runrelay.verdicts")

DEFAULT_POLL_SECONDS = 1.0
DEFAULT_STALLED_SECONDS = 60.0
DEFAULT_DIED_STATUS = "DIED"
_TAIL_RECORDS = 10_000
_PF_EXITING = 0x4  # /proc/<pid>/stat flags: the process is exiting (its files, our lock, close before it is a zombie)  # records read per step when looking at a run's last segment


@dataclass(frozen=True)
class Host:
    """Which runs are this host's to judge: those whose started event names it."""

    name: str
    boot_id: str | None

    @classmethod
    def this(cls) -> "Host":
        here = process_info()
        return cls(here["host"], here["boot_id"])


@dataclass(frozen=True)
class Verdict:
    run: str
    condition: str  # "stalled" or "dead"
    reason: str
    silent_seconds: float | None = None  # since the run's journal was last seen to grow


@dataclass
class _Watched:
    process: dict
    tail: Position | None = None  # where reading the run's latest events resumes
    last_heartbeat: object = None
    ended: bool = False
    stalled: bool = False
    segment: str | None = None  # the path of its last segment, and that file's size when last looked at
    size: int | None = None
    seen_growing: float = 0.0  # when (on the watch's clock) the journal was last seen to grow


@dataclass
class DeathWatch:
    """One pass (``survey``) judges this host's unfinished runs; ``run`` repeats it and
    journals the dead ones' verdicts."""

    journal: Journal
    host: Host = field(default_factory=Host.this)
    stalled_seconds: float = DEFAULT_STALLED_SECONDS
    poll_seconds: float = DEFAULT_POLL_SECONDS
    died_status: str = DEFAULT_DIED_STATUS
    clock: Callable[[], float] = time.time
    settled: set[str] = field(default_factory=set)  # ended, queued, not ours, or judged: never looked at again
    liveness: Liveness = field(default_factory=Liveness)
    name = "dead-runs"

    def __post_init__(self):
        self._watched: dict[str, _Watched] = {}
        self._complaints: set[str] = set()
        self._mutex = threading.Lock()
        self._woken: set[str] = set()
        self._bell = threading.Event()

    def run(self, stop: threading.Event) -> None:
        """Judge every run each ``poll_seconds``, and a run at once when its writer lock is
        closed (``writer_closed``, from the journal's inotify watch)."""
        woken: set[str] | None = None  # None: look at every run
        while not stop.is_set():
            self.judge(woken)
            self.liveness.beat()
            with self.liveness.idle():
                rung = self._bell.wait(self.poll_seconds)
            with self._mutex:
                woken, self._woken = (self._woken if rung else None), set()
                self._bell.clear()

    def writer_closed(self, run: str) -> None:
        """A process closed the run's writer lock (it ended, or died): judge the run now."""
        with self._mutex:
            self._woken.add(run)
            self._bell.set()

    def wake(self) -> None:
        self._bell.set()

    def judge(self, runs: set[str] | None = None) -> None:
        """One pass: survey every run (or ``runs``) and journal the dead ones' verdicts."""
        for verdict in self.survey(runs):
            if verdict.condition == "dead":
                self.record(verdict)

    def survey(self, runs: set[str] | None = None) -> list[Verdict]:
        """The verdicts on this host's unfinished runs (or on ``runs``) that are stalled or
        dead, now."""
        verdicts = []
        for run in self.journal.runs() if runs is None else sorted(runs):
            if run in self.settled:
                continue
            try:
                verdict = self._judge(run)
            except UnknownRun:
                self._forget(run)  # removed meanwhile
                continue
            except JournalError as error:  # corrupt or unreadable: the delivery reports it; judge nothing
                self._complain(run, f"cannot judge run {run}: {error}")
                continue
            if verdict is not None:
                verdicts.append(verdict)
        return verdicts

    def record(self, verdict: Verdict) -> bool:
        """Journal the ``died`` verdict as the run's writer; False if the run came back or
        ended meanwhile, or its journal cannot take it (said once in the log)."""
        watched = self._watched[verdict.run]
        try:
            writer = JournalWriter.resume(self.journal.root, verdict.run)
        except WriterBusy:
            return False  # a writer came back: alive after all
        except (OSError, JournalError) as error:
            self._complain(verdict.run, f"run {verdict.run} is dead ({verdict.reason}) but its verdict cannot be "
                                        f"journaled: {error}")
            self._forget(verdict.run)
            return False
        try:
            self._read_tail(verdict.run, watched)  # the last events before we took the lock
            if watched.ended:
                return False
            body = {"status": self.died_status, "reason": verdict.reason, "detected_time": utc_now()}
            if watched.last_heartbeat is not None:
                body["last_heartbeat"] = watched.last_heartbeat
            writer.append(Kind.DIED, body)
        finally:
            writer.close()
            self._forget(verdict.run)
        log.warning("run %s died: %s", verdict.run, verdict.reason)
        return True

    def _judge(self, run: str) -> Verdict | None:
        watched = self._watched.get(run) or self._first_look(run)
        if watched is None:
            return None
        if writer_alive(self.journal.run_dir(run)):
            return self._stall_check(run, watched)
        self._read_tail(run, watched)  # the lock is free: whatever it wrote is all there is
        if watched.ended:
            self._forget(run)
            return None
        return Verdict(run, "dead", _how_it_died(watched.process, self.host))

    def _first_look(self, run: str) -> _Watched | None:
        first = self.journal.read_batch(run, 0, 1)
        if not first.events:
            if first.corrupt:
                raise first.corrupt
            return None  # nothing written yet: look again next time
        started = first.events[0]
        process = started.body.get("process") if started.kind is Kind.STARTED else None
        if not isinstance(process, dict) or process.get("host") != self.host.name:
            self.settled.add(run)  # queued, another host's, or no process recorded: never ours to judge
            return None
        watched = self._watched[run] = _Watched(process, seen_growing=self.clock())
        return watched

    def _stall_check(self, run: str, watched: _Watched) -> Verdict | None:
        silent = self._silent_seconds(run, watched)
        stalled = silent >= self.stalled_seconds
        if stalled != watched.stalled:
            watched.stalled = stalled
            if stalled:
                log.warning("run %s is stalled: its process holds the journal but wrote nothing for %.0f s",
                            run, silent)
            else:
                log.info("run %s is writing again", run)
        if not stalled:
            return None
        return Verdict(run, "stalled", f"nothing written for {silent:.0f} s while its process lives", silent)

    def _silent_seconds(self, run: str, watched: _Watched) -> float:
        """Seconds (on the watch's clock) since the run's journal was last seen to grow: the
        size of its last segment, listed again only when that stops growing (a rotation).
        At the first look, the segment's mtime says when it last grew."""
        now = self.clock()
        stat = _stat(watched.segment)
        if watched.segment is None or (stat is not None and stat.st_size == watched.size):
            tail = self.journal.last_segment(run)
            segment = str(self.journal.run_dir(run) / segment_name(tail.segment))
            if segment != watched.segment:
                watched.segment, stat = segment, _stat(segment)
        size = None if stat is None else stat.st_size
        if size != watched.size:
            first = watched.size is None and stat is not None
            watched.size, watched.seen_growing = size, min(now, stat.st_mtime) if first else now
        return now - watched.seen_growing

    def _read_tail(self, run: str, watched: _Watched) -> None:
        """Read the run from where we left off (at first, its last segment) to the end:
        an ending, and the last heartbeat's time."""
        if watched.tail is None:
            watched.tail = self.journal.last_segment(run)
        while True:
            batch = self.journal.read_batch(run, watched.tail, _TAIL_RECORDS)
            for event in batch.events:
                if event.kind is Kind.HEARTBEAT:
                    watched.last_heartbeat = event.body.get("beat_time")
                watched.ended = watched.ended or event.kind in TERMINAL_KINDS  # a verdict already given counts
            watched.tail = batch.end
            if batch.corrupt:
                raise batch.corrupt
            if batch.records < _TAIL_RECORDS:
                return

    def _forget(self, run: str) -> None:
        self._watched.pop(run, None)
        self.settled.add(run)

    def _complain(self, run: str, message: str) -> None:
        if run not in self._complaints:
            self._complaints.add(run)
            log.error("%s", message)


def _stat(path: str | None) -> os.stat_result | None:
    try:
        return os.stat(path, follow_symlinks=False) if path else None
    except OSError:
        return None


def _how_it_died(process: dict, host: Host) -> str:
    """Why the writer is gone, as far as the recorded process tells."""
    boot_id, pid, ticks = process.get("boot_id"), process.get("pid"), process.get("start_ticks")
    if boot_id and host.boot_id and boot_id != host.boot_id:
        return "the host rebooted since the run started (its boot id changed); the run had no ending"
    if not isinstance(pid, int):
        return "its writer released the journal without an ending"
    fields = proc_stat(pid)
    if fields is None or fields[0] in "ZX" or int(fields[9 - 3]) & _PF_EXITING:  # gone, or on its way out
        return f"process {pid} is gone without an ending (killed, or it exited without one)"
    if ticks is not None and int(fields[22 - 3]) != ticks:
        return f"process {pid} is gone without an ending (its pid now belongs to another process)"
    return f"process {pid} released the run's journal without an ending and lives on"

"""Central verdicts, for hosts whose daemon went silent (docs/daemon.md, "Dead runs").

A daemon judges its own host's runs (``verdicts.py``); it cannot judge when its host has
lost power or its network. So each daemon reports, to every sink that takes central
verdicts, that its host lives (``HostReports``, every ``dead_runs.report_seconds``). The
watchdog (``runrelay watchdog``, any number of them, anywhere) asks each such sink for
``RUNNING`` runs whose heartbeat is stale and whose host has not reported lately, and marks
each dead with the sink's conditional write: only while the run is still as found, so that
several watchdogs write each verdict once. When the host comes back, its daemon delivers
the rest of the run and the run's real history replaces the mark.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from runrelay.daemon.supervisor import Liveness
from runrelay.sinks.base import Sink, SinkError, TakesCentralVerdicts

log = logging.getLogger("runrelay.watchdog")


def utc(seconds: float) -> dt.datetime:
    """A time on the watch's clock as the sinks hold times: naive UTC."""
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).replace(tzinfo=None)


def central(sinks: list[Sink]) -> list[Sink]:
    """The sinks that take central verdicts; the others are named once in the log."""
    taking = [sink for sink in sinks if isinstance(sink, TakesCentralVerdicts)]
    for sink in sinks:
        if sink not in taking:
            log.warning("sink %s cannot take central verdicts (it has no conditional write): left out", sink.name)
    return taking


@dataclass
class HostReports:
    """The daemon's loop telling each sink that this host lives."""

    host: str
    sinks: list[Sink]
    every_seconds: float
    clock: Callable[[], float] = time.time
    liveness: Liveness = field(default_factory=Liveness)
    name = "host-reports"

    def __post_init__(self):
        self._failing: set[str] = set()

    def run(self, stop: threading.Event) -> None:
        try:
            while True:
                self.report()
                self.liveness.beat()
                with self.liveness.idle():
                    if stop.wait(self.every_seconds):
                        return
        finally:
            for sink in self.sinks:
                sink.close()

    def report(self) -> None:
        for sink in self.sinks:
            try:
                sink.open()
                sink.report_host(self.host, utc(self.clock()))
            except SinkError as error:  # retried at the next report; said once per outage
                if sink.name not in self._failing:
                    self._failing.add(sink.name)
                    log.warning("sink %s: cannot report that host %s lives: %s", sink.name, self.host, error)
                continue
            if sink.name in self._failing:
                self._failing.discard(sink.name)
                log.info("sink %s: reporting that host %s lives again", sink.name, self.host)


@dataclass
class Watchdog:
    """One pass (``once``) marks the runs of silent hosts dead in every sink given."""

    sinks: list[Sink]
    host_silent_seconds: float
    stale_seconds: float
    status: str
    clock: Callable[[], float] = time.time

    def __post_init__(self):
        self._unable: set[str] = set()

    def once(self) -> int:
        """Mark what is due; the number of verdicts this pass wrote. A sink that fails is
        logged and tried again at the next pass; one whose store turns out to ignore a
        conditional write's precondition is named once and left out from then on."""
        now = self.clock()
        written = 0
        for sink in self.sinks:
            if sink.name in self._unable:
                continue
            try:
                sink.open()
                problem = sink.central_problem()
                if problem is not None:
                    self._unable.add(sink.name)
                    log.warning("sink %s cannot take central verdicts: %s: left out", sink.name, problem)
                    continue
                for silent in sink.silent_runs(utc(now - self.host_silent_seconds), utc(now - self.stale_seconds)):
                    seen = "never reported" if silent.host_seen is None else f"last reported {silent.host_seen:%Y-%m-%d %H:%M:%S} UTC"
                    beat = "none" if silent.heartbeat is None else f"{silent.heartbeat:%Y-%m-%d %H:%M:%S} UTC"
                    reason = f"host {silent.host} went silent ({seen}); last heartbeat {beat}"
                    if sink.mark_dead(silent, self.status, reason):
                        written += 1
                        log.warning("sink %s: run %s died: %s", sink.name, silent.uid, reason)
            except SinkError as error:
                log.error("sink %s: %s", sink.name, error)
        return written

"""kill -9 of a Sacred experiment loses no metric whose log_scalar call had returned."""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runrelay.eventlog import Journal, Kind
from runrelay.eventlog.fold import fold

EXPERIMENT = Path(__file__).parent / "experiments" / "endless_experiment.py"
KILLS = 10


def read_line(fd: int, timeout: float) -> str:
    ready, _, _ = select.select([fd], [], [], timeout)
    assert ready, "the experiment reported nothing"
    line = b""
    while not line.endswith(b"\n"):
        line += os.read(fd, 1)
    return line.decode()


@pytest.mark.slow
@pytest.mark.parametrize("attempt", range(KILLS))
def test_every_reported_metric_survives_kill_9(tmp_path, attempt):
    journal_dir = tmp_path / "journal"
    read_fd, write_fd = os.pipe()
    process = subprocess.Popen(
        # a heartbeat every 50 ms: Sacred hands the same points to log_metrics many times over
        [sys.executable, str(EXPERIMENT), "-j", str(journal_dir), "-b", "0.05", "with", f"report_fd={write_fd}"],
        pass_fds=[write_fd],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_fd)
    try:
        first = read_line(read_fd, timeout=60)  # the run is under way
        time.sleep(random.Random(attempt).uniform(0, 0.5))
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        with os.fdopen(read_fd) as pipe:  # every report written before the kill, up to EOF
            rest = pipe.read()
    # each report is one write of a few bytes to a pipe, so it is never torn
    reported = [tuple(line.split()) for line in (first + rest).splitlines()]

    journal = Journal(journal_dir)
    [run] = journal.runs()
    assert journal.verify(run).ok
    events = list(journal.events(run))
    journaled = [(e.body["name"], str(e.body["step"])) for e in events if e.kind is Kind.METRICS]
    assert len(set(journaled)) == len(journaled), "a point was journaled twice"
    assert journaled[: len(reported)] == reported  # every reported point, in order
    assert len(journaled) <= len(reported) + 1  # at most the call the kill interrupted
    assert fold(events).status == "RUNNING"

"""Acceptance (issue 8): a Sacred experiment fed hostile values (huge ints, deep nesting, huge
output, non-string dict keys, objects Sacred itself can serialise) always ends with its real
status in the journal and in SQLite, through a real ``runrelay sync``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from runrelay.eventlog import Journal, Kind, codec
from runrelay.eventlog.fold import fold
from runrelay.sinks import sacred

from test_daemon_delivery import Place
from test_sacred_observer import EXPERIMENTS

ENDINGS = {  # ending -> (status, last event kind)
    "complete": ("COMPLETED", Kind.COMPLETED),
    "fail": ("FAILED", Kind.FAILED),
    "custom": ("DRAINED_BY_THE_CLUSTER_SCHEDULER_FOR_MAINTENANCE_OF_THE_NODE_AND_ITS_NEIGHBOURS", Kind.INTERRUPTED),
}


@pytest.mark.parametrize("ending, output_mb", [("complete", 70), ("fail", 1), ("custom", 1)])
def test_a_hostile_sacred_experiment_ends_with_its_real_status_in_the_journal_and_in_sqlite(tmp_path, ending,
                                                                                            output_mb):
    place = Place(tmp_path)
    # A beat during the pause takes the output: Sacred drops a final beat that takes over 2 s
    # (docs/sacred.md), and the output of a run that raised is what its last beat before read.
    done = subprocess.run([sys.executable, "hostile_experiment.py", "-j", str(place.journal), "--capture=sys",
                           "--beat-interval=0.2", "with", f"ending={ending}", f"output_mb={output_mb}", "pause=2"],
                          cwd=EXPERIMENTS, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120)
    assert "observer" not in done.stderr, done.stderr[-3000:]  # Sacred names an observer that failed
    status, kind = ENDINGS[ending]

    journal = Journal(place.journal)
    [run] = journal.runs()
    assert journal.verify(run).ok
    events = list(journal.events(run))
    state = fold(events)
    assert state.status == status and events[-1].kind is kind
    assert state.config["flops"] == 3 * 10**21 and state.config["grid"] == {"sizes": [1, 2, 3], "name": "é\u2603"}
    assert state.info["keys"] == {"json://5": "int", 'json://{"py/tuple": [1, 2]}': "tuple", "json://null": "none",
                                  "json://1.5": "float"}
    assert state.info["numpy"]["array"]["py/object"] == "numpy.ndarray"  # as Sacred's flatten gave it
    assert state.info["huge"][codec.UNJOURNALED] == "int"
    assert "the last line\n" in state.captured_out[-100_000:]  # then maybe Sacred's own last log lines
    assert len(state.captured_out) > output_mb * 2**20
    if ending == "complete":
        assert state.result["flops"] == -3 * 10**21

    synced = place.sync()
    assert synced.returncode == 0, synced.stderr
    [(stored_status, config, captured_out, fail_trace, result)] = place.query(
        "SELECT status, config, captured_out, fail_trace, runrelay_run.result FROM run JOIN runrelay_run "
        "USING (run_id) WHERE uid = ?", run)
    assert stored_status == sacred.stored_status(status)
    assert json.loads(config)["flops"] == 3 * 10**21
    assert captured_out == state.captured_out
    names = {name for (name,) in place.query("SELECT DISTINCT name FROM metric")}
    assert names == {"flops", "loss", sacred.stored_name("x" * 300)}
    if ending == "complete":
        assert json.loads(result)["flops"] == -3 * 10**21
    if ending == "fail":
        assert "RuntimeError: hostile failure" in fail_trace

"""Values some backends refuse, stored by one rule on every sink (issue 8, item 12;
docs/sinks.md, "Values every sink stores alike"): bytes and tuple keys as ``flatten`` writes
them, a status within 64 characters and names within 255, NUL as U+FFFD. The run's ending
is never lost to a long string."""

from __future__ import annotations

import base64

from runrelay.eventlog import Kind
from runrelay.sinks import sacred

from sinkkit import artifact, at, deliver, lifecycle, point, started, write_run
from test_sink_contract import files, journal, sink, store  # noqa: F401 - fixtures

STATUS = "STOPPED_BY_THE_SCHEDULER_BECAUSE_THE_NODE_WAS_DRAINED_FOR_MAINTENANCE\0_AFTER_THE_LAST_EPOCH"
LONG_NAMES = ["m" * 300 + "a", "m" * 300 + "b"]  # alike in their first 255 characters


def test_values_some_backends_refuse_are_stored_alike_and_the_ending_lands(sink, store, journal, files, request):
    model = files / "model.bin"
    # fake-gcs-server's filesystem backend keeps an object as one file named by its whole
    # escaped key, so it refuses a 255-byte name under a prefix (GCS itself takes 1,024 bytes)
    long_artifacts = [] if request.node.callspec.params["store"] == "gs" else LONG_NAMES
    steps = lifecycle(files, (Kind.INTERRUPTED, {"interrupt_time": at(9), "status": STATUS}))
    steps[0] = started(files, config={"key": b"\0\xffraw", "grid": {(1, 2): "cell"}})
    steps[7:7] = [artifact(model, name) for name in [*long_artifacts, "model\0v2.bin"]]
    steps[2:2] = [point(name, 0, 1.0, 1) for name in [*LONG_NAMES, "loss\0raw"]]
    run = write_run(journal, steps)

    delivery = deliver(sink, journal, run)
    stored = store.run(run)

    assert delivery.letters == {}
    assert stored["status"] == sacred.stored_status(STATUS)
    assert len(stored["status"]) == 64 and stored["status"].startswith("STOPPED_BY_THE_SCHEDULER")
    assert stored["config"]["key"] == {"py/b64": base64.b64encode(b"\0\xffraw").decode()}
    assert stored["config"]["grid"] == {'json://{"py/tuple": [1, 2]}': "cell"}

    names = [sacred.stored_name(name) for name in LONG_NAMES]
    assert len(set(names)) == 2 and all(len(name.encode()) == 255 and "…" in name for name in names)
    stored_artifacts = [sacred.stored_name(name) for name in long_artifacts]
    assert sorted(name for name, _ in stored["artifacts"]) == sorted([*stored_artifacts, "model.bin",
                                                                      "model\ufffdv2.bin"])
    assert {name for name, *_ in stored["metrics"]} >= {*names, "loss\ufffdraw"}


def test_stored_text_keeps_what_fits_and_cuts_what_does_not_visibly():
    assert sacred.stored_text("COMPLETED", 64) == "COMPLETED"
    cut = sacred.stored_text("x" * 100, 64)
    assert len(cut) == 64 and cut.startswith("x" * 55) and cut[55] == "…"
    assert sacred.stored_text("x" * 100, 64) == cut != sacred.stored_text("x" * 99 + "y", 64)
    assert sacred.stored_status(None) is None
    names = ["a", "b"]
    assert sacred.stored_names(names) is names

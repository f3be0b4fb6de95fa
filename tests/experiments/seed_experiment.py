"""A seed-style Sacred experiment: fit a line to a data file, log a learning curve.

Observers come from the command line, so one run can be journaled and stored by
Sacred's FileStorageObserver at the same time:

    python seed_experiment.py -j JOURNAL_DIR -F FILE_STORAGE_DIR with mode=fail

``mode`` chooses how the run ends: complete (returns the final loss), fail (raises),
interrupt (KeyboardInterrupt), timeout (Sacred's TimeoutInterrupt) or custom (a
SacredInterrupt with its own STATUS).
"""

import os
import tempfile
import time

import numpy as np
from sacred import Experiment
from sacred.utils import SacredInterrupt, TimeoutInterrupt

import regression
from runrelay.eventlog.sacred import journal_option

HERE = os.path.dirname(os.path.abspath(__file__))

ex = Experiment("seed_regression", additional_cli_options=[journal_option])


class Preempted(SacredInterrupt):
    STATUS = "PREEMPTED"


ENDINGS = {"interrupt": KeyboardInterrupt, "timeout": TimeoutInterrupt, "custom": Preempted}


@ex.config
def config():
    mode = "complete"
    data = os.path.join(HERE, "data", "points.csv")
    epochs = 20
    pause = 0.02  # seconds per epoch, so heartbeats happen during the run
    optimizer = {"lr": 0.2, "schedule": {"decay": 0.5, "every": 8}}
    init = {"weight": 0, "bias": 0.25}


@ex.automain
def main(_run, mode, data, epochs, pause, optimizer, init):
    _run.add_resource(data)
    x, y = np.loadtxt(data, delimiter=",", unpack=True)
    schedule = optimizer["schedule"]
    curve = regression.fit(
        x, y, optimizer["lr"], epochs, init["weight"], init["bias"], schedule["decay"], schedule["every"]
    )
    for epoch, (weight, bias, loss) in enumerate(curve):
        _run.log_scalar("training.loss", loss)
        _run.log_scalar("model.weight", np.float64(weight), step=10 * epoch)
        print(f"epoch {epoch}: loss {loss:.6f}")
        time.sleep(pause)
    _run.log_scalar("validation.ratio", float("nan"))
    _run.log_scalar("validation.ratio", float("inf"))
    _run.info["model"] = {"weight": weight, "bias": bias}

    # An artifact deleted right after it is added: only copies made at event time survive.
    with tempfile.TemporaryDirectory() as scratch:
        model = os.path.join(scratch, "model.txt")
        with open(model, "w") as f:
            f.write(f"weight {weight!r}\nbias {bias!r}\n")
        _run.add_artifact(model, metadata={"format": "text", "epochs": epochs})

    if mode == "fail":
        raise RuntimeError("diverged (on purpose)")
    if mode in ENDINGS:
        raise ENDINGS[mode]()
    return loss

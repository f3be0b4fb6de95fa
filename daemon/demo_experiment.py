"""The small Sacred experiment ``runrelay demo`` runs, journaled by runrelay:

    python -m runrelay.daemon.demo_experiment -j JOURNAL_DIR with mode=complete

``mode``: ``complete`` returns the final loss, ``fail`` raises after training, ``hang``
creates ``ready_file`` once its metrics are logged and then waits to be killed.
"""

import time
from pathlib import Path

from sacred import Experiment

from runrelay.eventlog.sacred import journal_option

ex = Experiment("runrelay_demo", additional_cli_options=[journal_option])


@ex.config
def config():
    mode = "complete"  # complete | fail | hang
    steps = 25
    learning_rate = 0.15
    ready_file = ""  # hang: created when the metrics are logged, so the demo knows when to kill


@ex.automain
def main(_run, mode, steps, learning_rate, ready_file):
    loss = 1.0
    for step in range(steps):
        loss *= 1 - learning_rate
        _run.log_scalar("loss", loss, step)
        _run.log_scalar("accuracy", 1 - loss, step)
    print(f"trained {steps} steps, loss {loss:.4f}")
    if mode == "fail":
        raise RuntimeError("the loss diverged (this run fails on purpose)")
    if mode == "hang":
        Path(ready_file).touch()
        while True:
            time.sleep(1)
    return loss

"""A Sacred experiment that logs metrics until it is killed (the kill -9 test).

After each ``log_scalar`` call has returned, it writes "<name> <step>" as one line to
the file descriptor ``report_fd``, so whoever kills it knows which points the
experiment was told are logged:

    python endless_experiment.py -j JOURNAL_DIR with report_fd=3
"""

import os
import time

from sacred import Experiment

from runrelay.eventlog.sacred import journal_option

ex = Experiment("endless", additional_cli_options=[journal_option])


@ex.config
def config():
    report_fd = 1
    pause = 0.001  # seconds between steps


@ex.automain
def main(_run, report_fd, pause):
    step = 0
    while True:
        for name, value in (("loss", 1 / (step + 1)), ("accuracy", step / (step + 1))):
            _run.log_scalar(name, value)
            os.write(report_fd, f"{name} {step}\n".encode())
        step += 1
        time.sleep(pause)

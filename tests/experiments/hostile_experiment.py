"""A Sacred experiment fed every hostile value a user can hand Sacred: ints beyond 64 bits
and beyond what the journal keeps, nesting deeper than the journal keeps, more output between
two beats than one journal record holds, dict keys that are not str, objects Sacred's own
``flatten`` serialises (NumPy arrays and scalars, sets, tuples, bytes), a long custom status.

    python hostile_experiment.py -j JOURNAL_DIR with ending=fail output_mb=70 pause=1

``ending``: complete (returns a hostile result), fail (raises), custom (a SacredInterrupt
whose STATUS is longer than any status column).
"""

import datetime as dt
import sys
import time

import numpy as np
from sacred import Experiment
from sacred.utils import SacredInterrupt

from runrelay.eventlog.sacred import journal_option

ex = Experiment("hostile", additional_cli_options=[journal_option], save_git_info=False)


class Drained(SacredInterrupt):
    STATUS = "DRAINED_BY_THE_CLUSTER_SCHEDULER_FOR_MAINTENANCE_OF_THE_NODE_AND_ITS_NEIGHBOURS"


def nested(depth):
    value = "bottom"
    for _ in range(depth):
        value = {"down": value}
    return value


@ex.config
def config():
    ending = "complete"
    output_mb = 70  # of output printed between two heartbeats: more than one journal record holds
    pause = 0.0  # seconds to wait after the output, for a heartbeat to take it
    flops = 3 * 10**21  # beyond MessagePack's 64 bits
    grid = {"sizes": (1, 2, 3), "name": "é\u2603"}


@ex.main
def main(_run, ending, output_mb, pause, flops):
    _run.info["huge"] = 2**10000  # beyond what the journal keeps exactly
    _run.info["deep"] = nested(300)  # deeper than the journal keeps
    _run.info["keys"] = {5: "int", (1, 2): "tuple", None: "none", 1.5: "float"}
    _run.info["numpy"] = {"array": np.arange(6).reshape(2, 3), "scalar": np.float32(0.5), "set": {1, 2}}
    _run.info["raw"] = b"\0\xff"
    _run.info["when"] = dt.datetime(2024, 5, 1, 12, 0, 0, 123456)
    _run.log_scalar("flops", flops * 2**40)
    _run.log_scalar("loss", np.float64(0.25))
    _run.log_scalar("x" * 300, 1.0)  # a metric name longer than any name column
    lines = ("0123456789abcdef" * 4 + "\n") * (16 * 1024)  # 1 MiB
    for _ in range(output_mb):
        sys.stdout.write(lines)
    print("the last line", flush=True)  # Sacred reads what reached the file, not what Python buffers
    time.sleep(pause)
    if ending == "fail":
        raise RuntimeError("hostile failure " + "!" * 100_000)
    if ending == "custom":
        raise Drained()
    return {"flops": -flops, "deep": nested(300), (1, 2): np.arange(3)}


if __name__ == "__main__":
    ex.run_commandline()

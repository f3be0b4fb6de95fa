"""A Sacred experiment with one observer wrapped by ``runrelay.durable`` (the durable tests).

    python durable_experiment.py JOURNAL_DIR SPEC [Sacred arguments] with steps=N report_fd=3

SPEC picks the observer: ``tinydb:DIR``, ``filestorage:DIR``, ``sql:URL``, ``counting:FILE``,
``raising:FILE``, ``webhook:URL``, ``mongo:URL`` (the database the URL names); ``plain-KIND:TARGET`` attaches it unwrapped (the reference); ``drain_seconds`` comes from the
environment (RUNRELAY_TEST_DRAIN, default the wrapper's). After each ``log_scalar`` and
``add_artifact`` call has returned it writes "metric loss STEP" or "artifact NAME" as one
line to ``report_fd``.
"""

import os
import sys
import time

from sacred import Experiment
from pymongo.uri_parser import parse_uri
from sacred.observers import FileStorageObserver, MongoObserver, SqlObserver, TinyDbObserver

import durable_observers
import runrelay

journal_dir, spec = sys.argv.pop(1), sys.argv.pop(1)
kind, _, target = spec.partition(":")
plain = kind.startswith("plain-")  # the reference: Sacred's observer alone
ex = Experiment("durable", save_git_info=False)
OBSERVERS = {"tinydb": TinyDbObserver, "filestorage": FileStorageObserver, "sql": SqlObserver,
             "counting": durable_observers.CountingObserver, "raising": durable_observers.RaisingObserver,
             "webhook": durable_observers.WebhookObserver,
             "mongo": lambda url: MongoObserver(url, db_name=parse_uri(url)["database"])}
observer = OBSERVERS[kind.removeprefix("plain-")](target)
if plain:
    ex.observers.append(observer)
else:
    drain = {"drain_seconds": float(os.environ["RUNRELAY_TEST_DRAIN"])} if "RUNRELAY_TEST_DRAIN" in os.environ else {}
    ex.observers.append(runrelay.durable(observer, journal_dir=journal_dir, **drain))


@ex.config
def config():
    steps = 20
    artifact_every = 5
    poison_at = -1  # the step whose artifact is named poison.txt
    pause = 0.0
    report_fd = 1
    workdir = "."


@ex.main
def main(_run, steps, artifact_every, poison_at, pause, report_fd, workdir):
    for step in range(steps):
        _run.log_scalar("loss", 1 / (step + 1), step)
        os.write(report_fd, f"metric loss {step}\n".encode())
        if step % artifact_every == 0 or step == poison_at:
            name = "poison.txt" if step == poison_at else f"model-{step}.txt"
            path = os.path.join(workdir, name)
            with open(path, "w") as file:
                file.write(f"weights at step {step}\n")
            _run.add_artifact(path, name)
            # The journal took its bytes: a wrapped observer never reads the user's file (Sacred's
            # own TinyDbObserver, a reference, opens it again at every save).
            if not plain:
                os.remove(path)
            os.write(report_fd, f"artifact {name}\n".encode())
        _run.info["step"] = step
        print(f"step {step}")
        time.sleep(pause)
    return steps


if __name__ == "__main__":
    ex.run_commandline()

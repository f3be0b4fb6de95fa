"""User-written Sacred observers for the durable tests, importable by the daemon too (the
tests put this directory on its PYTHONPATH and name the classes in its sink URLs)."""

import json
import os
import urllib.request
import uuid

from sacred.observers import RunObserver


class CountingObserver(RunObserver):
    """Appends one JSON line per call it takes to ``path`` (one write each), with the pid of
    the process that fed it, so a test can count what arrived and from whom."""

    def __init__(self, path):
        self.path = path
        self.run_id = None

    def runrelay_reattach(self, _id):
        self.run_id = _id

    def _log(self, call, **fields):
        line = json.dumps({"call": call, "run": self.run_id, "pid": os.getpid(), **fields}, default=str) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def started_event(self, ex_info, command, host_info, start_time, config, meta_info, _id):
        self.run_id = _id or uuid.uuid4().hex
        sources = {name: open(os.path.join(ex_info["base_dir"], name)).read() for name, _ in ex_info["sources"]}
        self._log("started", config=config, sources=sorted(sources))
        return self.run_id

    def heartbeat_event(self, info, captured_out, beat_time, result):
        self._log("heartbeat", info=info)

    def log_metrics(self, metrics_by_name, info):
        points = [[name, step] for name, series in metrics_by_name.items() for step in series["steps"]]
        self._log("metrics", points=points)

    def artifact_event(self, name, filename, metadata=None, content_type=None):
        with open(filename) as file:
            self._log("artifact", name=name, content=file.read())

    def completed_event(self, stop_time, result):
        self._log("completed", result=result)

    def interrupted_event(self, interrupt_time, status):
        self._log("interrupted", status=status)

    def failed_event(self, fail_time, fail_trace):
        self._log("failed")


class RaisingObserver(CountingObserver):
    """A CountingObserver that can never take the artifact named ``poison``."""

    def __init__(self, path, poison="poison.txt"):
        super().__init__(path)
        self.poison = poison

    def artifact_event(self, name, filename, metadata=None, content_type=None):
        if name == self.poison:
            raise ValueError(f"{name} is not welcome here")
        super().artifact_event(name, filename, metadata, content_type)


class WebhookObserver(RunObserver):
    """A notifier: posts each run's completion (its experiment name and result) to ``url``."""

    def __init__(self, url):
        self.url = url
        self.run_id = None

    def runrelay_reattach(self, _id):
        self.run_id = _id

    def started_event(self, ex_info, command, host_info, start_time, config, meta_info, _id):
        self.run_id = _id or f"{ex_info['name']}-{config['seed']}"
        return self.run_id

    def completed_event(self, stop_time, result):
        body = json.dumps({"run": self.run_id, "result": result}).encode()
        request = urllib.request.Request(self.url, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as response:
            response.read()

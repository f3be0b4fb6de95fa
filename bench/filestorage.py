"""FileStorage benchmark: bytes written for one long run, the FileStorage sinks beside Sacred's
own FileStorageObserver for the same run, in the same process.

    python bench/filestorage.py [--points N] [--rate R] [--beat S] [--stores file,s3,gs] [--dir DIR]

One run of N metric points (four names), logged at R points per second of the run's own
time, with a heartbeat and a line of captured output every S seconds, then completed.

- Sacred: its FileStorageObserver is handed the run as Sacred hands it (``log_metrics`` with
  the points since the last beat, then ``heartbeat_event``, every S seconds; the ending), and
  rewrites metrics.json at every beat. Bytes: this process's ``wchar`` (/proc/self/io) over it.
- runrelay: the journal of the same run replayed into each store one second of the run at a
  time (a live daemon's batches), the sink's clock set to the run's time of each batch, with
  the default rewrite cadence. Bytes: what the sink hands its store (every ``put`` and claim),
  and for file:// also ``wchar`` (its temp files and the metrics spool included).

The defaults are CI-sized; docs/benchmarks.md has the command for the 1M-point figures.
s3:// and gs:// use throwaway moto and fake-gcs-server processes from tests/servers.py,
skipped with the reason when they cannot start. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from runrelay.eventlog import Journal, JournalWriter, Kind  # noqa: E402
from runrelay.sinks.filestorage import DEFAULT_REWRITE_GROWTH, DEFAULT_REWRITE_SECONDS  # noqa: E402

NAMES = ["training.loss", "accuracy", "lr", "grad.norm"]
T0 = dt.datetime(2024, 5, 1, 12, 0, 0, 250000)
OUTPUT_LINE = "epoch {beat}: loss 0.123456 accuracy 0.987654 lr 0.001000 (a typical progress line)\n"
EX_INFO = {"name": "bench", "base_dir": "/tmp", "sources": [], "dependencies": ["sacred==0.8.7"],
           "repositories": [], "mainfile": "bench.py"}
HOST = {"hostname": "bench", "cpu": "cpu", "os": ["Linux", "Linux-6"], "python_version": "3.11.7", "ENV": {}}
META = {"command": "main", "options": {}}
CONFIG = {"lr": 0.001, "seed": 1}


def wchar() -> int:
    with open("/proc/self/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("wchar:"))


def the_run(points: int, rate: int, beat: float):
    """(second of the run, [(name, step, value, timestamp)] logged in it) for each second."""
    seconds = -(-points // rate)
    for second in range(seconds):
        count = min(rate, points - second * rate)
        first = second * rate
        yield second, [(NAMES[index % len(NAMES)], index // len(NAMES), index * 1e-6,
                        T0 + dt.timedelta(seconds=second + (index - first) / rate))
                       for index in range(first, first + count)]


def beats_in(second: int, beat: float) -> list[int]:
    """The beat numbers that fall within ``second`` of the run."""
    return [number for number in range(int(second // beat), int((second + 1) // beat) + 1)
            if second <= number * beat < second + 1 and number > 0]


def sacred_observer(place: Path, points: int, rate: int, beat: float) -> dict:
    from sacred.observers import FileStorageObserver

    observer = FileStorageObserver(str(place))
    began, written = time.perf_counter(), wchar()
    observer.started_event(EX_INFO, "main", HOST, T0, CONFIG, META, _id=None)
    pending: dict[str, dict[str, list]] = {}
    output, last = "", 0
    for second, logged in the_run(points, rate, beat):
        for name, step, value, stamp in logged:
            series = pending.setdefault(name, {"steps": [], "values": [], "timestamps": []})
            series["steps"].append(step)
            series["values"].append(value)
            series["timestamps"].append(stamp)
        for number in beats_in(second, beat):
            output += OUTPUT_LINE.format(beat=number)
            observer.log_metrics(pending, {})
            pending = {}
            observer.heartbeat_event({}, output, T0 + dt.timedelta(seconds=number * beat), None)
        last = second
    observer.log_metrics(pending, {})
    observer.heartbeat_event({}, output, T0 + dt.timedelta(seconds=last + 1), None)
    observer.completed_event(T0 + dt.timedelta(seconds=last + 1), 0.5)
    return {"bytes": wchar() - written, "seconds": time.perf_counter() - began,
            "metrics.json": os.path.getsize(place / "1" / "metrics.json")}


def write_journal(root: Path, points: int, rate: int, beat: float) -> tuple[str, list[int]]:
    """The run's journal; the last seq of each second (the batches a live daemon would make)."""
    ends = []
    with JournalWriter.create(root) as writer:
        writer.append(Kind.STARTED, {"ex_info": EX_INFO, "command": "main", "host_info": HOST, "start_time": T0,
                                     "config": CONFIG, "meta_info": META})
        output, last = "", 0
        for second, logged in the_run(points, rate, beat):
            for name, step, value, stamp in logged:
                writer.append_metric(name, step, value, stamp)
            for number in beats_in(second, beat):
                writer.append(Kind.HEARTBEAT, {"beat_time": T0 + dt.timedelta(seconds=number * beat), "info": {},
                                               "result": None,
                                               "captured_out_append": OUTPUT_LINE.format(beat=number)})
            ends.append(writer.next_seq - 1)
            last = second
        writer.append(Kind.COMPLETED, {"stop_time": T0 + dt.timedelta(seconds=last + 1), "result": 0.5})
        ends.append(writer.next_seq - 1)
    return writer.run, ends


def replay(url: str, journal: Journal, run: str, ends: list[int]) -> dict:
    from sinkkit import Delivery, open_sink

    sink = open_sink(url, journal)
    sent = {"bytes": 0, "puts": 0, "metrics.json": 0}
    put, claim = sink.store.put, sink.store.claim_run

    def counted_put(key, data):
        size = len(data) if isinstance(data, bytes) else os.fstat(data.fileno()).st_size
        sent["bytes"] += size
        sent["puts"] += 1
        sent["metrics.json"] += key.endswith("metrics.json")
        return put(key, data)

    def counted_claim(run_id, run_json):
        sent["bytes"] += len(run_json)
        return claim(run_id, run_json)

    sink.store.put, sink.store.claim_run = counted_put, counted_claim
    delivery = Delivery(journal, run)
    began, written = time.perf_counter(), wchar()
    try:
        for second, end in enumerate(ends):
            sink.clock = lambda second=second: T0.timestamp() + second + 1
            delivery.apply(sink, through=end)
    finally:
        sink.close()
    return {**sent, "wchar": wchar() - written, "seconds": time.perf_counter() - began, "events": ends[-1] + 1}


def bucket_url(scheme: str, stack: list):
    """A fresh bucket on a throwaway server, or the reason there is none."""
    from servers import FakeGcsServer, MotoServer, ServerUnavailable

    server = MotoServer() if scheme == "s3" else FakeGcsServer()
    stack.append(server)
    try:
        server.start()
    except (ServerUnavailable, RuntimeError) as error:
        return None, str(error).splitlines()[0]
    server.create_bucket("bench")
    if scheme == "s3":
        os.environ.update(AWS_ENDPOINT_URL_S3=server.endpoint, AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION=server.region)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = server.endpoint
    return f"{scheme}://bench/runs", None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=200_000)
    parser.add_argument("--rate", type=int, default=2_000, help="points per second of the run")
    parser.add_argument("--beat", type=float, default=10.0, help="Sacred's heartbeat interval, seconds")
    parser.add_argument("--stores", default="file,s3,gs")
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    place = Path(tempfile.mkdtemp(prefix="runrelay-bench-fs-", dir=args.dir))
    servers: list = []
    try:
        duration = -(-args.points // args.rate)
        print(f"one run: {args.points:,} points over {duration:,} s of run time, a beat every {args.beat:g} s; "
              f"rewrite cadence: {DEFAULT_REWRITE_GROWTH:.0%} growth and {DEFAULT_REWRITE_SECONDS:g} s (defaults)")
        theirs = sacred_observer(place / "sacred", args.points, args.rate, args.beat)
        print(f"Sacred FileStorageObserver: {theirs['bytes'] / 1e6:,.1f} MB written in {theirs['seconds']:.1f} s; "
              f"final metrics.json {theirs['metrics.json'] / 1e6:,.1f} MB")
        journal = Journal(place / "journal")
        run, ends = write_journal(journal.root, args.points, args.rate, args.beat)
        for scheme in args.stores.split(","):
            url, reason = (f"file://{place / 'runs'}", None) if scheme == "file" else bucket_url(scheme, servers)
            if url is None:
                print(f"{scheme}://: skipped ({reason})")
                continue
            ours = replay(url, journal, run, ends)
            extra = f", wchar {ours['wchar'] / 1e6:,.1f} MB" if scheme == "file" else ""
            print(f"runrelay {scheme}://: {ours['bytes'] / 1e6:,.1f} MB put in {ours['puts']:,} objects "
                  f"({ours['metrics.json']} metrics.json){extra}; {ours['events'] / ours['seconds']:,.0f} events/s "
                  f"({ours['seconds']:.1f} s); Sacred/runrelay bytes {theirs['bytes'] / ours['bytes']:.1f}x")
    finally:
        for server in servers:
            server.cleanup()
        shutil.rmtree(place, ignore_errors=True)


if __name__ == "__main__":
    main()

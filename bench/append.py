"""Append benchmark: journal appends beside bare os.write and os.write + fsync, same process.

    python bench/append.py [--metrics N] [--lifecycle N] [--resume N] [--dir DIR]

Goals (issue 7): metric append p50 <= 1.5 us, p99 <= 4 us, >= 500k events/s on one core;
lifecycle append p99 <= 1.2x the bare write + fdatasync; a producer resuming a 1M-event run
starts in <= 50 ms. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import tempfile
import time

from runrelay.eventlog import JournalWriter, Kind
from runrelay.eventlog import codec
from runrelay.eventlog.format import encode_record


def percentiles(samples_ns: list[int]) -> tuple[float, float]:
    cuts = statistics.quantiles(samples_ns, n=100, method="inclusive")
    return cuts[49] / 1000, cuts[98] / 1000


def timed(calls, fn) -> tuple[list[int], float]:
    samples = []
    clock = time.perf_counter_ns
    begin = clock()
    for i in range(calls):
        start = clock()
        fn(i)
        samples.append(clock() - start)
    return samples, (clock() - begin) / 1e9


def metric_body(i: int) -> dict:
    return {"name": "training.loss", "step": i, "value": 1.0 / (i + 1), "timestamp": dt.datetime.utcnow()}


def lifecycle_body(i: int) -> dict:
    return {"name": f"model-{i}.pt", "filename": "/tmp/model.pt", "digest": "ab" * 32, "md5": "cd" * 16,
            "size": 12345, "metadata": None, "content_type": None}


def bare_file(directory: str, name: str) -> int:
    return os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)


def report(label: str, samples: list[int], seconds: float, baseline_p99: float | None = None) -> float:
    p50, p99 = percentiles(samples)
    rate = len(samples) / seconds
    ratio = f"  p99 ratio {p99 / baseline_p99:5.2f}x" if baseline_p99 else ""
    print(f"{label:<34} p50 {p50:8.2f} us  p99 {p99:8.2f} us  {rate:>12,.0f} events/s{ratio}")
    return p99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metrics", type=int, default=300_000, help="metric appends to time")
    parser.add_argument("--lifecycle", type=int, default=3_000, help="lifecycle appends to time")
    parser.add_argument("--resume", type=int, default=1_000_000, help="events in the run to resume (0: skip)")
    parser.add_argument("--dir", default=None, help="directory on the disk to measure (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        record = encode_record(0, codec.encode(["metrics", 0, metric_body(0)]))
        fd = bare_file(directory, "bare-metrics")
        base_samples, base_seconds = timed(args.metrics, lambda i: os.write(fd, record))
        os.close(fd)
        writer = JournalWriter.create(os.path.join(directory, "journal"))
        fast = writer.append_metric
        utcnow = dt.datetime.utcnow
        # What the Sacred observer and the Recorder call: the point and Sacred's naive utcnow().
        fast_samples, fast_seconds = timed(args.metrics, lambda i: fast("training.loss", i, 1.0 / (i + 1), utcnow()))
        samples, seconds = timed(args.metrics, lambda i: writer.append(Kind.METRICS, metric_body(i)))
        print(f"metric events ({args.metrics:,}; bare record {len(record)} bytes; group commit every 0.2 s)")
        base_p99 = report("  bare os.write", base_samples, base_seconds)
        report("  journal append_metric (columns)", fast_samples, fast_seconds, base_p99)
        report("  journal append (metrics body)", samples, seconds, base_p99)

        record = encode_record(0, codec.encode(["artifact", 0, lifecycle_body(0)]))
        fd = bare_file(directory, "bare-lifecycle")

        def write_and_sync(i):
            os.write(fd, record)
            os.fdatasync(fd)

        base_samples, base_seconds = timed(args.lifecycle, write_and_sync)
        os.close(fd)
        samples, seconds = timed(args.lifecycle, lambda i: writer.append(Kind.ARTIFACT, lifecycle_body(i)))
        writer.close()
        print(f"lifecycle events ({args.lifecycle:,}; record {len(record)} bytes; fsynced before returning)")
        base_p99 = report("  bare os.write + fdatasync", base_samples, base_seconds)
        report("  journal append (lifecycle)", samples, seconds, base_p99)
        if args.resume:
            resume(directory, args.resume)


def resume(directory: str, events: int) -> None:
    """Time JournalWriter.resume of a run of ``events`` metric events, killed mid-run: with the
    writer's resume hint (as a crashed writer leaves it) and without it (every record checked)."""
    import shutil
    import subprocess
    import sys

    root = os.path.join(directory, "resume")
    child = (
        "import sys, os, signal\n"
        "from runrelay.eventlog import JournalWriter\n"
        "w = JournalWriter.create(sys.argv[1])\n"
        "for i in range(int(sys.argv[2])):\n"
        "    w.append_metric('training.loss', i, 1.0 / (i + 1), None)\n"
        "print(w.run, flush=True)\n"
        "import time; time.sleep(0.5)\n"  # a group commit leaves the hint, then kill -9
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    run = subprocess.run([sys.executable, "-c", child, root, str(events)], capture_output=True, text=True).stdout.strip()
    kept = os.path.join(directory, "resume-copy")
    shutil.copytree(root, kept)
    print(f"resume a killed run of {events:,} metric events ({len(os.listdir(os.path.join(root, run))) - 1} segments)")
    for label, drop_hint in (("with the resume hint", False), ("without it (every record checked)", True)):
        shutil.rmtree(root)
        shutil.copytree(kept, root)
        if drop_hint:
            os.truncate(os.path.join(root, run, "writer.lock"), 0)
        begin = time.perf_counter()
        writer = JournalWriter.resume(root, run)
        took = time.perf_counter() - begin
        assert writer.next_seq == events
        writer.close()
        print(f"  JournalWriter.resume {label:<34} {took * 1000:9.1f} ms")


if __name__ == "__main__":
    main()

"""Append benchmark: journal appends beside bare os.write and os.write + fsync, same process.

    python bench/append.py [--metrics N] [--lifecycle N] [--dir DIR]

Goals (issue 2): metric append p99 <= 10 us and >= 200k events/s; lifecycle append
p99 <= 1.5x the bare write + fsync. Figures are printed, never asserted.
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
    parser.add_argument("--dir", default=None, help="directory on the disk to measure (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        record = encode_record(0, codec.encode(["metrics", 0, metric_body(0)]))
        fd = bare_file(directory, "bare-metrics")
        base_samples, base_seconds = timed(args.metrics, lambda i: os.write(fd, record))
        os.close(fd)
        writer = JournalWriter.create(os.path.join(directory, "journal"))
        samples, seconds = timed(args.metrics, lambda i: writer.append(Kind.METRICS, metric_body(i)))
        print(f"metric events ({args.metrics:,}; record {len(record)} bytes; group commit every 0.2 s)")
        base_p99 = report("  bare os.write", base_samples, base_seconds)
        report("  journal append (metrics)", samples, seconds, base_p99)

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


if __name__ == "__main__":
    main()

"""The FileStorage sinks (file://, s3://, gs://): Sacred's layout byte for byte, metrics.json
streamed from the journal at a bounded cadence, artifact names that cannot leave the run
directory, run ids that survive a crash between recording and claiming them, many writers
allocating ids in one base at once (sink processes; three `runrelay sync` processes into one
bucket and one directory), and the exact reads incense and Sacredboard make."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from runrelay.eventlog import Journal, Kind
from runrelay.eventlog import reader
from sinkkit import Delivery, artifact, beat, deliver, lifecycle, open_sink, point, started, write_run
from test_replay_crash import delivery_args, runrelay_env
from test_sink_contract import bucket_read_back, directory_read_back, files, journal  # noqa: F401 - fixtures

SACREDBOARD_TIME = "%Y-%m-%dT%H:%M:%S.%f"  # how Sacredboard's file mode parses run.json's times
INCENSE_RESERVED = {"run.json", "cout.txt", "metrics.json", "config.json"}  # what incense does not call an artifact


# the longer tests run on buckets under -m slow only (CI time)
BUCKETS_SLOW = pytest.mark.parametrize("base", ["file", *(pytest.param(scheme, marks=pytest.mark.slow)
                                                         for scheme in ("s3", "gs"))], indirect=True)


@pytest.fixture(params=["file", "s3", "gs"])
def base(request, tmp_path, monkeypatch):
    """A fresh FileStorage base of each store, read back through ``read(key)``."""
    if request.param == "file":
        return directory_read_back(tmp_path / "runs")
    server = request.getfixturevalue("moto_server" if request.param == "s3" else "gcs_server")
    return bucket_read_back(request.param, server, monkeypatch, f"{request.node.name[-20:]}-{id(tmp_path):x}")


def run_id(base, uid: str) -> int:
    return json.loads(base.read(f"_runrelay/runs/{uid}.json"))["id"]


def sacred_text(value) -> bytes:
    return json.dumps(value, sort_keys=True, indent=2).encode()


# --- the layout --------------------------------------------------------------------------------


def test_a_run_is_written_in_sacreds_layout_byte_for_byte(base, journal, files):
    uid = write_run(journal, lifecycle(files))
    sink = open_sink(base.url, journal)
    try:
        deliver(sink, journal, uid, 3, 6)
    finally:
        sink.close()
    number = run_id(base, uid)
    assert number == 1 and base.run_ids() == ["1"]
    for name in ("run.json", "config.json", "info.json", "metrics.json"):
        text = base.read(f"1/{name}")
        assert text == sacred_text(json.loads(text)), f"{name} is not json.dumps(sort_keys=True, indent=2)"
    entry = json.loads(base.read("1/run.json"))
    for name in ("start_time", "heartbeat", "stop_time"):
        assert dt.datetime.strptime(entry[name], SACREDBOARD_TIME)
    assert entry["start_time"] == "2024-05-01T12:00:00.123456" and entry["stop_time"] == "2024-05-01T12:00:09.123456"
    assert entry["status"] == "COMPLETED" and entry["result"] == 0.25 and entry["artifacts"] == ["model.bin"]
    md5 = hashlib.md5((files / "train.py").read_bytes()).hexdigest()
    assert entry["experiment"]["sources"] == [["train.py", f"_sources/train_{md5}.py"]]
    assert base.read(f"_sources/train_{md5}.py") == (files / "train.py").read_bytes()
    [[filename, location]] = entry["resources"]
    assert filename == str(files / "data.csv") and base.read(base.key(location)) == (files / "data.csv").read_bytes()
    data_md5 = hashlib.md5((files / "data.csv").read_bytes()).hexdigest()
    assert base.key(location) == f"_resources/data_{data_md5}.csv"
    assert json.loads(base.read("1/config.json"))["when"]["py/object"] == "datetime.datetime"  # Sacred's flatten
    assert json.loads(base.read("1/info.json")) == {"epoch": 5}
    assert base.read("1/cout.txt") == b"epoch 1\nepoch 2\n"
    assert base.read("1/model.bin") == bytes(range(256)) * 4
    stamps = [f"2024-05-01T12:00:0{second}.123456" for second in (1, 2, 4)]
    assert base.read("1/metrics.json") == sacred_text({
        "accuracy": {"steps": [0], "timestamps": [stamps[2]], "values": [3]},
        "loss": {"steps": [0, 1, 2], "timestamps": stamps, "values": [0.5, float("nan"), float("inf")]},
    })


def test_info_cout_and_metrics_exist_from_the_first_event(tmp_path, journal, files):
    """incense reads all five files of a run directory; Sacred writes info.json only once info is non-empty."""
    uid = write_run(journal, lifecycle(files)[:1])
    sink = open_sink(f"file://{tmp_path / 'runs'}", journal)
    deliver(sink, journal, uid)
    sink.close()
    run_dir = tmp_path / "runs" / "1"
    assert sorted(path.name for path in run_dir.iterdir()) == ["config.json", "cout.txt", "info.json", "metrics.json",
                                                              "run.json"]
    assert (run_dir / "info.json").read_text() == "{}" and (run_dir / "metrics.json").read_text() == "{}"
    assert (run_dir / "cout.txt").read_text() == ""


def test_metrics_json_streamed_chunk_by_chunk_is_what_json_dumps_writes(tmp_path, journal, files, monkeypatch):
    monkeypatch.setattr(reader, "POINTS_CHUNK", 7)  # many chunks, names spread across them
    steps = [started(files)]
    expected: dict[str, dict] = {}
    for index in range(60):
        name = ("loss", "accuracy", 'a "quoted" name é')[index % 3]
        value = [0.5, float("nan"), -float("inf"), 3, 10**20][index % 5] if index % 4 else index / 7
        steps.append(point(name, index, value, index))
        series = expected.setdefault(name, {"steps": [], "timestamps": [], "values": []})
        series["steps"].append(index)
        series["values"].append(value)
        series["timestamps"].append((dt.datetime(2024, 5, 1, 12, 0, 0, 123456) + dt.timedelta(seconds=index))
                                    .strftime(SACREDBOARD_TIME))
    steps.append((Kind.COMPLETED, {"stop_time": dt.datetime(2024, 5, 2), "result": None}))
    uid = write_run(journal, steps)
    sink = open_sink(f"file://{tmp_path / 'runs'}", journal)
    deliver(sink, journal, uid, *range(5, 60, 11))
    sink.close()
    assert (tmp_path / "runs" / "1" / "metrics.json").read_bytes() == sacred_text(expected)


def metrics_versions(tmp_path, journal, files, **options) -> tuple[list[int], int]:
    """Deliver 400 points in 100 batches; the metrics.json point counts seen after each batch."""
    steps = [started(files)] + [point("loss", index, index * 0.5, index) for index in range(400)]
    uid = write_run(journal, steps + [(Kind.COMPLETED, {"stop_time": dt.datetime(2024, 5, 2), "result": None})])
    sink = open_sink(f"file://{tmp_path / 'runs'}", journal, **options)
    delivery, seen = Delivery(journal, uid), []
    try:
        for cut in range(4, 401, 4):
            delivery.apply(sink, through=cut)
            seen.append(len(json.loads((tmp_path / "runs/1/metrics.json").read_text()).get("loss", {}).get("steps", [])))
        delivery.apply(sink)
    finally:
        sink.close()
    final = len(json.loads((tmp_path / "runs/1/metrics.json").read_text())["loss"]["steps"])
    return seen, final


def test_metrics_json_is_rewritten_as_it_grows_by_half_not_at_every_batch(tmp_path, journal, files):
    seen, final = metrics_versions(tmp_path, journal, files, rewrite_seconds=1e-6, rewrite_growth=0.5)
    versions = sorted(set(seen))
    assert final == 400
    assert len(versions) <= 16, versions  # 1.5**14 > 400: a version per 50 % growth, not one per batch (100)
    assert all(later >= 1.5 * earlier for earlier, later in zip(versions[1:], versions[2:])), versions
    assert seen[-1] >= 400 / 1.5  # never staler than one growth step


def test_metrics_json_waits_for_rewrite_seconds_then_the_runs_end(tmp_path, journal, files):
    seen, final = metrics_versions(tmp_path, journal, files, rewrite_seconds=3600, rewrite_growth=0)
    assert set(seen) == {4} and final == 400  # the first points at once; no rewrite within the hour; the end


# --- names and ids -----------------------------------------------------------------------------


# A NUL or an over-long name is stored by the rule every sink follows (tests/test_sink_values.py).
@pytest.mark.parametrize("name", ["run.json", "metrics.json", "../outside", "a/b", "."])
def test_an_artifact_name_that_is_not_a_file_of_the_run_is_a_dead_letter(tmp_path, journal, files, name):
    uid = write_run(journal, [*lifecycle(files)[:7], artifact(files / "model.bin", name), lifecycle(files)[9]])
    sink = open_sink(f"file://{tmp_path / 'runs'}", journal)
    delivery = deliver(sink, journal, uid)
    sink.close()
    assert list(delivery.letters) == [7]
    run_dir = tmp_path / "runs" / "1"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "COMPLETED"
    assert json.loads((run_dir / "run.json").read_text())["artifacts"] == []
    assert not (tmp_path / "outside").exists() and not (run_dir / "a").exists()
    assert json.loads((run_dir / "metrics.json").read_text())["loss"]["steps"] == [0, 1, 2]


def test_ids_follow_sacreds_rule_beside_existing_runs(tmp_path, journal, files):
    base = tmp_path / "runs"
    (base / "3").mkdir(parents=True)  # a run of Sacred's own FileStorageObserver
    (base / "notes").mkdir()
    given = write_run(journal, [started(files, sacred_id=7)])
    taken = write_run(journal, [started(files, sacred_id=3)])
    plain = write_run(journal, [started(files)])
    sink = open_sink(f"file://{base}", journal)
    for uid in (given, taken, plain):
        deliver(sink, journal, uid)
    sink.close()
    assert [run_id(directory_read_back(base), uid) for uid in (given, taken, plain)] == [7, 8, 9]


def test_a_crash_between_recording_an_id_and_claiming_it_resumes_with_that_id(tmp_path, journal, files):
    base = tmp_path / "runs"
    first, second = write_run(journal, lifecycle(files)), write_run(journal, lifecycle(files))
    records = base / "_runrelay" / "runs"
    records.mkdir(parents=True)
    (records / f"{first}.json").write_text('{"id": 5}')  # recorded, then the daemon died
    sink = open_sink(f"file://{base}", journal)
    deliver(sink, journal, first)
    (records / f"{second}.json").write_text('{"id": 5}')  # recorded an id another writer then claimed
    deliver(sink, journal, second)
    deliver(sink, journal, first)
    sink.close()
    read = directory_read_back(base)
    assert run_id(read, first) == 5 and run_id(read, second) == 6 and sorted(read.run_ids()) == ["5", "6"]
    assert read.run(second)["status"] == "COMPLETED"


def test_a_record_or_book_that_is_not_the_sinks_is_never_followed(tmp_path, journal, files):
    base = tmp_path / "runs"
    uid = write_run(journal, lifecycle(files))
    (base / "_runrelay" / "runs").mkdir(parents=True)
    (base / "_runrelay" / "runs" / f"{uid}.json").write_text('{"id": "../../elsewhere"}')
    sink = open_sink(f"file://{base}", journal)
    deliver(sink, journal, uid, 5)
    entry = json.loads((base / "1" / "run.json").read_text())
    entry["runrelay"]["applied"] = "nine"  # a damaged book reads as nothing applied: all is written again
    (base / "1" / "run.json").write_text(json.dumps(entry))
    assert sink.applied(uid) == -1
    deliver(sink, journal, uid)
    sink.close()
    assert sorted(path.name for path in base.iterdir()) == ["1", "_resources", "_runrelay", "_sources"]
    assert directory_read_back(base).run(uid)["status"] == "COMPLETED"
    assert json.loads((base / "1" / "run.json").read_text())["runrelay"]["applied"] == 9


@BUCKETS_SLOW
def test_a_large_artifact_goes_up_in_parts(base, journal, files):
    large = files / "weights.bin"
    large.write_bytes(bytes(range(256)) * (17 * 4096 + 3))  # past the 16 MB part and chunk size
    uid = write_run(journal, [started(files), artifact(large)])
    sink = open_sink(base.url, journal)
    deliver(sink, journal, uid)
    sink.close()
    assert base.read(f"{run_id(base, uid)}/weights.bin") == large.read_bytes()


WRITER = """
import sys
sys.path.insert(0, {tests!r})
from runrelay.eventlog import Journal
from sinkkit import deliver, open_sink
journal = Journal(sys.argv[1])
sink = open_sink({url!r}, journal)
sys.stdin.readline()  # every writer starts at once
for uid in journal.runs():
    deliver(sink, journal, uid, 4)
sink.close()
"""


@BUCKETS_SLOW
def test_many_writers_allocate_distinct_ids_and_one_directory_per_run(base, tmp_path, files):
    writers, runs_each = 4, 6
    uids, children = [], []
    script = WRITER.format(tests=str(Path(__file__).parent), url=base.url)
    for number in range(writers):
        journal = Journal(tmp_path / f"journal-{number}")
        uids += [write_run(journal, lifecycle(files)) for _ in range(runs_each)]
        children.append(subprocess.Popen([sys.executable, "-c", script, str(journal.root)], stdin=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True))
    for child in children:
        child.stdin.write("go\n")
        child.stdin.flush()
    for child in children:
        assert child.wait(120) == 0, child.stderr.read()
    ids = sorted(int(name) for name in base.run_ids())
    assert ids == list(range(1, writers * runs_each + 1))
    owners = [json.loads(base.read(f"{number}/run.json"))["runrelay"]["uid"] for number in ids]
    assert sorted(owners) == sorted(uids)
    assert all(base.run(uid)["status"] == "COMPLETED" for uid in uids)


def test_three_daemons_with_separate_journals_into_one_bucket_and_one_directory(tmp_path, moto_server, monkeypatch,
                                                                               files):
    """Three `runrelay sync` processes (the daemon's delivery; separate journals and state
    directories) replay at once into one s3:// prefix and one file:// base each."""
    bases = [directory_read_back(tmp_path / "runs"),
             bucket_read_back("s3", moto_server, monkeypatch, f"daemons-{id(tmp_path):x}")]
    uids, children = [], []
    for number in range(3):
        journal = Journal(tmp_path / f"journal-{number}")
        uids += [write_run(journal, lifecycle(files)) for _ in range(4)]
        command = delivery_args("sync", journal.root, tmp_path / f"state-{number}", *(base.url for base in bases))
        children.append(subprocess.Popen([*command, "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True, env=runrelay_env(tmp_path / f"home-{number}")))
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0 and out.split()[:2] == ["delivered", "80"], out + err  # 4 runs x 10 events x 2
    for base in bases:
        ids = sorted(int(name) for name in base.run_ids())
        assert ids == list(range(1, len(uids) + 1)), base.url
        owners = [json.loads(base.read(f"{number}/run.json"))["runrelay"]["uid"] for number in ids]
        assert sorted(owners) == sorted(uids), base.url
        for uid in uids:
            run = base.run(uid)
            assert run["status"] == "COMPLETED" and len(run["metrics"]) == 4 and len(run["artifacts"]) == 1, base.url


# --- what the real readers read ----------------------------------------------------------------


def test_incense_and_sacredboard_read_every_run_as_they_read_files(tmp_path, journal, files):
    """The reads of incense 0.0.15's FileSystemExperimentLoader (five files, int(name), every other
    plain file an artifact) and of Sacredboard 0.4.2's file mode (list the base, skip
    _sources, skip an entry whose files are missing, strptime three times with %f)."""
    base = tmp_path / "runs"
    endings = [None, (Kind.FAILED, {"fail_time": dt.datetime(2024, 5, 1, 13), "fail_trace": ["Traceback", "boom"]}),
               (Kind.INTERRUPTED, {"interrupt_time": dt.datetime(2024, 5, 1, 13), "status": "TIMEOUT"})]
    uids = [write_run(journal, lifecycle(files, ending)) for ending in endings]
    sink = open_sink(f"file://{base}", journal)
    for uid in uids:
        deliver(sink, journal, uid, 5)
    sink.close()

    for run_dir in (path for path in base.iterdir() if path.name.isdigit()):  # incense
        int(run_dir.name)
        for name in ("config.json", "info.json", "run.json", "metrics.json"):
            json.loads((run_dir / name).read_text())
        (run_dir / "cout.txt").read_text()
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert all(len(series["values"]) == len(series["steps"]) for series in metrics.values())
        artifacts = {path.name for path in run_dir.iterdir() if path.name not in INCENSE_RESERVED and not path.is_dir()}
        assert artifacts == {"info.json", "model.bin"}  # info.json too, as for Sacred's own runs

    listed = []
    for name in (name for name in os.listdir(base) if name != "_sources"):  # Sacredboard
        try:
            run = json.loads((base / name / "run.json").read_text())
            json.loads((base / name / "config.json").read_text())
            json.loads((base / name / "info.json").read_text())
        except FileNotFoundError:
            continue
        for key in ("start_time", "stop_time", "heartbeat"):
            dt.datetime.strptime(run[key], SACREDBOARD_TIME)
        listed.append(run["status"])
    assert sorted(listed) == ["COMPLETED", "FAILED", "TIMEOUT"]


def test_a_running_run_is_listed_with_a_heartbeat_in_sacredboards_form(tmp_path, journal, files):
    uid = write_run(journal, [started(files), beat(3, "x\n")])
    sink = open_sink(f"file://{tmp_path / 'runs'}", journal)
    deliver(sink, journal, uid)
    sink.close()
    entry = json.loads((tmp_path / "runs/1/run.json").read_text())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}", entry["heartbeat"]) and "stop_time" not in entry


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_no_such_bucket_is_unusable_and_a_closed_port_transient(scheme, request, journal):
    from runrelay.sinks.base import TransientSinkError, UnusableSinkError
    from runrelay.sinks.registry import sink_for

    server = request.getfixturevalue("moto_server" if scheme == "s3" else "gcs_server")
    server.start()
    option = "endpoint_url" if scheme == "s3" else "endpoint"
    credentials = {"access_key_id": "test", "secret_access_key": "test", "region": "eu-west-1"} if scheme == "s3" else {}
    for endpoint, expected in ((server.endpoint, UnusableSinkError), ("http://127.0.0.1:1", TransientSinkError)):
        sink = sink_for("test", f"{scheme}://no-such-bucket/runs", {option: endpoint, "timeout_seconds": 2, **credentials},
                        journal)
        with pytest.raises(expected):
            sink.open()
        sink.close()


def test_a_base_that_cannot_be_a_directory_is_unusable(tmp_path, journal):
    from runrelay.sinks.base import UnusableSinkError

    (tmp_path / "file").write_text("")
    with pytest.raises(UnusableSinkError):
        open_sink(f"file://{tmp_path / 'file' / 'runs'}", journal)

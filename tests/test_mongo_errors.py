"""What MongoDB cannot take as it is, against the real server (SecantusDB, or
$RUNRELAY_TEST_MONGO_URL): keys with ``$`` or ``.`` renamed by Sacred's rule, ints beyond
64 bits kept, a run document past 16 MB refused for its event only, refused credentials
and databases unusable, and every wait bounded by the sink's ``timeout_seconds``."""

from __future__ import annotations

import math
import threading
import time

import gridfs
import pytest
from sacred.observers.mongo import force_bson_encodeable

from runrelay.eventlog import Kind
from runrelay.sinks.base import TransientSinkError, UnusableSinkError
from servers import MongoServer, start_or_skip
from sinkkit import Delivery, artifact, at, deliver, lifecycle, open_sink, point, started, write_run
from test_mongo_sink import db, files, journal, omniboard_runs, sink  # noqa: F401 - fixtures

USER = ("runrelay", "s3cret", "granted")  # (name, password, the one database it may use)
TIMEOUT_SECONDS = 1.0
HANG_BOUND_SECONDS = 15.0  # far above TIMEOUT_SECONDS: only a wait the option does not bound passes it


def test_keys_with_dollar_or_dot_are_renamed_by_sacreds_rule_and_the_readers_load_them(sink, db, journal, files):
    config = {"lr": 0.1, "a.b": 1, "$x": {"c.d": {"$e": 2}}}
    clashing = {"q.r": 3, "q,r": 4}  # renamed alike: both kept
    info = {"$set": 1, "x.y": [{"p.q": {"deep.er": True}}]}  # Sacred renames no key inside a list; runrelay does
    run = write_run(journal, [
        started(files, config={**config, **clashing}), point("loss", 0, 0.5, 1),
        (Kind.HEARTBEAT, {"beat_time": at(2), "info": info, "result": {"best.loss": 0.5}, "captured_out_append": ""}),
        (Kind.ARTIFACT, {**artifact(files / "model.bin")[1], "metadata": {"$where": "x", "v.1": 2}}),
        (Kind.COMPLETED, {"stop_time": at(3), "result": {"best.loss": 0.25}}),
    ])
    delivery = deliver(sink, journal, run, 1, 3)  # the run created, then updated twice
    assert delivery.letters == {}

    [document] = db.runs.find()
    assert {key: value for key, value in document["config"].items() if key.startswith("q")} == {"q,r,": 3, "q,r": 4}
    stored_config = {key: value for key, value in document["config"].items() if not key.startswith("q")}
    assert stored_config == force_bson_encodeable(config)  # Sacred's own function is the oracle
    assert {key: value for key, value in document["info"].items() if key != "metrics"} == {
        "@set": 1, "x,y": [{"p,q": {"deep,er": True}}]}
    assert document["result"] == {"best,loss": 0.25} and document["status"] == "COMPLETED"
    stored = gridfs.GridFS(db).get(document["artifacts"][0]["file_id"])
    assert stored.metadata == {"@where": "x", "v,1": 2}

    [listed] = omniboard_runs(db)  # Omniboard's run list and incense's queries load it
    assert listed["config"]["@x"] == {"c,d": {"@e": 2}}
    assert db.runs.count_documents({"config.a,b": 1}) == 1
    assert [entry["values"] for entry in db.metrics.find({"run_id": document["_id"]})] == [[0.5]]


def test_ints_beyond_64_bits_are_kept_as_decimal_strings_and_floats_and_the_ending_arrives(sink, db, journal, files):
    huge = 2**70
    run = write_run(journal, [
        started(files, config={"seed": huge, "small": 2**63 - 1}),
        point("loss", 0, huge, 1), point("loss", huge, 1.0, 2), point("loss", 2, -(10**400), 3),
        (Kind.HEARTBEAT, {"beat_time": at(4), "info": {"count": [huge]}, "result": None, "captured_out_append": ""}),
        (Kind.COMPLETED, {"stop_time": at(5), "result": -huge}),
    ])
    delivery = deliver(sink, journal, run, 2)
    assert delivery.letters == {}

    [document] = db.runs.find()
    assert document["status"] == "COMPLETED" and document["result"] == str(-huge)
    assert document["config"]["seed"] == str(huge) and document["config"]["small"] == 2**63 - 1
    assert document["info"]["count"] == [str(huge)]
    [series] = db.metrics.find({"run_id": document["_id"]})
    assert series["steps"] == [0, float(huge), 2] and series["values"] == [float(huge), 1.0, -math.inf]


def test_a_run_document_past_16_mb_is_refused_for_its_event_only(sink, db, journal, files):
    wide = {f"key {index}": "x" * 100 for index in range(180_000)}  # ≈20 MB of info in many small values
    steps = lifecycle(files)
    big_beat = (Kind.HEARTBEAT, {"beat_time": at(6), "info": wide, "result": None, "captured_out_append": "big\n"})
    run = write_run(journal, [*steps[:-1], big_beat, steps[-1]])
    delivery = deliver(sink, journal, run)

    assert list(delivery.letters) == [len(steps) - 1], delivery.letters  # the big heartbeat alone
    assert "16 MB" in delivery.letters[len(steps) - 1] and "info" in delivery.letters[len(steps) - 1]
    [document] = db.runs.find()
    assert document["status"] == "COMPLETED" and document["runrelay"]["applied"] == len(steps)
    assert document["info"]["epoch"] == 5  # the heartbeat before it
    assert document["captured_out"] == "epoch 1\nepoch 2\n"
    delivery.apply(sink)  # nothing is retried
    assert db.runs.find_one()["runrelay"]["applied"] == len(steps)


# --- the server refuses the sink: unusable as given --------------------------------------------


@pytest.fixture(scope="module")
def auth_server(mongo_server):
    if mongo_server.external_url:
        pytest.skip("RUNRELAY_TEST_MONGO_URL: the tests do not own that server, so cannot make its users")
    server = MongoServer(user=USER)
    try:
        yield start_or_skip(server)
    finally:
        server.cleanup()


def authenticated(server: MongoServer, password: str, database: str) -> str:
    return f"mongodb://{USER[0]}:{password}@127.0.0.1:{server.port}/{database}?authSource={USER[2]}"


@pytest.mark.parametrize("password, database, refusal", [
    ("wrong", USER[2], "AuthenticationFailed"),
    (USER[1], "other", "not authorized on other"),
])
def test_refused_credentials_or_database_make_the_sink_unusable(auth_server, journal, files, password, database,
                                                                 refusal):
    sink = open_sink(authenticated(auth_server, USER[1], USER[2]), journal, timeout_seconds=5.0)
    try:  # the right password into its own database works: the refusal is the server's
        run = write_run(journal, lifecycle(files))
        deliver(sink, journal, run)
        assert sink.applied(run) == len(lifecycle(files)) - 1
    finally:
        sink.close()
    with pytest.raises(UnusableSinkError, match=refusal) as raised:
        open_sink(authenticated(auth_server, password, database), journal, timeout_seconds=5.0)
    assert "s3cret" not in str(raised.value) and "wrong" not in str(raised.value)


# --- pymongo's waits end within timeout_seconds --------------------------------------------------


def bounded(call) -> BaseException | None:
    """What ``call`` raised (None if nothing); fails if it has not ended within HANG_BOUND_SECONDS."""
    outcome: list[BaseException | None] = []

    def target():
        try:
            call()
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(HANG_BOUND_SECONDS)
    assert outcome, f"still waiting after {HANG_BOUND_SECONDS} s with timeout_seconds={TIMEOUT_SECONDS}"
    return outcome[0]


@pytest.mark.parametrize("how", ["frozen", "killed"])
def test_a_frozen_or_dead_server_is_a_transient_error_within_timeout_seconds(how, mongo_server, mongo_url, journal,
                                                                             files):
    sink = open_sink(mongo_url, journal, timeout_seconds=TIMEOUT_SECONDS)
    run = write_run(journal, lifecycle(files))
    delivery = Delivery(journal, run)
    delivery.apply(sink, through=3)
    try:
        if how == "frozen":
            with mongo_server.frozen():
                began = time.monotonic()
                error = bounded(lambda: sink.applied(run))
                took = time.monotonic() - began
        else:
            mongo_server.kill()
            began = time.monotonic()
            error = bounded(lambda: sink.applied(run))
            took = time.monotonic() - began
            mongo_server.start()
        assert isinstance(error, TransientSinkError), repr(error)
        print(f"\n{how} server: {type(error).__name__} after {took:.1f} s (timeout_seconds={TIMEOUT_SECONDS})")
        assert sink.applied(run) == 3  # the same sink works again once the server does
        delivery.apply(sink)
        assert sink.applied(run) == len(lifecycle(files)) - 1
    finally:
        mongo_server.start()
        sink.close()

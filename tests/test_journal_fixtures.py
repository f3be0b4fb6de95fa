"""Checked-in damaged journals (tests/fixtures/journal, made by make.py) read as the format doc says,
in every format version: the cases at the top of tests/fixtures/journal are journals the version 1
writer made (other tests use them too), those in v2/ the current writer's."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from runrelay.eventlog import Journal, JournalCorrupt, JournalWriter, Kind

FIXTURES = Path(__file__).parent / "fixtures" / "journal"
VERSIONS = {"v1": FIXTURES, "v2": FIXTURES / "v2"}
RUN = "0190a1b2-c3d4-7e5f-8a6b-7c8d9e0f1a2b"

# case -> (good events delivered, outcome): "ok", "torn" (normal end of a crashed writer) or "corrupt"
EXPECTED = {
    "clean": (10, "ok"),
    "torn_record_header": (10, "torn"),
    "torn_payload": (9, "torn"),
    "torn_segment_header": (10, "torn"),
    "zero_tail": (10, "torn"),
    "flipped_last_payload": (9, "torn"),
    "flipped_payload_middle": (5, "corrupt"),
    "flipped_header_middle": (3, "corrupt"),
    "flipped_segment_header": (0, "corrupt"),
    "torn_old_segment": (3, "corrupt"),
    "missing_segment": (4, "corrupt"),
    "future_version": (0, "corrupt"),
}


CASES = [(version, case) for version in VERSIONS for case in sorted(EXPECTED)]


def expected(version: str, case: str) -> tuple[int, str]:
    return EXPECTED_V2.get(case, EXPECTED[case]) if version == "v2" else EXPECTED[case]

# v2's metric records are shorter, so more of them fit in the 400-byte segments of these two
EXPECTED_V2 = {"torn_old_segment": (5, "corrupt"), "missing_segment": (6, "corrupt")}


def test_every_fixture_has_an_expectation():
    assert sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()) == sorted([*EXPECTED, "v2"])
    assert sorted(p.name for p in VERSIONS["v2"].iterdir() if p.is_dir()) == sorted(EXPECTED)


def test_the_fixtures_are_of_their_version():
    for version, place in VERSIONS.items():
        for segment in (place / "clean" / RUN).glob("*.seg"):
            assert segment.read_bytes()[8:10] == int(version[1:]).to_bytes(2, "big")


@pytest.mark.parametrize("version, case", CASES)
def test_fixture_reads_as_documented(version, case):
    good, outcome = expected(version, case)
    journal = Journal(VERSIONS[version] / case)
    check = journal.verify(RUN)
    assert check.records == good
    assert (check.corrupt is not None) == (outcome == "corrupt")
    assert (check.torn is not None) == (outcome == "torn")
    delivered = []
    try:
        for event in journal.events(RUN):
            delivered.append(event)
    except JournalCorrupt:
        assert outcome == "corrupt"
    assert [e.seq for e in delivered] == list(range(good))
    for event in delivered[1:]:
        assert event.body["value"] == 1.0 / event.seq  # never a damaged byte


@pytest.mark.parametrize("version, case", [(v, c) for v, c in CASES if EXPECTED[c][1] == "torn"])
def test_a_torn_tail_is_cut_when_the_run_is_resumed(version, case, tmp_path):
    shutil.copytree(VERSIONS[version] / case, tmp_path / case)
    good, _ = expected(version, case)
    with JournalWriter.resume(tmp_path / case, RUN) as writer:
        assert writer.append(Kind.DIED, {"reason": "writer gone"}) == good
    check = Journal(tmp_path / case).verify(RUN)
    assert check.ok and check.torn is None and check.records == good + 1


@pytest.mark.parametrize("version, case", [(v, c) for v, c in CASES if EXPECTED[c][1] == "corrupt"])
def test_a_corrupt_run_is_never_resumed(version, case, tmp_path):
    shutil.copytree(VERSIONS[version] / case, tmp_path / case)
    with pytest.raises(JournalCorrupt):
        JournalWriter.resume(tmp_path / case, RUN)

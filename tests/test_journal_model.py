"""Property: writer + reader behave like a plain list of events, through rotation,
reopening and torn tails."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from runrelay.eventlog import Journal, JournalWriter, Kind
from runrelay.eventlog import codec
from runrelay.eventlog.events import utc_from_micros
from runrelay.eventlog.format import SEGMENT_HEADER_SIZE, encode_record

values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
bodies = st.dictionaries(st.text(max_size=8), values, max_size=4)


class JournalModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="runrelay-model-"))
        self.writer = JournalWriter.create(self.root, segment_bytes=512)
        self.run = self.writer.run
        self.model: list[tuple[Kind, int, dict]] = []  # what the journal must hold

    @rule(kind=st.sampled_from(list(Kind)), body=bodies, time_us=st.integers(0, 2**53))
    def append(self, kind, body, time_us):
        assert self.writer.append(kind, body, time_us) == len(self.model)
        self.model.append((kind, time_us, body))

    @rule()
    def reopen(self):
        self.writer.close()
        self.writer = JournalWriter.resume(self.root, self.run, segment_bytes=512)

    def newest_segment(self) -> Path:
        return max(self.root.joinpath(self.run).glob("*.seg"))

    # Only a record in the newest segment can be torn: after a resume has cut a torn record
    # that began a segment, the newest one holds a header only, and the last record is sealed.
    @precondition(lambda self: self.model and self.newest_segment().stat().st_size > SEGMENT_HEADER_SIZE)
    @rule(cut=st.integers(1, 10_000))
    def crash_mid_append(self, cut):
        """The writer dies having written only part of its last record."""
        self.writer.close()
        kind, time_us, body = self.model[-1]
        record = len(encode_record(len(self.model) - 1, codec.encode([kind.value, time_us, body])))
        newest = self.newest_segment()
        with open(newest, "r+b") as f:
            f.truncate(newest.stat().st_size - 1 - (cut % record))
        self.model.pop()
        self.writer = JournalWriter.resume(self.root, self.run, segment_bytes=512)

    @rule(start=st.integers(0, 200))
    def read_from_any_seq(self, start):
        got = [(e.kind, e.body) for e in Journal(self.root).events(self.run, start)]
        assert got == [(k, b) for k, _, b in self.model[start:]]

    @invariant()
    def reader_matches_model(self):
        journal = Journal(self.root)
        pairs = list(journal.read(self.run))
        assert [(e.seq, e.kind, e.time, e.body) for e, _ in pairs] == [
            (seq, k, utc_from_micros(t), b) for seq, (k, t, b) in enumerate(self.model)
        ]
        if pairs:  # resuming from a saved position yields exactly the rest
            middle = len(pairs) // 2
            rest = [e.seq for e, _ in journal.read(self.run, pairs[middle][1])]
            assert rest == list(range(middle + 1, len(pairs)))
        assert journal.verify(self.run).ok

    def teardown(self):
        self.writer.close()
        shutil.rmtree(self.root, ignore_errors=True)


TestJournalModel = JournalModel.TestCase
TestJournalModel.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)

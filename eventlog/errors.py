"""The journal's errors: one root, shallow tree."""


class JournalError(Exception):
    """Base of every error the journal raises."""


class JournalWriteError(JournalError):
    """An append could not be made durable; what was journaled before is intact."""


class WriterBusy(JournalError):
    """Another live process is already writing this run."""


class JournalCorrupt(JournalError):
    """A run's journal has a damaged record before its end; nothing after it is read."""

    def __init__(self, run: str, segment: str, offset: int, reason: str):
        super().__init__(f"run {run}: corrupt journal at {segment} byte {offset}: {reason}")
        self.run = run
        self.segment = segment
        self.offset = offset
        self.reason = reason


class UnknownRun(JournalError):
    """No journal exists for the given run uid."""


class RunUnreadable(JournalCorrupt):
    """A run's journal cannot be read as it stands (no permission; a symlink, FIFO or other
    odd file where a run directory or segment belongs). Handled as corruption: that run is
    reported and skipped, the others go on; it may be readable again once fixed."""

    def __init__(self, run: str, segment: str, reason: str):
        JournalError.__init__(self, f"run {run}: cannot read its journal{f' at {segment}' if segment else ''}: "
                                    f"{reason}")
        self.run = run
        self.segment = segment
        self.offset = 0
        self.reason = reason

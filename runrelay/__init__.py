"""runrelay: crash-safe recording of ML experiments.

The public names: ``from runrelay import JournalObserver, Recorder, durable``. The journal, the daemon
and the sinks are the subpackages ``runrelay.eventlog``, ``runrelay.daemon`` and
``runrelay.sinks`` (in the repository: ``eventlog/``, ``daemon/`` and ``sinks/`` at its root).
"""

from importlib.metadata import PackageNotFoundError, version

from runrelay.eventlog.recorder import Recorder
from runrelay.eventlog.writer import Durability

try:
    __version__ = version("runrelay")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"


def __getattr__(name: str):
    # Sacred is an optional extra: import the observer only when asked for it.
    if name in ("JournalObserver", "journal_option"):
        from runrelay.eventlog import sacred

        return getattr(sacred, name)
    if name == "durable":
        from runrelay.eventlog.durable import durable

        return durable
    raise AttributeError(f"module 'runrelay' has no attribute {name!r}")


__all__ = ["Durability", "JournalObserver", "Recorder", "durable", "journal_option", "__version__"]

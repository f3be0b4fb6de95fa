"""Where runrelay keeps its files when nobody says: one rule shared by producers and the daemon."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping


def runrelay_home(environ: Mapping[str, str] | None = None) -> Path:
    """``$RUNRELAY_HOME``, else ``$XDG_DATA_HOME/runrelay``, else ``~/.local/share/runrelay``."""
    env = os.environ if environ is None else environ
    if env.get("RUNRELAY_HOME"):
        return Path(env["RUNRELAY_HOME"]).expanduser()
    data_home = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home).expanduser() / "runrelay"


def default_journal_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$RUNRELAY_JOURNAL``, else ``<runrelay home>/journal``."""
    env = os.environ if environ is None else environ
    if env.get("RUNRELAY_JOURNAL"):
        return Path(env["RUNRELAY_JOURNAL"]).expanduser()
    return runrelay_home(env) / "journal"

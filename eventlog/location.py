"""Where the journal lives when nobody says: one rule shared by producers and the daemon."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping


def default_journal_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$RUNRELAY_HOME/journal``, else ``$XDG_DATA_HOME/runrelay/journal``,
    else ``~/.local/share/runrelay/journal``."""
    env = os.environ if environ is None else environ
    if env.get("RUNRELAY_HOME"):
        return Path(env["RUNRELAY_HOME"]).expanduser() / "journal"
    data_home = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home).expanduser() / "runrelay" / "journal"

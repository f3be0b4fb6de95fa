"""Small filesystem helpers shared by the journal's writer and blob store."""

from __future__ import annotations

import os
from pathlib import Path

DIR_MODE = 0o700  # journals hold configs and outputs: owner-only
FILE_MODE = 0o600


def make_private_dir(path: Path) -> bool:
    """Create ``path`` (and parents) owner-only; return True if it was created."""
    if path.is_dir():
        return False
    parent = path.parent
    if not parent.is_dir():
        make_private_dir(parent)
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return False
    fsync_dir(parent)
    return True


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (created or renamed files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (a regular file may take a write in parts)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]

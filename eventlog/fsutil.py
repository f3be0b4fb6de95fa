"""Small filesystem helpers shared by the journal and the daemon's state files."""

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


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync the directory."""
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    fsync_dir(path.parent)

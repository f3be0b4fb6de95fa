"""Small filesystem helpers shared by the journal's writer, reader and blob store, and the
locks of the journal and the daemon's state."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
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


# --- opening what a journal holds: untrusted names, never followed, never blocking -----------

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symlink"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


class NotRegularFile(ValueError):
    """A journal path that is not what it must be (a FIFO, a symlink, a directory, …): it is
    never opened through, so it can neither hang a reader nor lead it out of the journal."""


def file_kind(mode: int) -> str:
    """What ``mode`` (from ``stat``) says a path is, in words."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "an unknown kind of file"


def open_regular(name: str | os.PathLike, dir_fd: int | None = None) -> int:
    """A read-only fd of the regular file ``name`` (relative to ``dir_fd``), never through a
    symlink and never blocking (a FIFO would hang ``open`` until a writer comes): anything
    else raises NotRegularFile; OSError as ``open`` raises it."""
    mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    if not stat.S_ISREG(mode):  # looked at first: a device is never even opened
        raise NotRegularFile(f"{os.fspath(name)} is {file_kind(mode)}, not a regular file")
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as error:
        if error.errno == errno.ELOOP:  # replaced by a symlink since
            raise NotRegularFile(f"{os.fspath(name)} is a symlink, not a regular file") from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):  # replaced since the look
        os.close(fd)
        raise NotRegularFile(f"{os.fspath(name)} is {file_kind(mode)}, not a regular file")
    return fd


def open_directory(name: str | os.PathLike, dir_fd: int | None = None) -> int:
    """A read-only fd of the directory ``name``, never through a symlink; NotRegularFile
    for anything that is not a directory (its message says what it is)."""
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as error:
        if error.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
    mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    raise NotRegularFile(f"{os.fspath(name)} is {file_kind(mode)}, not a directory")


# --- locks: an flock the kernel drops when its holder dies ----------------------------------


def try_lock(path: str | os.PathLike) -> int | None:
    """An exclusive flock on the regular file ``path`` (created owner-only if missing): its
    fd, to keep open while holding it, or None while another process holds it. Never
    through a symlink and never blocking on a FIFO: anything but a regular file raises
    NotRegularFile."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, FILE_MODE)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.EISDIR):
            kind = "a symlink" if error.errno == errno.ELOOP else "a directory"
            raise NotRegularFile(f"{os.fspath(path)} is {kind}, not a regular file") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(f"{os.fspath(path)} is {file_kind(mode)}, not a regular file")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def is_locked(fd: int) -> bool:
    """Whether another process holds an exclusive flock on the file of ``fd``."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False

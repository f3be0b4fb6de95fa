"""The ``file://`` store: a local or shared directory. Every object is written to a temp
file under ``<base>/_runrelay/tmp/``, fsynced and renamed into place (then its directory
fsynced); a run directory is claimed by renaming a temp directory that already holds its
``run.json``, which fails when the id's directory exists. The rename is made holding an
``flock`` on the lock file of the object's directory (``<base>/_runrelay/locks/``), which a
conditional write (``put_if``) holds while it compares the object's bytes with those it was
given and renames: a compare-and-swap."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Callable
from urllib.parse import unquote, urlsplit

from runrelay.eventlog.fsutil import fsync_dir
from runrelay.sinks.base import PermanentSinkError, SinkConfigError, TransientSinkError, UnusableSinkError
from runrelay.sinks.filestorage import RECORDS, FileStorageSink, Store

STALE_TEMP_SECONDS = 24 * 3600  # temp files left by a crash are removed after this long
LOCK_POLL_SECONDS = 0.005  # between tries of a directory's lock (held only for a compare and a rename)
_UNUSABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.ELOOP, errno.EISDIR}
_PERMANENT = {errno.EFBIG, errno.ENAMETOOLONG}


def directory(url: str) -> Path:
    """The absolute directory ``file:///path`` names; SinkConfigError if it names none."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "file" or parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise SinkConfigError(f"expected file:///ABSOLUTE/DIRECTORY, got {url!r}")
    path = unquote(parts.path)
    if not path.startswith("/") or "\0" in path:
        raise SinkConfigError(f"expected file:///ABSOLUTE/DIRECTORY (an absolute path), got {url!r}")
    return Path(os.path.normpath(path))


class DirectoryStore(Store):
    def __init__(self, base: Path, label: str, timeout: float):
        self.base, self.label, self.timeout = base, label, timeout
        self.temp = base / RECORDS / "tmp"
        self.locks = base / RECORDS / "locks"

    def open(self) -> None:
        with self._converted("the base directory"):
            self.temp.mkdir(parents=True, exist_ok=True)
            self.locks.mkdir(exist_ok=True)
            for leftover in self.temp.iterdir():
                with contextlib.suppress(OSError):  # another writer's, or gone meanwhile
                    if time.time() - leftover.lstat().st_mtime > STALE_TEMP_SECONDS:
                        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()

    def put(self, key: str, data: bytes | BinaryIO) -> None:
        self._replace(key, data, lambda path: True)

    def get_tagged(self, key: str) -> tuple[bytes, bytes] | None:
        data = self.get(key)
        return None if data is None else (data, data)  # the bytes are the tag: equal bytes, same object

    def put_if(self, key: str, data: bytes, tag: bytes) -> bool:
        return self._replace(key, data, lambda path: _read_or_none(path) == tag)

    def _replace(self, key: str, data: bytes | BinaryIO, still: Callable[[Path], bool]) -> bool:
        """Write ``key`` through a temp file, renamed into place under its directory's lock
        if ``still(path)`` holds then."""
        path = self._path(key)
        with self._converted(key):
            path.parent.mkdir(parents=True, exist_ok=True)
            descriptor, temp = tempfile.mkstemp(dir=self.temp, prefix="put-")
            try:
                with os.fdopen(descriptor, "wb") as file:
                    if isinstance(data, bytes):
                        file.write(data)
                    else:
                        shutil.copyfileobj(data, file, 1024 * 1024)
                    file.flush()
                    os.fsync(file.fileno())
                with self._locked(key.rpartition("/")[0]):
                    written = still(path)
                    if written:
                        os.replace(temp, path)
                if not written:
                    os.unlink(temp)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
                raise
            fsync_dir(path.parent)
            return written

    @contextlib.contextmanager
    def _locked(self, directory: str):
        """An exclusive flock on the lock file of the directory key ``directory`` (a file, not
        the directory itself: NFS takes an exclusive lock only on a file open for writing),
        waited for at most the sink's timeout."""
        descriptor = os.open(self.locks / (directory.replace("/", "%") or "%"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + self.timeout
            while True:
                try:
                    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TransientSinkError(f"{self.label}: directory {directory!r} stayed locked "
                                                 f"for {self.timeout:g} s")
                    time.sleep(LOCK_POLL_SECONDS)
            yield
        finally:
            os.close(descriptor)  # drops the lock

    def get(self, key: str) -> bytes | None:
        with self._converted(key):
            try:
                return self._path(key).read_bytes()
            except FileNotFoundError:
                return None

    def has(self, key: str) -> bool:
        with self._converted(key):
            return os.path.lexists(self._path(key))

    def claim_run(self, run_id: int, run_json: bytes) -> bool:
        target = self.base / str(run_id)
        with self._converted(f"run directory {run_id}"):
            if os.path.lexists(target):
                return False
            staged = Path(tempfile.mkdtemp(dir=self.temp, prefix="run-"))
            try:
                with open(staged / "run.json", "wb") as file:
                    file.write(run_json)
                    file.flush()
                    os.fsync(file.fileno())
                fsync_dir(staged)
                os.rename(staged, target)  # refused onto a directory holding anything
            except OSError as error:
                shutil.rmtree(staged, ignore_errors=True)
                if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    return False
                raise
            fsync_dir(self.base)
            return True

    def run_ids(self) -> list[int]:
        with self._converted("the base directory"):
            return [int(entry.name) for entry in os.scandir(self.base)
                    if entry.name.isdigit() and entry.is_dir(follow_symlinks=False)]

    def location(self, key: str) -> str:
        return str(self._path(key))

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if any(part in ("", ".", "..") or "\0" in part for part in parts):
            raise PermanentSinkError(f"{self.label}: {key!r} is not a key inside the base")
        return self.base.joinpath(*parts)

    @contextlib.contextmanager
    def _converted(self, what: str):
        try:
            yield
        except OSError as error:
            message = f"{self.label}: {what}: {error.strerror or error}"
            if error.errno in _UNUSABLE:
                raise UnusableSinkError(message) from None
            if error.errno in _PERMANENT:
                raise PermanentSinkError(message) from None
            raise TransientSinkError(message) from None  # a full disk, an I/O error, a stale NFS handle


class DirectorySink(FileStorageSink):
    """``file:///path``: runs in a local or shared directory."""

    @classmethod
    def identity(cls, url: str) -> str:
        return f"file://{directory(url)}"

    def _store(self) -> Store:
        return DirectoryStore(directory(self.url), repr(self), self.timeout_seconds)


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None

"""The ``file://`` store: a local or shared directory. Every object is written to a temp
file under ``<base>/_runrelay/tmp/``, fsynced and renamed into place (then its directory
fsynced); a run directory is claimed by renaming a temp directory that already holds its
``run.json``, which fails when the id's directory exists."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from runrelay.eventlog.fsutil import fsync_dir
from runrelay.sinks.base import PermanentSinkError, SinkConfigError, TransientSinkError, UnusableSinkError
from runrelay.sinks.filestorage import RECORDS, FileStorageSink, Store

STALE_TEMP_SECONDS = 24 * 3600  # temp files left by a crash are removed after this long
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
    def __init__(self, base: Path, label: str):
        self.base, self.label = base, label
        self.temp = base / RECORDS / "tmp"

    def open(self) -> None:
        with self._converted("the base directory"):
            self.temp.mkdir(parents=True, exist_ok=True)
            for leftover in self.temp.iterdir():
                with contextlib.suppress(OSError):  # another writer's, or gone meanwhile
                    if time.time() - leftover.lstat().st_mtime > STALE_TEMP_SECONDS:
                        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()

    def put(self, key: str, data: bytes | BinaryIO) -> None:
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
                os.replace(temp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
                raise
            fsync_dir(path.parent)

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
        return DirectoryStore(directory(self.url), repr(self))

"""Content-addressed copies of the files a run reports (artifacts, resources, sources).

A file is copied at event time, before the event that references it is written,
so the journal keeps the bytes the experiment had even if it deletes or rewrites
the file a moment later. Blobs live in the run's directory: ``blobs/<sha256>``.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from runrelay.eventlog.fsutil import FILE_MODE, fsync_dir, make_private_dir, write_all

BLOB_DIR = "blobs"
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1024 * 1024


def store_blob(run_dir: Path, source: str | os.PathLike) -> dict:
    """Copy ``source`` into the run's blob store; return {digest, md5, size}.

    The copy is written to a temp file, fsynced, then renamed to its digest, so a
    blob either exists whole or not at all.
    """
    blob_dir = run_dir / BLOB_DIR
    make_private_dir(blob_dir)
    sha256, md5, size = hashlib.sha256(), hashlib.md5(), 0
    temp = blob_dir / f".tmp-{os.getpid()}-{os.urandom(6).hex()}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        with open(source, "rb") as src:
            while chunk := src.read(_CHUNK):
                sha256.update(chunk)
                md5.update(chunk)
                size += len(chunk)
                write_all(fd, chunk)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temp.unlink(missing_ok=True)
        raise
    os.close(fd)
    digest = sha256.hexdigest()
    os.replace(temp, blob_dir / digest)
    fsync_dir(blob_dir)
    return {"digest": digest, "md5": md5.hexdigest(), "size": size}


def is_digest(name: object) -> bool:
    """True for a SHA-256 hex digest, the only name a blob has."""
    return isinstance(name, str) and _DIGEST.fullmatch(name) is not None


def blob_path(run_dir: Path, digest: str) -> Path:
    """The path of a stored blob; ``digest`` comes from a journal, so it is checked."""
    if not is_digest(digest):
        raise ValueError(f"not a blob digest: {digest!r}")
    return run_dir / BLOB_DIR / digest


"""The ``gs://bucket/prefix`` store (google-cloud-storage; ``pip install 'runrelay[gcs]'``).

Credentials are Google's application default ones; with ``STORAGE_EMULATOR_HOST`` set (or
the ``endpoint`` option) the client talks to that emulator, anonymously. Every call makes
one attempt (``retry=None``) bounded by the sink's timeout: the daemon's retry loop owns
waiting. A run directory is claimed by uploading its ``run.json`` with the generation
precondition 0 (create only); a conditional write (``put_if``) is an upload with the
generation read as its precondition.
"""

from __future__ import annotations

import contextlib
import os
from typing import BinaryIO

from runrelay.sinks.base import PermanentSinkError, SinkConfigError, TransientSinkError, UnusableSinkError
from runrelay.sinks.filestorage import BucketStore, FileStorageSink, Store, check_driver, text_option, url_parts

_UNUSABLE_STATUS = {401, 403, 404}  # at the bucket: refused credentials, no such bucket
_PERMANENT_STATUS = {400, 411, 413}
CHUNK_BYTES = 16 * 1024 * 1024  # a large object goes up resumably in chunks of this size (each held in memory)


class GcsStore(BucketStore):
    _bucket = None

    def open(self) -> None:
        with self._converted("the bucket"):
            if self._bucket is None:
                from google.cloud import storage

                endpoint = self.options.get("endpoint")
                if endpoint:
                    from google.auth.credentials import AnonymousCredentials

                    client = storage.Client(project=self.options.get("project", "runrelay"),
                                            credentials=AnonymousCredentials(),
                                            client_options={"api_endpoint": endpoint})
                else:
                    client = storage.Client(project=self.options.get("project"))
                self._bucket = client.bucket(self.bucket)
            self._bucket.reload(timeout=self.timeout, retry=None)

    def put(self, key: str, data: bytes | BinaryIO) -> None:
        with self._converted(key):
            if isinstance(data, bytes):
                self._bucket.blob(self._key(key)).upload_from_string(data, timeout=self.timeout, retry=None)
            else:
                size = os.fstat(data.fileno()).st_size - data.tell()
                blob = self._bucket.blob(self._key(key), chunk_size=CHUNK_BYTES)
                blob.upload_from_file(data, size=size, timeout=self.timeout, retry=None)

    def get(self, key: str) -> bytes | None:
        from google.api_core.exceptions import NotFound

        with self._converted(key):
            try:
                return self._bucket.blob(self._key(key)).download_as_bytes(timeout=self.timeout, retry=None)
            except NotFound:
                return None

    def get_tagged(self, key: str) -> tuple[bytes, int] | None:
        from google.api_core.exceptions import NotFound

        with self._converted(key):
            blob = self._bucket.blob(self._key(key))
            try:
                data = blob.download_as_bytes(timeout=self.timeout, retry=None)
                if blob.generation is not None:
                    return data, int(blob.generation)  # the download's own generation header
                # a server that sends none (an emulator): the generation, then its bytes
                blob.reload(timeout=self.timeout, retry=None)
                generation = int(blob.generation)
                data = blob.download_as_bytes(if_generation_match=generation, timeout=self.timeout, retry=None)
                return data, generation
            except NotFound:
                return None

    def put_if(self, key: str, data: bytes, tag: int) -> bool:
        return self._upload_if(key, data, tag)

    def has(self, key: str) -> bool:
        with self._converted(key):
            return self._bucket.blob(self._key(key)).exists(timeout=self.timeout, retry=None)

    def claim_run(self, run_id: int, run_json: bytes) -> bool:
        return self._upload_if(f"{run_id}/run.json", run_json, 0)

    def _upload_if(self, key: str, data: bytes, generation: int) -> bool:
        """Upload only while the object is at ``generation`` (0: only if there is none)."""
        from google.api_core.exceptions import NotFound, PreconditionFailed

        with self._converted(key):
            try:
                self._bucket.blob(self._key(key)).upload_from_string(
                    data, if_generation_match=generation, timeout=self.timeout, retry=None)
                return True
            except (PreconditionFailed, NotFound):
                return False

    def run_ids(self) -> list[int]:
        with self._converted("the bucket's run directories"):
            listing = self._bucket.client.list_blobs(self._bucket, prefix=self._key(""), delimiter="/",
                                                     timeout=self.timeout, retry=None)
            for _page in listing.pages:
                pass  # the prefixes gather as the pages go by
            return self._run_ids(list(listing.prefixes))

    def close(self) -> None:
        if self._bucket is not None:
            self._bucket.client.close()
            self._bucket = None

    @contextlib.contextmanager
    def _converted(self, what: str):
        import google.auth.exceptions
        import requests
        from google.api_core.exceptions import GoogleAPICallError, RetryError

        try:
            yield
        except GoogleAPICallError as error:
            message = f"{self.label}: {what}: {error.code} {error.message}"[:500]
            status = error.code or 0
            if status in _UNUSABLE_STATUS and what == "the bucket" or status in (401, 403):
                raise UnusableSinkError(message) from None
            if status in _PERMANENT_STATUS:
                raise PermanentSinkError(message) from None
            raise TransientSinkError(message) from None  # 404 of a bucket removed meanwhile, 408, 429, 5xx
        except google.auth.exceptions.DefaultCredentialsError as error:
            raise UnusableSinkError(f"{self.label}: no Google credentials: {error}"[:500]) from None
        except (requests.RequestException, google.auth.exceptions.TransportError, RetryError, ConnectionError,
                TimeoutError) as error:
            raise TransientSinkError(f"{self.label}: {what}: {type(error).__name__}: {error}"[:500]) from None


class GcsSink(FileStorageSink):
    """``gs://bucket/prefix``: runs under a prefix of a Google Cloud Storage bucket."""

    OPTIONS = {**FileStorageSink.OPTIONS, "endpoint": text_option, "project": text_option}

    @classmethod
    def identity(cls, url: str) -> str:
        bucket, prefix, query = url_parts(url, "gs")
        if query:
            raise SinkConfigError("gs:// URLs take no query: give endpoint and project as the sink's options")
        check_driver("google.cloud.storage", "gcs")
        return f"gs://{bucket}/{prefix}".rstrip("/")

    def _store(self) -> Store:
        bucket, prefix, _query = url_parts(self.url, "gs")
        return GcsStore(bucket, prefix, self.options, self.timeout_seconds, repr(self))

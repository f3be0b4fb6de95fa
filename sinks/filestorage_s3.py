"""The ``s3://bucket/prefix`` store (boto3; ``pip install 'runrelay[s3]'``).

Endpoint, region and credentials come from the sink's options, else from the usual AWS
environment (``AWS_ENDPOINT_URL_S3``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``, profiles).
boto3 makes one attempt per call, each bounded by the sink's timeout: the daemon's retry
loop owns waiting. A run directory is claimed by a conditional ``PutObject`` of its
``run.json`` (``If-None-Match: *``); a conditional write (``put_if``) is a ``PutObject``
with ``If-Match`` of the ETag read (S3 has honoured it since November 2024; the sink checks
that the endpoint does before the watchdog relies on it).
"""

from __future__ import annotations

import contextlib
from typing import BinaryIO

from runrelay.sinks.base import (
    PermanentSinkError, SinkConfigError, TransientSinkError, UnusableSinkError,
)
from runrelay.sinks.filestorage import BucketStore, FileStorageSink, Store, check_driver, text_option, url_parts

MULTIPART_BYTES = 16 * 1024 * 1024  # objects larger go up in parts of this size (each held in memory)
_UNUSABLE = {"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket",
             "InvalidBucketName", "AccountProblem", "InvalidToken", "ExpiredToken", "PermanentRedirect",
             "AuthorizationHeaderMalformed", "403", "301"}
_PERMANENT = {"EntityTooLarge", "KeyTooLongError", "InvalidArgument", "413"}
_TRANSIENT = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
              "InternalError", "ServiceUnavailable", "OperationAborted"}
_TAKEN = {"PreconditionFailed", "ConditionalRequestConflict", "412"}


class S3Store(BucketStore):
    _client = None

    def open(self) -> None:
        from botocore.exceptions import ClientError

        with self._converted("the bucket"):
            if self._client is None:
                import boto3
                from botocore.config import Config

                session = boto3.session.Session(
                    aws_access_key_id=self.options.get("access_key_id"),
                    aws_secret_access_key=self.options.get("secret_access_key"),
                    aws_session_token=self.options.get("session_token"),
                    region_name=self.options.get("region"),
                )
                config = Config(connect_timeout=self.timeout, read_timeout=self.timeout,
                                retries={"total_max_attempts": 1, "mode": "standard"})
                self._client = session.client("s3", endpoint_url=self.options.get("endpoint_url"), config=config)
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except ClientError as error:
                if _code(error) in ("404", "NoSuchBucket"):  # a HEAD has no body: the bare status
                    raise UnusableSinkError(f"{self.label}: no such bucket {self.bucket!r}") from None
                raise

    def put(self, key: str, data: bytes | BinaryIO) -> None:
        from boto3.s3.transfer import TransferConfig

        with self._converted(key):
            if isinstance(data, bytes):
                self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
            else:
                config = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES,
                                        use_threads=False)
                self._client.upload_fileobj(data, self.bucket, self._key(key), Config=config)

    def get(self, key: str) -> bytes | None:
        with self._converted(key):
            try:
                return self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
            except self._client.exceptions.NoSuchKey:
                return None

    def get_tagged(self, key: str) -> tuple[bytes, str] | None:
        with self._converted(key):
            try:
                found = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            except self._client.exceptions.NoSuchKey:
                return None
            return found["Body"].read(), found["ETag"]

    def put_if(self, key: str, data: bytes, tag: str) -> bool:
        from botocore.exceptions import ClientError

        with self._converted(key):
            try:
                self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfMatch=tag)
                return True
            except ClientError as error:
                if _code(error) in _TAKEN or _code(error) in ("404", "NoSuchKey"):
                    return False
                raise

    def has(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        with self._converted(key):
            try:
                self._client.head_object(Bucket=self.bucket, Key=self._key(key))
                return True
            except ClientError as error:
                if _code(error) in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise

    def claim_run(self, run_id: int, run_json: bytes) -> bool:
        from botocore.exceptions import ClientError

        with self._converted(f"run directory {run_id}"):
            try:
                self._client.put_object(Bucket=self.bucket, Key=self._key(f"{run_id}/run.json"), Body=run_json,
                                        IfNoneMatch="*")
                return True
            except ClientError as error:
                if _code(error) in _TAKEN:
                    return False
                raise

    def run_ids(self) -> list[int]:
        with self._converted("the bucket's run directories"):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(""), Delimiter="/")
            return self._run_ids([entry["Prefix"] for page in pages for entry in page.get("CommonPrefixes", [])])

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    @contextlib.contextmanager
    def _converted(self, what: str):
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError
        from boto3.exceptions import S3UploadFailedError

        try:
            yield
        except ClientError as error:
            code = _code(error)
            message = f"{self.label}: {what}: {code}: {error.response.get('Error', {}).get('Message', '')}"[:500]
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if code in _UNUSABLE:
                raise UnusableSinkError(message) from None
            if code in _TRANSIENT or status >= 500 or status == 429:
                raise TransientSinkError(message) from None
            if code in _PERMANENT or 400 <= status < 500:
                raise PermanentSinkError(message) from None
            raise TransientSinkError(message) from None
        except (NoCredentialsError, PartialCredentialsError) as error:
            raise UnusableSinkError(f"{self.label}: {what}: {error}") from None
        except S3UploadFailedError as error:  # a multipart upload's part failed: its cause, as text
            text = str(error)
            kind = PermanentSinkError if "EntityTooLarge" in text else TransientSinkError
            raise kind(f"{self.label}: {what}: {text[:300]}") from None
        except BotoCoreError as error:  # connection refused or reset, timeouts
            raise TransientSinkError(f"{self.label}: {what}: {type(error).__name__}: {error}"[:500]) from None


def _code(error) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


class S3Sink(FileStorageSink):
    """``s3://bucket/prefix``: runs under a prefix of an S3 (or S3-compatible) bucket."""

    OPTIONS = {
        **FileStorageSink.OPTIONS,
        "endpoint_url": text_option,
        "region": text_option,
        "access_key_id": text_option,
        "secret_access_key": text_option,
        "session_token": text_option,
    }

    @classmethod
    def identity(cls, url: str) -> str:
        bucket, prefix, query = url_parts(url, "s3")
        if query:
            raise SinkConfigError("s3:// URLs take no query: give endpoint_url, region, ... as the sink's options")
        check_driver("boto3", "s3")
        return f"s3://{bucket}/{prefix}".rstrip("/")

    def _store(self) -> Store:
        bucket, prefix, _query = url_parts(self.url, "s3")
        return S3Store(bucket, prefix, self.options, self.timeout_seconds, repr(self))

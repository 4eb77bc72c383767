"""An S3-compatible bucket prefix as a :class:`~storage.core.Storage`.

Configuration is boto3's own: ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), ``AWS_PROFILE``,
environment credentials, ``~/.aws/config`` and ``AWS_MAX_ATTEMPTS``; :func:`storage.open_storage`
takes explicit overrides. Every request is bounded in time: a connect timeout and a read timeout
(:data:`DEFAULT_CONNECT_TIMEOUT`, :data:`DEFAULT_READ_TIMEOUT`, or the
``EXPLAIN_TRANSFER_S3_CONNECT_TIMEOUT``/``EXPLAIN_TRANSFER_S3_READ_TIMEOUT`` environment
variables) and botocore's bounded "standard" retries (3 attempts unless ``AWS_MAX_ATTEMPTS``), so an
endpoint that accepts connections and never answers fails with
:class:`~storage.errors.EndpointUnreachableError` instead of hanging. botocore and s3transfer errors are translated into
:mod:`storage.errors` with messages that name the URI and never a credential.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, BinaryIO

import boto3
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from storage.core import IO_WORKERS, Storage, TransientStorageError, check_prefix, normalise_key
from storage.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    EndpointUnreachableError,
    ObjectNotFoundError,
    StorageError,
)

logger = logging.getLogger(__name__)

MULTIPART_THRESHOLD = 8 * 1024 * 1024

#: Seconds to wait for a TCP connection (``EXPLAIN_TRANSFER_S3_CONNECT_TIMEOUT``).
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Seconds to wait for bytes on an open connection (``EXPLAIN_TRANSFER_S3_READ_TIMEOUT``).
DEFAULT_READ_TIMEOUT = 30.0

_ACCESS_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "ExpiredToken",
        "InvalidAccessKeyId",
        "InvalidClientTokenId",
        "InvalidToken",
        "SignatureDoesNotMatch",
        "UnrecognizedClientException",
    }
)
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
# Answers that say the service is busy or failing, not that the request or object is wrong;
# botocore's standard mode retries them, and what is left after its retries is transient.
_TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "RequestTimeout",
        "RequestTimeoutException",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "BandwidthLimitExceeded",
    }
)


@dataclass
class _Connection:
    """What every :class:`S3Storage` derived from one URI shares."""

    session: boto3.session.Session
    client: Any
    transfer_config: TransferConfig
    bucket_seen: set[str] = field(default_factory=set)

    def secrets(self) -> list[str]:
        """The credential strings that must never reach a message."""
        try:
            credentials = self.session.get_credentials()
        except botocore.exceptions.BotoCoreError:
            return []
        if credentials is None:
            return []
        frozen = credentials.get_frozen_credentials()
        return [s for s in (frozen.access_key, frozen.secret_key, frozen.token) if s]


class S3Storage(Storage):
    """Objects under ``s3://bucket/prefix`` on any S3-compatible endpoint.

    A PUT, and the completion of a multipart upload, publish an object atomically, so every
    write here is atomic per object. Files from :data:`MULTIPART_THRESHOLD` (8 MiB) up are
    uploaded in parts by boto3's transfer manager.

    Use :func:`storage.open_storage` rather than the constructor.

    Args:
        bucket: the bucket name.
        prefix: the key prefix of the root inside the bucket ("" for the bucket itself).
        connection: the boto3 session, client and transfer settings.
    """

    def __init__(self, bucket: str, prefix: str, connection: _Connection) -> None:
        self.bucket = bucket
        self.prefix = normalise_key(prefix) + "/" if prefix.strip("/") else ""
        self._connection = connection
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")

    @classmethod
    def from_uri(
        cls,
        uri: str,
        *,
        endpoint_url: str | None = None,
        max_attempts: int | None = None,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
        multipart_threshold: int | None = None,
        client_kwargs: dict[str, Any] | None = None,
    ) -> S3Storage:
        """A storage rooted at ``uri`` with a client configured the standard AWS way.

        The client is shared by every storage this process opens with the same options and
        the same AWS environment variables (creating one costs about 0.2 s of CPU). See
        :func:`storage.open_storage` for the arguments.
        """
        rest = uri.split("://", 1)[1]
        bucket, _, prefix = rest.partition("/")
        if "@" in bucket or ":" in bucket:
            raise ValueError(
                "an s3:// URI must not embed credentials or a port; "
                "use the AWS configuration or endpoint_url instead"
            )
        if not bucket:
            raise ValueError(f"no bucket in storage URI {uri!r}")
        # client_kwargs may hold anything (a test's stubbed transport): never shared.
        key = (
            None
            if client_kwargs
            else _connection_key(
                endpoint_url, max_attempts, connect_timeout, read_timeout, multipart_threshold
            )
        )
        with _CONNECTIONS_LOCK:
            connection = _CONNECTIONS.get(key) if key is not None else None
        if connection is None:
            connection = cls._connect(
                uri,
                endpoint_url,
                max_attempts,
                connect_timeout,
                read_timeout,
                multipart_threshold,
                client_kwargs,
            )
            if key is not None:
                with _CONNECTIONS_LOCK:
                    _CONNECTIONS[key] = connection
                    while len(_CONNECTIONS) > _CONNECTIONS_MAX:
                        _CONNECTIONS.pop(next(iter(_CONNECTIONS)))
        return cls(bucket, prefix, connection)

    @staticmethod
    def _connect(
        uri: str,
        endpoint_url: str | None,
        max_attempts: int | None,
        connect_timeout: float | None,
        read_timeout: float | None,
        multipart_threshold: int | None,
        client_kwargs: dict[str, Any] | None,
    ) -> _Connection:
        """A new boto3 session, client and transfer settings."""
        retries: dict[str, Any] = {"mode": "standard"}
        if max_attempts is not None:
            retries["max_attempts"] = max_attempts
        config_kwargs: dict[str, Any] = {
            "retries": retries,
            "connect_timeout": connect_timeout
            or _seconds_from_env("EXPLAIN_TRANSFER_S3_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT),
            "read_timeout": read_timeout
            or _seconds_from_env("EXPLAIN_TRANSFER_S3_READ_TIMEOUT", DEFAULT_READ_TIMEOUT),
            # Room for storage.core's concurrent small requests (markers, reports) and the
            # transfer manager's parts without "connection pool is full" discards.
            "max_pool_connections": 2 * IO_WORKERS,
        }
        kwargs: dict[str, Any] = {"config": Config(**config_kwargs)}
        if endpoint_url is not None:
            kwargs["endpoint_url"] = endpoint_url
        kwargs.update(client_kwargs or {})
        session = boto3.session.Session()
        try:
            client = session.client("s3", **kwargs)
        except botocore.exceptions.BotoCoreError as exc:
            # Configuration errors (unknown profile, bad region) name settings, not secrets.
            raise StorageError(f"cannot configure an S3 client for {uri}: {exc}") from exc
        threshold = multipart_threshold or MULTIPART_THRESHOLD
        transfer_config = TransferConfig(
            multipart_threshold=threshold, multipart_chunksize=threshold, max_concurrency=4
        )
        return _Connection(session, client, transfer_config)

    @property
    def _client(self) -> Any:
        return self._connection.client

    def _key(self, key: str) -> str:
        return self.prefix + normalise_key(key)

    def child(self, prefix: str) -> S3Storage:
        """A storage rooted at ``prefix`` under this one, sharing the client."""
        return S3Storage(self.bucket, self._key(prefix), self._connection)

    def url(self, key: str) -> str:
        """``s3://bucket/prefix/key``."""
        return f"s3://{self.bucket}/{self._key(key)}"

    def exists(self, key: str) -> bool:
        """Whether an object exists under ``key`` (a missing bucket raises, it is not False)."""
        full_key = self._key(key)
        try:
            with self._translated("check", full_key):
                self._client.head_object(Bucket=self.bucket, Key=full_key)
        except ObjectNotFoundError:
            return False
        return True

    def size(self, key: str) -> int:
        """The object's size in bytes."""
        full_key = self._key(key)
        with self._translated("stat", full_key):
            head = self._client.head_object(Bucket=self.bucket, Key=full_key)
        return int(head["ContentLength"])

    def read_bytes(self, key: str) -> bytes:
        """The whole object as bytes."""
        full_key = self._key(key)
        with self._translated("read", full_key):
            response = self._client.get_object(Bucket=self.bucket, Key=full_key)
            with response["Body"] as body:
                return body.read()

    def write_bytes(self, key: str, data: bytes) -> None:
        """Publish ``data`` under ``key`` (one PUT, or a multipart upload when large)."""
        full_key = self._key(key)
        with self._translated("write", full_key):
            if len(data) < self._connection.transfer_config.multipart_threshold:
                self._client.put_object(Bucket=self.bucket, Key=full_key, Body=bytes(data))
            else:
                self._client.upload_fileobj(
                    io.BytesIO(data),
                    self.bucket,
                    full_key,
                    Config=self._connection.transfer_config,
                )
        logger.debug("wrote %d bytes to %s", len(data), self.url(key))

    def open_read(self, key: str) -> BinaryIO:
        """A stream over the object's body (a context manager closing the connection).

        A failure while the body streams (a connection reset, a read timeout) is raised as a
        :mod:`storage.errors` error like any other request's, not as botocore's own.
        """
        full_key = self._key(key)
        with self._translated("open", full_key):
            body = self._client.get_object(Bucket=self.bucket, Key=full_key)["Body"]
        return _TranslatedBody(body, lambda: self._translated("read", full_key))  # type: ignore[return-value]

    def upload_file(self, local_path: str | PathLike[str], key: str) -> None:
        """Upload a local file with boto3's transfer manager (multipart from 8 MiB)."""
        full_key = self._key(key)
        source = Path(local_path)
        if not source.is_file():
            raise ObjectNotFoundError(f"cannot upload {source}: no such local file")
        with self._translated("upload", full_key):
            self._client.upload_file(
                str(source), self.bucket, full_key, Config=self._connection.transfer_config
            )
        logger.debug("uploaded %s to %s", source, self.url(key))

    def download_file(self, key: str, local_path: str | PathLike[str]) -> None:
        """Download the object; ``local_path`` appears only once complete."""
        full_key = self._key(key)
        destination = Path(os.path.abspath(local_path))
        destination.parent.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(
            dir=destination.parent, prefix=f".{destination.name}.", suffix=".partial"
        )
        os.close(fd)
        try:
            with self._translated("download", full_key):
                self._client.download_file(
                    self.bucket, full_key, temp_name, Config=self._connection.transfer_config
                )
            os.replace(temp_name, destination)
        finally:
            if os.path.exists(temp_name):
                os.unlink(temp_name)

    @contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        """Download the object to a temporary file, yield its path, delete it on exit."""
        with tempfile.TemporaryDirectory(prefix="storage-") as folder:
            path = Path(folder) / normalise_key(key).rsplit("/", 1)[-1]
            self.download_file(key, path)
            yield path

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys under ``prefix``, across as many listing pages as needed."""
        full_prefix = self.prefix + check_prefix(prefix)
        paginator = self._client.get_paginator("list_objects_v2")
        keys = []
        with self._translated("list", full_prefix):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
                keys.extend(item["Key"][len(self.prefix) :] for item in page.get("Contents", ()))
        return sorted(keys)

    def delete(self, key: str) -> None:
        """Delete the object; a missing object is not an error (S3 semantics)."""
        full_key = self._key(key)
        with self._translated("delete", full_key):
            self._client.delete_object(Bucket=self.bucket, Key=full_key)

    @contextmanager
    def _translated(self, operation: str, full_key: str) -> Iterator[None]:
        """Re-raise botocore/s3transfer failures as :mod:`storage.errors`, credentials removed."""
        try:
            yield
        except StorageError:
            raise
        except Exception as exc:
            translated = self._translate(exc, operation, full_key)
            if translated is None:
                raise
            # The original exception is dropped on purpose: botocore keeps the raw response,
            # which for signature errors echoes the request's credential scope.
            raise translated from None

    def _translate(self, exc: BaseException, operation: str, full_key: str) -> StorageError | None:
        where = f"s3://{self.bucket}/{full_key}"
        cause = _botocore_cause(exc)
        if cause is None:
            return None
        if isinstance(cause, botocore.exceptions.ClientError):
            error = cause.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            detail = self._redact(f"{code or status}: {error.get('Message') or 'no message'}")
            if code == "NoSuchBucket":
                self._connection.bucket_seen.discard(self.bucket)
                return BucketNotFoundError(
                    f"cannot {operation} {where}: bucket not found ({detail})"
                )
            if code in _ACCESS_CODES or status == 403:
                return AccessDeniedError(
                    f"cannot {operation} {where}: access denied, check the credentials ({detail})"
                )
            if code == "NoSuchKey":  # a GET's answer: the bucket exists, the key does not
                return ObjectNotFoundError(f"no object at {where}")
            if code in _NOT_FOUND_CODES or status == 404:
                # A HEAD on a missing bucket is a bare 404, indistinguishable from a missing key.
                if not self._bucket_exists():
                    return BucketNotFoundError(f"cannot {operation} {where}: bucket not found")
                return ObjectNotFoundError(f"no object at {where}")
            if code in _TRANSIENT_CODES or (isinstance(status, int) and status >= 500):
                return TransientStorageError(
                    f"cannot {operation} {where}: the service failed after retries ({detail})"
                )
            return StorageError(f"cannot {operation} {where}: {detail}")
        if isinstance(
            cause,
            (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError),
        ):
            endpoint = self._client.meta.endpoint_url
            return EndpointUnreachableError(
                f"cannot {operation} {where}: endpoint {endpoint} unreachable after retries "
                f"({type(cause).__name__})"
            )
        if isinstance(
            cause,
            (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError),
        ):
            return AccessDeniedError(f"cannot {operation} {where}: no usable credentials found")
        if isinstance(cause, botocore.exceptions.IncompleteReadError):
            # The body ended before its Content-Length: the connection, not the object, failed.
            return TransientStorageError(
                f"cannot {operation} {where}: the connection ended early ({type(cause).__name__})"
            )
        return StorageError(f"cannot {operation} {where}: {self._redact(str(cause))}")

    def _bucket_exists(self) -> bool:
        if self.bucket in self._connection.bucket_seen:
            return True
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except botocore.exceptions.ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404 or exc.response.get("Error", {}).get("Code") == "NoSuchBucket":
                return False
            # Forbidden or anything else: the bucket may well exist; let the 404 stand.
            return True
        except botocore.exceptions.BotoCoreError:
            return True
        self._connection.bucket_seen.add(self.bucket)
        return True

    def _redact(self, text: str) -> str:
        for secret in self._connection.secrets():
            text = text.replace(secret, "***")
        return text


class _TranslatedBody:
    """botocore's streaming body, with the errors of its reads translated like a request's."""

    def __init__(self, body: Any, translated: Any) -> None:
        self._body = body
        self._translated = translated

    def read(self, size: int | None = -1) -> bytes:
        with self._translated():
            return self._body.read(None if size is None or size < 0 else size)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._body.close()

    def __enter__(self) -> _TranslatedBody:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# Connections (boto3 session and client) by what configures them: creating a client costs a
# fifth of a second of CPU (botocore loads its service model), and a shard task opens the same
# few URIs again and again. boto3 clients are thread-safe; a forked child gets its own (the
# process id is part of the key), and so does any change of the AWS environment variables.
_CONNECTIONS: dict[tuple[Any, ...], _Connection] = {}
_CONNECTIONS_MAX = 16
_CONNECTIONS_LOCK = threading.Lock()
_CONFIG_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_MAX_ATTEMPTS",
    "AWS_RETRY_MODE",
    "EXPLAIN_TRANSFER_S3_CONNECT_TIMEOUT",
    "EXPLAIN_TRANSFER_S3_READ_TIMEOUT",
)


def _connection_key(*options: Any) -> tuple[Any, ...]:
    return (os.getpid(), options, tuple(os.environ.get(name) for name in _CONFIG_ENV))


def _seconds_from_env(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {text!r}") from None
    if not value > 0:
        raise ValueError(f"{name} must be > 0 seconds, got {text!r}")
    return value


def _botocore_cause(exc: BaseException) -> BaseException | None:
    """The botocore error behind ``exc``: s3transfer wraps it in its own exceptions."""
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(
            current, (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError)
        ):
            return current
        current = current.__cause__ or current.__context__
    return None

"""An S3-compatible bucket prefix as a :class:`~storage.core.Storage`.

Configuration is boto3's own: ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), ``AWS_PROFILE``,
environment credentials, ``~/.aws/config`` and ``AWS_MAX_ATTEMPTS``; :func:`storage.open_storage`
takes explicit overrides. botocore and s3transfer errors are translated into
:mod:`storage.errors` with messages that name the URI and never a credential.

One deadline per request. Every request (a HEAD, a GET until its body starts, a PUT, one part
of a multipart upload, one listing page) gets at most :data:`DEFAULT_DEADLINE` seconds in all,
connection, answer and botocore's retries included (``EXPLAIN_TRANSFER_STORAGE_DEADLINE``, or
``deadline=``): a retry starts only if its worst case (the backoff, a connect timeout and a read
timeout) still ends within it. The timeouts of one attempt follow from the deadline unless set
(``EXPLAIN_TRANSFER_S3_CONNECT_TIMEOUT``/``EXPLAIN_TRANSFER_S3_READ_TIMEOUT``, or arguments):
connect ``min(5, deadline / 4)`` s, read ``min(15, (deadline - connect) / 2)`` s, so a
timed-out attempt can be tried once more. Timeouts set longer than the deadline are kept, and
the bound is then one attempt of them; ``AWS_MAX_ATTEMPTS`` is kept too, within the bound. So an
endpoint that accepts connections and never answers is an
:class:`~storage.errors.EndpointUnreachableError` naming the endpoint, the URI and the bound
within it (31 s by default: two attempts of 15 s).

A body that streams (a shard read through :meth:`S3Storage.open_read`, a download) is not
bounded in total: each read waits at most the read timeout, so a large shard that keeps
arriving is never cut by a deadline meant for a request, and one that stops arriving fails
within one read timeout. s3transfer re-requests a download whose body was cut (up to 5 times),
each request under its own deadline.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import threading
import time
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
    os_errors_translated,
)

logger = logging.getLogger(__name__)

MULTIPART_THRESHOLD = 8 * 1024 * 1024

#: Seconds one request may take in all, its retries included (``EXPLAIN_TRANSFER_STORAGE_DEADLINE``).
DEFAULT_DEADLINE = 45.0
#: The longest wait for a TCP connection (``EXPLAIN_TRANSFER_S3_CONNECT_TIMEOUT``); less when
#: the deadline is short (a quarter of it).
DEFAULT_CONNECT_TIMEOUT = 5.0
#: The longest wait for bytes on an open connection (``EXPLAIN_TRANSFER_S3_READ_TIMEOUT``);
#: less when the deadline is short (half of what the connect timeout leaves).
DEFAULT_READ_TIMEOUT = 15.0
DEADLINE_VARIABLE = "EXPLAIN_TRANSFER_STORAGE_DEADLINE"
# botocore's standard retry mode: the longest backoff, and what an x-amz-retry-after header may
# add to it (botocore.retries.standard.ExponentialBackoff).
_MAX_BACKOFF = 20.0
_RETRY_AFTER_EXTRA = 5.0

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


@dataclass(frozen=True)
class RequestDeadline:
    """How long one request may take: its deadline, and the timeouts of one attempt.

    Attributes:
        deadline: seconds for the request in all, retries included.
        connect_timeout: seconds one attempt waits for a connection.
        read_timeout: seconds one attempt waits for each read (the answer, a body's chunk).
    """

    deadline: float
    connect_timeout: float
    read_timeout: float

    @classmethod
    def resolve(
        cls,
        deadline: float | None = None,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
    ) -> RequestDeadline:
        """The arguments, else the environment variables, else values derived from the deadline."""
        deadline = deadline or _seconds_from_env(DEADLINE_VARIABLE) or DEFAULT_DEADLINE
        connect = (
            connect_timeout
            or _seconds_from_env("EXPLAIN_TRANSFER_S3_CONNECT_TIMEOUT")
            or min(DEFAULT_CONNECT_TIMEOUT, deadline / 4)
        )
        read = (
            read_timeout
            or _seconds_from_env("EXPLAIN_TRANSFER_S3_READ_TIMEOUT")
            or min(DEFAULT_READ_TIMEOUT, max((deadline - connect) / 2, deadline / 4))
        )
        return cls(float(deadline), float(connect), float(read))

    @property
    def bound(self) -> float:
        """The most seconds a request takes on an endpoint that never answers.

        The deadline, unless one attempt of the timeouts set is longer: then that attempt.
        """
        return max(self.deadline, self.connect_timeout + self.read_timeout)

    def describe(self) -> str:
        """The bound in words, with the setting that changes it."""
        if self.bound > self.deadline:
            return (
                f"at most {self.bound:g} s per request: one attempt of the connect and read "
                f"timeouts set, longer than the {self.deadline:g} s deadline"
            )
        return f"at most {self.bound:g} s per request, {DEADLINE_VARIABLE}"

    def install(self, client: Any) -> None:
        """Make ``client`` keep every request within :attr:`bound`."""
        client.meta.events.register("before-call.s3", self._start)
        # First: botocore's own handler would otherwise decide on the retry, with no deadline.
        client.meta.events.register_first("needs-retry.s3", self._stop_retrying_past_bound)

    def _start(self, context: dict[str, Any] | None = None, **_: Any) -> None:
        if context is not None:
            context[_STARTED] = time.monotonic()

    def _stop_retrying_past_bound(
        self,
        attempts: int,
        request_dict: dict[str, Any],
        response: Any = None,
        caught_exception: BaseException | None = None,
        **_: Any,
    ) -> bool | None:
        """False (no retry) when the worst case of one more attempt would end past the bound;
        None lets botocore's retry handler decide (its attempts, its backoff)."""
        started = (request_dict.get("context") or {}).get(_STARTED)
        if started is None:
            return None
        elapsed = time.monotonic() - started
        if caught_exception is not None:
            # Read back by S3Storage._translate for the message.
            caught_exception.storage_attempts = attempts  # type: ignore[attr-defined]
            caught_exception.storage_seconds = elapsed  # type: ignore[attr-defined]
        elif response is None or response[0].status_code < 400:
            return None  # a success is never retried: nothing to decide
        # botocore's largest backoff before attempt n + 1 (throttling: base 1 s), plus what an
        # x-amz-retry-after header may add to it.
        backoff = min(2.0 ** (attempts - 1), _MAX_BACKOFF)
        if response is not None and "x-amz-retry-after" in response[0].headers:
            backoff += _RETRY_AFTER_EXTRA
        if elapsed + backoff + self.connect_timeout + self.read_timeout > self.bound:
            logger.debug(
                "no retry after attempt %d (%.1f s): one more could end past %.0f s",
                attempts,
                elapsed,
                self.bound,
            )
            return False
        return None


# Where a request's start is kept in botocore's per-request context.
_STARTED = "explain_transfer_started"


@dataclass
class _Connection:
    """What every :class:`S3Storage` derived from one URI shares."""

    session: boto3.session.Session
    client: Any
    transfer_config: TransferConfig
    deadline: RequestDeadline
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
        deadline: float | None = None,
    ) -> S3Storage:
        """A storage rooted at ``uri`` with a client configured the standard AWS way.

        The client is shared by every storage this process opens with the same options and
        the same AWS environment variables (creating one costs about 0.2 s of CPU). See
        :func:`storage.open_storage` for the arguments; ``deadline`` is the seconds one request
        may take, retries included (:data:`DEFAULT_DEADLINE`, ``EXPLAIN_TRANSFER_STORAGE_DEADLINE``).
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
                endpoint_url,
                max_attempts,
                connect_timeout,
                read_timeout,
                multipart_threshold,
                deadline,
            )
        )
        with _CONNECTIONS_LOCK:
            connection = _CONNECTIONS.get(key) if key is not None else None
        if connection is None:
            connection = cls._connect(
                uri,
                endpoint_url,
                max_attempts,
                RequestDeadline.resolve(deadline, connect_timeout, read_timeout),
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
        deadline: RequestDeadline,
        multipart_threshold: int | None,
        client_kwargs: dict[str, Any] | None,
    ) -> _Connection:
        """A new boto3 session, client and transfer settings."""
        retries: dict[str, Any] = {"mode": "standard"}
        if max_attempts is not None:
            # Attempts in all, as AWS_MAX_ATTEMPTS counts them (botocore's own "max_attempts"
            # key counts the retries only: one attempt more than asked).
            retries["total_max_attempts"] = max_attempts
        config_kwargs: dict[str, Any] = {
            "retries": retries,
            "connect_timeout": deadline.connect_timeout,
            "read_timeout": deadline.read_timeout,
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
        deadline.install(client)
        threshold = multipart_threshold or MULTIPART_THRESHOLD
        transfer_config = TransferConfig(
            multipart_threshold=threshold, multipart_chunksize=threshold, max_concurrency=4
        )
        return _Connection(session, client, transfer_config, deadline)

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
        # Outside: a failure to read the local file (s3transfer raises it as it is) names it.
        with os_errors_translated("read", source), self._translated("upload", full_key):
            self._client.upload_file(
                str(source), self.bucket, full_key, Config=self._connection.transfer_config
            )
        logger.debug("uploaded %s to %s", source, self.url(key))

    def download_file(self, key: str, local_path: str | PathLike[str]) -> None:
        """Download the object; ``local_path`` appears only once complete."""
        full_key = self._key(key)
        destination = Path(os.path.abspath(local_path))
        with os_errors_translated("write", destination):
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
        with os_errors_translated("create", tempfile.gettempdir()):
            temporary = tempfile.TemporaryDirectory(prefix="storage-")
        with temporary as folder:
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
                retried = cause.response.get("ResponseMetadata", {}).get("RetryAttempts")
                tries = f" ({retried + 1} attempts)" if isinstance(retried, int) else ""
                return TransientStorageError(
                    f"cannot {operation} {where}: the service failed after retries{tries} "
                    f"({detail})"
                )
            return StorageError(f"cannot {operation} {where}: {detail}")
        if isinstance(
            cause,
            (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError),
        ):
            endpoint = self._client.meta.endpoint_url
            return EndpointUnreachableError(
                f"cannot {operation} {where}: endpoint {endpoint} unreachable after retries "
                f"{self._how_long(cause)}({type(cause).__name__})"
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

    def _how_long(self, cause: BaseException) -> str:
        """How long a request waited before it gave up, and the bound, in words (or "")."""
        deadline = self._connection.deadline
        attempts = getattr(cause, "storage_attempts", None)
        seconds = getattr(cause, "storage_seconds", None)
        if attempts is not None and seconds is not None:
            plural = "s" if attempts != 1 else ""
            return f"({attempts} attempt{plural} in {seconds:.1f} s; {deadline.describe()}) "
        if isinstance(cause, botocore.exceptions.ReadTimeoutError):
            # A body that stopped arriving: each of its reads has the read timeout.
            return f"(no data within the {deadline.read_timeout:g} s read timeout) "
        return ""

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
    DEADLINE_VARIABLE,
)


def _connection_key(*options: Any) -> tuple[Any, ...]:
    return (os.getpid(), options, tuple(os.environ.get(name) for name in _CONFIG_ENV))


def _seconds_from_env(name: str) -> float | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return None
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

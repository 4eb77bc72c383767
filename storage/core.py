"""The :class:`Storage` interface, key validation and the :func:`open_storage` entry point.

A :class:`Storage` is rooted at a URI (a local folder or an ``s3://bucket/prefix``) and addresses
objects by relative, ``/``-separated keys. The backends (:mod:`storage.local`, :mod:`storage.s3`)
implement the byte-level operations; JSON, Parquet and completion markers are built on top of
them here, once, so both backends behave the same.
"""

from __future__ import annotations

import abc
import io
import json
import logging
from contextlib import AbstractContextManager
from os import PathLike
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from storage.errors import PathOutsideRootError

logger = logging.getLogger(__name__)

COMPLETIONS_PREFIX = "_completions/"
# A key no stage writes: looking it up tells whether the root can be reached at all.
_PROBE_KEY = "_completions/.probe"


def normalise_key(key: str) -> str:
    """Validate a key and return its canonical form.

    Empty and ``.`` segments are dropped (``a//./b`` is ``a/b``) so that a local folder and a
    bucket agree on what names the same object.

    Args:
        key: a relative, ``/``-separated key.

    Returns:
        The key without empty or ``.`` segments.

    Raises:
        PathOutsideRootError: the key is absolute, is a URI, contains a ``..`` segment, a NUL
            character, or is empty.
    """
    if not isinstance(key, str):
        raise TypeError(f"a storage key must be a str, got {type(key).__name__}")
    _reject_escape(key)
    parts = [part for part in key.split("/") if part not in ("", ".")]
    if not parts:
        raise PathOutsideRootError(f"empty key {key!r} names the root itself, not an object")
    return "/".join(parts)


def check_prefix(prefix: str) -> str:
    """Validate a listing prefix; unlike a key it may be empty or end with ``/``."""
    if not isinstance(prefix, str):
        raise TypeError(f"a storage prefix must be a str, got {type(prefix).__name__}")
    if prefix:
        _reject_escape(prefix)
    return prefix


def _reject_escape(key: str) -> None:
    if "\x00" in key:
        raise PathOutsideRootError(f"key {key!r} contains a NUL character")
    if key.startswith("/") or "://" in key:
        raise PathOutsideRootError(f"key {key!r} is absolute; keys are relative to the root")
    if ".." in key.split("/"):
        raise PathOutsideRootError(f"key {key!r} escapes the storage root")


class Storage(abc.ABC):
    """A root (local folder or object-store prefix) holding objects addressed by keys.

    Every write publishes atomically: a reader sees either the previous object or the complete
    new one, never a partial file. Completion markers (:meth:`mark_complete`) are ordinary JSON
    objects under ``_completions/``; writing them after the data they vouch for is what makes a
    unit of work visible.

    Attributes:
        uri: the root URI; never contains a credential.
    """

    uri: str

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    @abc.abstractmethod
    def child(self, prefix: str) -> Storage:
        """A storage rooted at ``prefix`` under this one (sharing its connection)."""

    @abc.abstractmethod
    def url(self, key: str) -> str:
        """The full URI (or absolute local path) of ``key``."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object exists under ``key``."""

    @abc.abstractmethod
    def size(self, key: str) -> int:
        """The size of the object in bytes."""

    @abc.abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """The whole object as bytes."""

    @abc.abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Publish ``data`` under ``key`` atomically, replacing any previous object."""

    @abc.abstractmethod
    def open_read(self, key: str) -> BinaryIO:
        """A readable binary stream over the object; use it as a context manager."""

    @abc.abstractmethod
    def upload_file(self, local_path: str | PathLike[str], key: str) -> None:
        """Publish a local file under ``key`` atomically (multipart on S3 for large files)."""

    @abc.abstractmethod
    def download_file(self, key: str, local_path: str | PathLike[str]) -> None:
        """Copy the object to a local file; the file appears complete or not at all."""

    @abc.abstractmethod
    def local_copy(self, key: str) -> AbstractContextManager[Path]:
        """A context manager yielding a local path holding the object's bytes.

        For a local folder it is the file itself (no copy: do not modify it); for an object
        store it is a temporary download removed on exit.
        """

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys of every object whose key starts with ``prefix`` (recursive)."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object under ``key``; removing a missing object is not an error."""

    def check_readable(self) -> None:
        """Fail now if the root cannot be reached (missing bucket, refused credentials, down).

        Writes nothing. Raises a :class:`~storage.errors.StorageError` naming the URI.
        """
        self.exists(_PROBE_KEY)

    def check_writable(self) -> None:
        """Fail now if nothing could be written under the root; writes nothing.

        An object store is only probed for reachability, bucket and credentials (a write
        permission cannot be known without writing); a local folder is checked on disk.
        """
        self.check_readable()

    def read_json(self, key: str) -> Any:
        """Parse the object as UTF-8 JSON."""
        return json.loads(self.read_bytes(key))

    def write_json(self, key: str, obj: Any) -> None:
        """Publish ``obj`` as indented, key-sorted UTF-8 JSON."""
        text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False)
        self.write_bytes(key, (text + "\n").encode("utf-8"))

    def read_parquet(self, key: str) -> pa.Table:
        """Read a Parquet object into a :class:`pyarrow.Table`."""
        return pq.read_table(pa.BufferReader(self.read_bytes(key)))

    def write_parquet(self, key: str, table: pa.Table) -> None:
        """Publish ``table`` as a Parquet object."""
        # Serialising to memory first keeps the publish atomic: the object appears in one write.
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        self.write_bytes(key, buffer.getvalue())

    def mark_complete(self, unit: str, info: dict[str, Any] | None = None) -> None:
        """Write the completion marker of ``unit``: call it after the unit's outputs exist.

        Args:
            unit: the name of the unit of work (a shard name, a stage step).
            info: JSON-able facts about the completed unit, stored as the marker's content.
        """
        key = _completion_key(unit)
        self.write_json(key, info or {})
        logger.debug("marked %s complete in %s", unit, self.uri)

    def is_complete(self, unit: str) -> bool:
        """Whether ``unit`` has a completion marker."""
        return self.exists(_completion_key(unit))

    def completion_info(self, unit: str) -> dict[str, Any]:
        """The ``info`` stored by :meth:`mark_complete` for ``unit``.

        Raises:
            ObjectNotFoundError: the unit has no completion marker.
        """
        return self.read_json(_completion_key(unit))

    def clear_complete(self, unit: str) -> None:
        """Remove the completion marker of ``unit`` (before redoing it)."""
        self.delete(_completion_key(unit))

    def completed(self) -> set[str]:
        """The units that carry a completion marker."""
        units = set()
        for key in self.list(COMPLETIONS_PREFIX):
            name = key[len(COMPLETIONS_PREFIX) :]
            if name.endswith(".json"):
                units.add(name[: -len(".json")])
        return units


def _completion_key(unit: str) -> str:
    return COMPLETIONS_PREFIX + normalise_key(unit) + ".json"


def open_storage(
    uri: str | PathLike[str],
    *,
    endpoint_url: str | None = None,
    max_attempts: int | None = None,
    connect_timeout: float | None = None,
    read_timeout: float | None = None,
    multipart_threshold: int | None = None,
    client_kwargs: dict[str, Any] | None = None,
) -> Storage:
    """Open the storage rooted at ``uri``: the one entry point for every byte.

    A plain path or ``file://`` URI gives a :class:`~storage.local.LocalStorage`; an
    ``s3://bucket/prefix`` URI gives a :class:`~storage.s3.S3Storage` configured the standard AWS
    way (``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, environment credentials, ``~/.aws/config``).
    The keyword options override that configuration for object stores and are ignored for local
    folders, so stage code can pass them whatever the URI.

    Args:
        uri: the root URI.
        endpoint_url: S3-compatible endpoint, instead of ``AWS_ENDPOINT_URL``/the AWS default.
        max_attempts: total attempts per request (botocore "standard" retry mode).
        connect_timeout: seconds to wait for a connection (default 10, or
            ``EXPLAIN_TRANSFER_S3_CONNECT_TIMEOUT``).
        read_timeout: seconds to wait for data on an open connection (default 30, or
            ``EXPLAIN_TRANSFER_S3_READ_TIMEOUT``).
        multipart_threshold: object size in bytes from which uploads are multipart (8 MiB).
        client_kwargs: extra keyword arguments for ``boto3.client("s3", ...)``.

    Returns:
        The storage.

    Raises:
        ValueError: the URI scheme is not supported, is a ``pipe:`` command, or the URI embeds
            credentials.
    """
    text = str(uri)
    if text.lstrip().lower().startswith("pipe:"):
        # webdataset would run the rest of a pipe: URL as a shell command; storage never does.
        raise ValueError(
            f"refusing storage URI {text[:60]!r}: 'pipe:' URIs run shell commands; "
            "use a path, file:// or s3://"
        )
    scheme, sep, rest = text.partition("://")
    if not sep:
        from storage.local import LocalStorage

        return LocalStorage(text)
    scheme = scheme.lower()
    if scheme == "file":
        from storage.local import LocalStorage

        host, slash, path = rest.partition("/")
        if host not in ("", "localhost"):
            raise ValueError(f"file URI {text!r} names a remote host; use a local path")
        return LocalStorage("/" + path if slash else "/")
    if scheme == "s3":
        # Imported here so that local-only runs never pay for importing boto3.
        from storage.s3 import S3Storage

        return S3Storage.from_uri(
            text,
            endpoint_url=endpoint_url,
            max_attempts=max_attempts,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            multipart_threshold=multipart_threshold,
            client_kwargs=client_kwargs,
        )
    raise ValueError(f"unsupported storage URI scheme {scheme!r} in {text!r}; use a path or s3://")

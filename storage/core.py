"""The :class:`Storage` interface, key validation and the completion contract.

A :class:`Storage` is rooted at a URI (a local folder or an ``s3://bucket/prefix``) and addresses
objects by relative, ``/``-separated keys. The backends (:mod:`storage.local`, :mod:`storage.s3`)
implement the byte-level operations; JSON, Parquet and completion markers are built on top of
them here, once, so both backends behave the same. The entry points that pick a backend from a
URI live in :mod:`storage.uri`, so this module imports no backend (and no backend imports it
back through them).
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

    def is_done(self, unit: str, fingerprint: str, *outputs: str) -> bool:
        """The one rule every stage uses to skip work: done with *these* inputs.

        A unit counts as done only when its completion marker exists, records ``fingerprint``
        (a hash of everything the unit's output depends on: config, input models, data), and
        every key in ``outputs`` exists. A marker written for other inputs does not count, so a
        stage never reuses an output computed from something else.

        Args:
            unit: the unit of work.
            fingerprint: the fingerprint of the unit's inputs.
            outputs: keys the unit must have produced.
        """
        if not self.is_complete(unit):
            return False
        if self.completion_info(unit).get("fingerprint") != fingerprint:
            logger.info("%s in %s was made from other inputs: redoing it", unit, self.uri)
            return False
        return all(self.exists(key) for key in outputs)

    def publish_done(self, unit: str, fingerprint: str, **info: Any) -> None:
        """Mark ``unit`` done for the inputs ``fingerprint``: call it after its outputs exist.

        The counterpart of :meth:`is_done`; ``info`` is stored beside the fingerprint.
        """
        self.mark_complete(unit, {**info, "fingerprint": fingerprint})

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

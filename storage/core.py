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
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from os import PathLike
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from storage.errors import (
    EndpointUnreachableError,
    NoSpaceError,
    ObjectNotFoundError,
    PathOutsideRootError,
    ReadOnlyStorageError,
    StorageError,
    StorageOSError,
    StoragePermissionError,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

COMPLETIONS_PREFIX = "_completions/"
# A key no stage writes: looking it up tells whether the root can be reached at all.
_PROBE_KEY = "_completions/.probe"

#: Requests in flight at once when many small objects are read or written (markers, reports,
#: plan files): object stores answer each in tens of milliseconds, so one at a time would make
#: thousands of them minutes of waiting. Matches the S3 client's connection pool.
IO_WORKERS = 16


class TransientStorageError(StorageError):
    """A failure that says nothing about the object: a 5xx, throttling, a dropped connection.

    Raised once the backend's own retries are spent. A reader must not treat the object as bad
    (quarantine it) on such an error; the unit of work fails instead, so that its retry reads
    the object again. See :func:`is_transient`.
    """


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` says nothing bad about the object itself: fail the unit, do not quarantine.

    A reader of listed inputs quarantines an object only for what is wrong with it (corrupt,
    outside the root, refused credentials on it); these fail the unit of work instead, so that
    its retry, or the rerun once the cause is removed, reads the object again:

    - :class:`TransientStorageError` (server errors, throttling, a connection cut mid-stream)
      and :class:`~storage.errors.EndpointUnreachableError` (no answer within the deadline);
    - :class:`~storage.errors.StorageOSError`: the volume or its permissions failed (no space,
      read-only, permission denied, an I/O error), not the object;
    - :class:`~storage.errors.ObjectNotFoundError`: the object was listed and is gone (an input
      deleted mid-run). Quarantining it would publish a version whose listing vouches for it.
    """
    return isinstance(
        exc,
        TransientStorageError | EndpointUnreachableError | StorageOSError | ObjectNotFoundError,
    )


def worth_retrying(exc: BaseException) -> bool:
    """Whether retrying the unit of work after ``exc`` may succeed without anyone's help.

    False for the causes only a person removes (a full or read-only volume, a permission, an
    input that vanished): a task retried after them would only print the same error later.
    """
    return not isinstance(
        exc, NoSpaceError | ReadOnlyStorageError | StoragePermissionError | ObjectNotFoundError
    )


def map_concurrently(
    fn: Callable[[T], R], items: Iterable[T], *, workers: int = IO_WORKERS
) -> list[R]:
    """``[fn(item) for item in items]`` with up to ``workers`` calls in flight; input order kept.

    For many small storage requests (markers, reports): the first exception is raised once the
    calls in flight have finished, so no thread outlives the call.
    """
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(min(workers, len(items)), thread_name_prefix="storage-io") as pool:
        futures = [pool.submit(fn, item) for item in items]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise


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

    def read_json_many(self, keys: Sequence[str], *, workers: int = IO_WORKERS) -> list[Any]:
        """:meth:`read_json` of each key, ``workers`` requests at a time, in ``keys`` order.

        Raises:
            ObjectNotFoundError: one of the keys has no object.
        """
        return map_concurrently(self.read_json, keys, workers=workers)

    def write_json_many(
        self, items: Sequence[tuple[str, Any]], *, workers: int = IO_WORKERS
    ) -> None:
        """:meth:`write_json` of each ``(key, obj)``, ``workers`` requests at a time."""
        map_concurrently(lambda item: self.write_json(*item), items, workers=workers)

    def write_json(self, key: str, obj: Any) -> None:
        """Publish ``obj`` as indented, key-sorted UTF-8 JSON."""
        text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False)
        self.write_bytes(key, (text + "\n").encode("utf-8"))

    def read_parquet(self, key: str) -> pa.Table:
        """Read a Parquet object into a :class:`pyarrow.Table`."""
        # On one thread: the tables here are small (manifests, sweep rows), and Arrow's CPU
        # pool, once used, can abort the interpreter at exit ("terminate called without an
        # active exception", apache/arrow#34314; seen here once in `datasets show`).
        return pq.read_table(pa.BufferReader(self.read_bytes(key)), use_threads=False)

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

    def completion_infos(
        self, units: Sequence[str], *, workers: int = IO_WORKERS
    ) -> list[dict[str, Any]]:
        """:meth:`completion_info` of many units, read concurrently, in ``units`` order.

        One request per unit, ``workers`` at a time: what a stage with thousands of shards
        needs instead of a request after another.

        Raises:
            ObjectNotFoundError: a unit has no completion marker.
        """
        return self.read_json_many([_completion_key(unit) for unit in units], workers=workers)

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

    def done_units(
        self,
        units: Sequence[str],
        fingerprint: str,
        outputs: Callable[[str], Sequence[str]] | None = None,
        *,
        listing: Collection[str] | None = None,
        workers: int = IO_WORKERS,
    ) -> dict[str, dict[str, Any]]:
        """The units among ``units`` that :meth:`is_done` accepts, with their marker infos.

        The same rule as :meth:`is_done`, for many units at once: one listing of the root tells
        which markers and outputs exist, and only the markers found are read, concurrently.
        For a dataset of a thousand shards that is a few listing pages and a thousand parallel
        reads instead of three requests after another per shard.

        Args:
            units: the units of work.
            fingerprint: the fingerprint of the units' inputs.
            outputs: the keys a unit must have produced (none when omitted).
            listing: the root's keys, when the caller has just listed them (else listed here).
            workers: reads in flight at once.

        Returns:
            ``{unit: marker info}`` of the done units, in ``units`` order.
        """
        present = set(self.list()) if listing is None else set(listing)
        marked = [unit for unit in units if _completion_key(unit) in present]

        def info(unit: str) -> dict[str, Any] | None:
            try:
                return self.completion_info(unit)
            except FileNotFoundError:  # removed since the listing: not done
                return None

        done = {}
        for unit, found in zip(
            marked, map_concurrently(info, marked, workers=workers), strict=True
        ):
            if found is None:
                continue
            if found.get("fingerprint") != fingerprint:
                logger.info("%s in %s was made from other inputs: redoing it", unit, self.uri)
                continue
            if outputs is not None and not all(
                normalise_key(key) in present for key in outputs(unit)
            ):
                continue
            done[unit] = found
        return done

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

"""The errors storage raises: every one is a :class:`StorageError`.

Messages name the URI involved and the failed operation, never a credential, so they can be
logged, shown in the Prefect UI or written to a report as they are.

An operating-system error during a storage operation (a full disk, a read-only volume, a
permission, a file that vanished) is translated here, once, for every backend
(:func:`os_errors_translated`): the message names the path and the cause in the words ``rsync``
and ``git`` print, e.g. ``cannot write /data/x.tar: No space left on device``.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class StorageError(Exception):
    """Base class of every error raised by :mod:`storage`."""


class BucketNotFoundError(StorageError):
    """The bucket named by an ``s3://`` URI does not exist."""


class AccessDeniedError(StorageError):
    """The credentials are missing, unknown, wrong, or not allowed to do the operation."""


class EndpointUnreachableError(StorageError):
    """The object-store endpoint could not be reached, after botocore's own retries."""


class PathOutsideRootError(StorageError, ValueError):
    """A key is absolute, contains ``..`` or otherwise points outside the storage root."""


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """No object (file) exists under the key; also a :class:`FileNotFoundError`."""


class ShardReadError(StorageError):
    """A shard is truncated, corrupt or does not match its completion marker."""


class StorageOSError(StorageError, OSError):
    """The operating system refused a storage operation: ``cannot {operation} {path}: {cause}``.

    Also an :class:`OSError` with the usual ``errno``, ``strerror`` (the cause) and
    ``filename`` (the path), so code that handles OS errors keeps working. Subclasses name the
    causes a user can fix; any other errno is this class itself.

    Args:
        operation: what was being done (``write``, ``read``, ``create``, ...).
        path: the file or folder involved.
        code: the ``errno``.
        cause: the words for it (:data:`CAUSES`, else :func:`os.strerror`).
    """

    def __init__(self, operation: str, path: str, code: int, cause: str) -> None:
        super().__init__(code, cause, path)
        self.operation = operation

    def __str__(self) -> str:
        return f"cannot {self.operation} {self.filename}: {self.strerror}"

    def __repr__(self) -> str:
        # Prefect's "Task run failed with exception: ..." shows the repr: the whole sentence.
        return f"{type(self).__name__}({str(self)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Prefect and Dask pickle a task's exception: keep the four arguments, not OSError's.
        return (type(self), (self.operation, self.filename, self.errno, self.strerror))


class NoSpaceError(StorageOSError):
    """The volume is full (``ENOSPC``) or the user's quota is spent (``EDQUOT``)."""


class ReadOnlyStorageError(StorageOSError):
    """The volume is mounted read-only (``EROFS``), e.g. remounted so after a disk error."""


class StoragePermissionError(StorageOSError, AccessDeniedError):
    """The user may not do this to the path (``EACCES``, ``EPERM``)."""


#: The causes a user can fix, in the words rsync and git print (the C library's own strings,
#: fixed here so that a message reads the same whatever the platform or locale).
CAUSES: dict[int, tuple[type[StorageOSError], str]] = {
    errno.ENOSPC: (NoSpaceError, "No space left on device"),
    errno.EDQUOT: (NoSpaceError, "Disk quota exceeded"),
    errno.EROFS: (ReadOnlyStorageError, "Read-only file system"),
    errno.EACCES: (StoragePermissionError, "Permission denied"),
    errno.EPERM: (StoragePermissionError, "Operation not permitted"),
}


def storage_error_from_os(
    exc: OSError, operation: str, path: str | os.PathLike[str]
) -> StorageError:
    """The :class:`StorageError` that says what ``exc`` means for ``operation`` on ``path``.

    A missing file or folder is an :class:`ObjectNotFoundError` (for an input listed earlier:
    it vanished mid-run); the causes of :data:`CAUSES` have their own classes; anything else
    is a :class:`StorageOSError` with the operating system's own words.
    """
    if isinstance(exc, StorageError):
        return exc
    path = os.fspath(path)
    code = exc.errno
    if code == errno.ENOENT:
        return ObjectNotFoundError(f"cannot {operation} {path}: No such file or directory")
    if code in CAUSES:
        kind, cause = CAUSES[code]
        return kind(operation, path, code, cause)
    cause = exc.strerror or (os.strerror(code) if code else None) or type(exc).__name__
    return StorageOSError(operation, path, code or 0, cause)


@contextmanager
def os_errors_translated(operation: str, path: str | os.PathLike[str]) -> Iterator[None]:
    """Re-raise any :class:`OSError` of the block as :func:`storage_error_from_os` says.

    The one place where an OS error becomes a storage error: every local operation of every
    backend (a local folder, an object store's local downloads, the staging of shards) runs
    inside it, so a full disk reads the same whichever stage, file or thread hit it.
    """
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        raise storage_error_from_os(exc, operation, path) from exc

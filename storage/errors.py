"""The errors storage raises: every one is a :class:`StorageError`.

Messages name the URI involved and the failed operation, never a credential, so they can be
logged, shown in the Prefect UI or written to a report as they are.
"""

from __future__ import annotations


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

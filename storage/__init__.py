"""Every byte the pipeline reads or writes goes through here.

``open_storage(uri)`` is the only entry point: a local folder or an S3-compatible bucket, with
the same atomic writes, listings, completion markers and errors.
"""

from storage.core import Storage, open_storage
from storage.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    EndpointUnreachableError,
    ObjectNotFoundError,
    PathOutsideRootError,
    ShardReadError,
    StorageError,
)
from storage.local import LocalStorage

__all__ = [
    "AccessDeniedError",
    "BucketNotFoundError",
    "EndpointUnreachableError",
    "LocalStorage",
    "ObjectNotFoundError",
    "PathOutsideRootError",
    "ShardReadError",
    "Storage",
    "StorageError",
    "open_storage",
]

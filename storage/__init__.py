"""Every byte the pipeline reads or writes goes through here.

``open_storage(uri)`` (a folder) and ``open_file(uri)`` (one object) are the entry points: a
local folder or an S3-compatible bucket, with the same atomic writes, listings, completion
markers and errors. :mod:`storage.layout` names every key the pipeline writes.
"""

from storage.core import Storage
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
from storage.uri import join_uri, open_file, open_storage

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
    "join_uri",
    "open_file",
    "open_storage",
]

"""From a URI to a :class:`~storage.core.Storage`: the entry points of every stage.

``open_storage(uri)`` opens a folder-like root; ``open_file(uri)`` opens the folder holding one
object and returns the object's key beside it, so that no caller ever splits a URI by hand.
"""

from __future__ import annotations

from os import PathLike
from typing import Any

from storage.core import Storage
from storage.local import LocalStorage


def open_storage(
    uri: str | PathLike[str],
    *,
    endpoint_url: str | None = None,
    max_attempts: int | None = None,
    connect_timeout: float | None = None,
    read_timeout: float | None = None,
    multipart_threshold: int | None = None,
    client_kwargs: dict[str, Any] | None = None,
    deadline: float | None = None,
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
        connect_timeout: seconds to wait for a connection (``EXPLAIN_TRANSFER_S3_CONNECT_TIMEOUT``;
            by default 5, less for a deadline under 20 s).
        read_timeout: seconds to wait for data on an open connection
            (``EXPLAIN_TRANSFER_S3_READ_TIMEOUT``; by default 15, less for a short deadline).
        multipart_threshold: object size in bytes from which uploads are multipart (8 MiB).
        client_kwargs: extra keyword arguments for ``boto3.client("s3", ...)``.
        deadline: seconds one request may take, retries included (default 45, or
            ``EXPLAIN_TRANSFER_STORAGE_DEADLINE``; see :mod:`storage.s3`).

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
        return LocalStorage(text)
    scheme = scheme.lower()
    if scheme == "file":
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
            deadline=deadline,
        )
    raise ValueError(f"unsupported storage URI scheme {scheme!r} in {text!r}; use a path or s3://")


def open_file(uri: str | PathLike[str], **options: Any) -> tuple[Storage, str]:
    """Open the folder holding the object at ``uri``; return it with the object's key.

    ``open_file("s3://bucket/models/p/model.safetensors")`` is
    ``(open_storage("s3://bucket/models/p"), "model.safetensors")``.

    Args:
        uri: the URI of one object (a path, ``file://`` or ``s3://`` URI).
        options: passed to :func:`open_storage`.

    Raises:
        ValueError: ``uri`` names a folder (ends with ``/``) or a bucket, not an object.
    """
    text = str(uri)
    parent, _, name = text.rpartition("/")
    if not name or name in (".", "..") or parent.endswith(":/") or parent.endswith(":"):
        raise ValueError(f"{text!r} does not name a file")
    if text.startswith("/") and not parent:
        parent = "/"
    return open_storage(parent or ".", **options), name


def join_uri(root: str, *keys: str) -> str:
    """``root`` and relative ``keys`` joined with ``/`` (for URIs that do not exist yet)."""
    parts = [str(root).rstrip("/")] + [k.strip("/") for k in keys if k.strip("/")]
    return "/".join(parts)

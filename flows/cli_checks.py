"""Checks the command line makes before any compute, so a doomed run fails in seconds.

Each raises an expected error (see :mod:`flows.cli_errors`) with a one-line message and writes
nothing: the output location is reachable and writable, the Dask scheduler answers, and the
images are the size the model takes.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

from storage import open_storage

#: Seconds to wait for a TCP connection to a Dask scheduler.
SCHEDULER_TIMEOUT = 5.0


def check_output(uri: str) -> None:
    """The output root can be written: a reachable, permitted location that is not a file.

    Raises:
        StorageError: the bucket is missing, the credentials are refused, the endpoint does not
            answer, or a local path is a file or not writable.
        ValueError: the URI is not a supported storage URI.
    """
    open_storage(uri).check_writable()


def check_input(uri: str) -> None:
    """An input location can be reached (bucket, credentials, endpoint)."""
    open_storage(uri).check_readable()


def check_scheduler(address: str, timeout: float = SCHEDULER_TIMEOUT) -> None:
    """A Dask scheduler accepts TCP connections at ``address`` (``tcp://host:port``).

    Raises:
        ValueError: the address has no host or port.
        OSError: nothing accepts a connection there within ``timeout`` seconds.
    """
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ValueError(f"bad Dask scheduler address {address!r}: {exc}") from None
    if not host or not port:
        raise ValueError(f"bad Dask scheduler address {address!r}: expected tcp://host:port")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OSError(
            f"cannot reach the Dask scheduler at {address} within {timeout:g} s ({reason})"
        ) from None


def check_image_size(model_name: str, image_size: int) -> None:
    """The images are resized to the model's input size.

    Raises:
        ValueError: the model is unknown, or takes another image size.
    """
    from tasks.model import model_image_size

    expected = model_image_size(model_name)
    if image_size != expected:
        raise ValueError(
            f"image size {image_size} does not match model {model_name}, which takes "
            f"{expected}x{expected} images (set --image-size {expected})"
        )

"""A local folder as a :class:`~storage.core.Storage`.

Every operating-system error of an operation (a full disk, a read-only volume, a permission,
a file that vanished) is raised as the :mod:`storage.errors` class of its cause, naming the
path: :func:`storage.errors.os_errors_translated`.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from os import PathLike
from pathlib import Path
from typing import BinaryIO

from storage.core import Storage, check_prefix, normalise_key
from storage.errors import (
    ObjectNotFoundError,
    PathOutsideRootError,
    StorageError,
    os_errors_translated,
    storage_error_from_os,
)

logger = logging.getLogger(__name__)

# Partial files are dot-files with this suffix beside their final name; listings skip them.
_PARTIAL_SUFFIX = ".partial"


def _is_partial(name: str) -> bool:
    return name.startswith(".") and name.endswith(_PARTIAL_SUFFIX)


class LocalStorage(Storage):
    """Objects are files under a root folder; keys are their paths relative to it.

    Writes go to a temporary file in the destination folder, which is then renamed over the
    final name with :func:`os.replace` (atomic on POSIX within one file system), so readers
    never see a partial file. The root folder is created on the first write.

    Args:
        root: the root folder (created lazily).
    """

    def __init__(self, root: str | PathLike[str]) -> None:
        self.root = Path(os.path.abspath(os.path.expanduser(os.fspath(root))))
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        path = self.root / normalise_key(key)
        # Keys cannot contain "..", but a symlink inside the root could still lead outside.
        real_root = os.path.realpath(self.root)
        real_path = os.path.realpath(path)
        if os.path.commonpath([real_root, real_path]) != real_root:
            raise PathOutsideRootError(f"key {key!r} resolves outside the storage root {self.uri}")
        return path

    def child(self, prefix: str) -> LocalStorage:
        """A storage rooted at ``prefix`` under this one."""
        return LocalStorage(self.root / normalise_key(prefix))

    def url(self, key: str) -> str:
        """The absolute path of ``key``."""
        return str(self._path(key))

    def exists(self, key: str) -> bool:
        """Whether a file exists under ``key``."""
        path = self._path(key)
        # is_file() is False for a missing path; what it raises (a folder that may not be
        # searched) is a real failure, not a missing object.
        with os_errors_translated("check", path):
            return path.is_file()

    def size(self, key: str) -> int:
        """The size of the file in bytes."""
        path = self._path(key)
        with _translated("stat", path):
            return path.stat().st_size

    def read_bytes(self, key: str) -> bytes:
        """The whole file as bytes."""
        path = self._path(key)
        with _translated("read", path):
            _check_regular(path)
            return path.read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        """Publish ``data`` under ``key`` atomically."""
        path = self._path(key)

        def write(handle: BinaryIO) -> None:
            handle.write(data)

        _publish(path, write)
        logger.debug("wrote %d bytes to %s", len(data), path)

    def check_readable(self) -> None:
        """A local folder is always reachable; a missing one reads as empty."""

    def check_writable(self) -> None:
        """The root is a folder, or can be created as one, by this user; writes nothing.

        Raises:
            StorageError: the root or one of its parents is a file, or not writable.
        """
        path = self.root
        while not path.exists():
            path = path.parent
        if not path.is_dir():
            raise StorageError(f"cannot write under {self.uri}: {path} is a file, not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise StorageError(f"cannot write under {self.uri}: {path} is not writable")

    def open_read(self, key: str) -> BinaryIO:
        """The file opened for binary reading."""
        path = self._path(key)
        with _translated("open", path):
            _check_regular(path)
            return open(path, "rb")

    def upload_file(self, local_path: str | PathLike[str], key: str) -> None:
        """Copy a local file under ``key`` atomically."""
        path = self._path(key)
        source = Path(local_path)
        if not source.is_file():
            raise ObjectNotFoundError(f"cannot upload {source}: no such local file")

        _publish(path, lambda handle: _copy_from(source, handle))
        logger.debug("copied %s to %s", source, path)

    def download_file(self, key: str, local_path: str | PathLike[str]) -> None:
        """Copy the file to ``local_path`` atomically."""
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFoundError(f"no object at {path}")
        _publish(Path(os.path.abspath(local_path)), lambda handle: _copy_from(path, handle))

    @contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        """Yield the file itself (no copy): read it, do not modify it."""
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFoundError(f"no object at {path}")
        yield path

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys of the files whose key starts with ``prefix`` (string prefix, as S3).

        Only regular files (and symlinks, checked when read) are objects: a FIFO, socket or
        device would block or fail the first read, so it is left out and counted in a warning.
        """
        prefix = check_prefix(prefix)
        # Only the folder part of the prefix needs walking; the rest is a string filter.
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root / folder if folder else self.root
        if not start.is_dir():
            return []
        keys, special = [], []
        # os.walk skips a folder it cannot read without a word: a listing missing a class
        # folder would be a silent loss, so it fails instead (a folder removed meanwhile is
        # simply not listed, as on an object store).
        for dirpath, _dirnames, filenames in os.walk(start, onerror=_raise_unless_gone):
            relative_dir = os.path.relpath(dirpath, self.root)
            for name in filenames:
                if _is_partial(name):
                    continue
                key = name if relative_dir == "." else f"{relative_dir}/{name}".replace(os.sep, "/")
                if not key.startswith(prefix):
                    continue
                if _is_special(os.path.join(dirpath, name)):
                    special.append(key)
                    continue
                keys.append(key)
        if special:
            logger.warning(
                "skipped %d entries under %s that are not regular files (FIFO, socket or "
                "device), e.g. %r",
                len(special),
                start,
                special[0],
            )
        return sorted(keys)

    def delete(self, key: str) -> None:
        """Remove the file; a missing file is not an error."""
        path = self._path(key)
        try:
            with os_errors_translated("delete", path):
                path.unlink()
        except FileNotFoundError:
            pass


def _publish(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through ``write`` into a temporary sibling of ``path``, then rename it over ``path``.

    Whatever fails (the folder, the temporary file, a write, the rename) is raised as the
    storage error of its cause naming ``path``, and the temporary file is removed: nothing
    half-written is left under a name a reader lists.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except NotADirectoryError as exc:
        raise StorageError(f"cannot create {path}: a parent is a file") from exc
    except OSError as exc:
        raise storage_error_from_os(exc, "create", path.parent) from exc
    with os_errors_translated("write", path):
        fd, temp_name = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=_PARTIAL_SUFFIX
        )
        try:
            # mkstemp creates the file owner-only; published objects are meant to be shared.
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, "wb") as handle:
                write(handle)
                handle.flush()
                # Without fsync a crash after the rename could leave a renamed but empty file,
                # and a completion marker written next would vouch for it.
                os.fsync(handle.fileno())
            os.replace(temp_name, path)
        except BaseException:
            try:
                os.unlink(temp_name)
            except OSError:  # gone already, or the volume no longer takes even that
                pass
            raise


def _copy_from(source: Path, handle: BinaryIO) -> None:
    """Copy the file ``source`` into ``handle``; a failure to read names ``source``."""
    with os_errors_translated("read", source):
        reader = open(source, "rb")
    with reader:
        while True:
            with os_errors_translated("read", source):
                chunk = reader.read(1 << 20)
            if not chunk:
                return
            handle.write(chunk)


def _raise_unless_gone(exc: OSError) -> None:
    if not isinstance(exc, FileNotFoundError):
        raise storage_error_from_os(exc, "list", exc.filename or "?") from exc


def _is_special(path: str) -> bool:
    """Whether ``path`` is a FIFO, socket or device (following symlinks; a dangling one is not)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _check_regular(path: Path) -> None:
    # Opening a FIFO blocks until a writer appears; refuse before open().
    if _is_special(str(path)):
        raise StorageError(f"{path} is not a regular file (FIFO, socket or device)")


@contextmanager
def _translated(operation: str, path: Path) -> Iterator[None]:
    """:func:`~storage.errors.os_errors_translated`, with a folder where a file was expected
    (the key names a folder, or goes through a file) read as a missing object."""
    try:
        yield
    except (IsADirectoryError, NotADirectoryError) as exc:
        raise ObjectNotFoundError(f"no object at {path}") from exc
    except StorageError:
        raise
    except OSError as exc:
        raise storage_error_from_os(exc, operation, path) from exc

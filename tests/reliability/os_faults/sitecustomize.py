"""A volume that fails mid-run, for a command started by a test: faults at the OS boundary.

Python imports ``sitecustomize`` at startup from the first folder of ``sys.path`` that has one,
so a test puts this folder first on ``PYTHONPATH`` and the command under test runs unchanged,
its calls to the operating system failing the way a full, read-only or locked volume fails them.
The tests run as root, where ``chmod`` cannot take a permission away, and CI may not let them
mount a small tmpfs; so the faults are injected here instead, in the functions every write goes
through (``open``/``io.open`` for writing, ``os.open``, ``os.write``, ``os.mkdir``,
``os.replace``/``os.rename``, ``os.unlink``/``os.remove``/``os.rmdir``).

Configured by the environment (nothing happens without ``OS_FAULT_DIR``):

- ``OS_FAULT_DIR``: the folder that fails (the volume); paths outside it are never touched.
- ``OS_FAULT_ERRNO``: ``ENOSPC`` or ``EDQUOT`` (writing bytes and creating folders fail; files
  can still be created, renamed and removed, as on a full ext4), ``EROFS`` or ``EACCES`` (every
  change of the folder's contents fails: creating, writing, renaming, removing).
- ``OS_FAULT_AFTER``: the fault starts once a file whose path contains this text has been
  published under the folder by a rename (e.g. the first shard's completion marker), so that a
  run gets past planning and fails in the middle of labelling; empty: from the start.
- ``OS_FAULT_LOG``: a file outside the folder receiving one line per refused call (its time,
  the call, the path).

Errors are raised as the kernel's are: ``OSError(errno, strerror[, path])``, no path for a
write to an open file.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import threading
import time

_DIR = os.environ.get("OS_FAULT_DIR", "")
_CODE = getattr(errno, os.environ.get("OS_FAULT_ERRNO", "ENOSPC"))
_AFTER = os.environ.get("OS_FAULT_AFTER", "")
_LOG = os.environ.get("OS_FAULT_LOG", "")
_FULL = _CODE in (errno.ENOSPC, errno.EDQUOT)
_armed = threading.Event()
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _inside(path: object) -> bool:
    try:
        text = os.path.abspath(os.fsdecode(path))  # type: ignore[arg-type]
    except TypeError:
        return False
    return text == _DIR or text.startswith(_DIR + os.sep)


def _fd_inside(fd: int) -> bool:
    try:
        return _inside(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return False


def _refuse(what: str, path: object = None) -> None:
    if _LOG:
        with _real_open(_LOG, "a") as log:
            log.write(f"{time.time():.3f} {what} {path if path is not None else ''}\n")
    if path is None:
        raise OSError(_CODE, os.strerror(_CODE))
    raise OSError(_CODE, os.strerror(_CODE), os.fsdecode(path))  # type: ignore[arg-type]


class _FailingWrites:
    """A file opened for writing under the folder: its writes fail once the volume is full."""

    def __init__(self, file: io.IOBase) -> None:
        self._file = file

    def write(self, data: bytes | str) -> int:
        if _armed.is_set() and len(data):
            _refuse("write")
        return self._file.write(data)  # type: ignore[attr-defined]

    def writelines(self, lines: object) -> None:
        for line in lines:  # type: ignore[attr-defined]
            self.write(line)

    def __getattr__(self, name: str) -> object:
        return getattr(self._file, name)

    def __iter__(self) -> object:
        return iter(self._file)

    def __enter__(self) -> _FailingWrites:
        self._file.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._file.__exit__(*exc_info)


_real_open = io.open
_real_os_open = os.open
_real_write = os.write
_real_mkdir = os.mkdir
_real_replace = os.replace
_real_rename = os.rename
_real_unlink = os.unlink
_real_rmdir = os.rmdir


def _open(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
    writing = any(flag in mode for flag in "wax+")
    inside = writing and (_fd_inside(file) if isinstance(file, int) else _inside(file))
    if inside and _armed.is_set() and not _FULL and not isinstance(file, int):
        _refuse("open", file)
    handle = _real_open(file, mode, *args, **kwargs)
    return _FailingWrites(handle) if inside and _FULL else handle


def _os_open(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
    if flags & _WRITE_FLAGS and _armed.is_set() and not _FULL and _inside(path):
        _refuse("open", path)
    return _real_os_open(path, flags, *args, **kwargs)


def _os_write(fd, data):  # type: ignore[no-untyped-def]
    if _FULL and _armed.is_set() and len(data) and _fd_inside(fd):
        _refuse("write")
    return _real_write(fd, data)


def _mkdir(path, *args, **kwargs):  # type: ignore[no-untyped-def]
    # An existing folder is EEXIST first, as in the kernel (what makedirs(exist_ok) relies on).
    if _armed.is_set() and _inside(path) and not os.path.isdir(path):
        _refuse("mkdir", path)
    return _real_mkdir(path, *args, **kwargs)


def _publishing(real):  # type: ignore[no-untyped-def]
    def publish(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        if _armed.is_set() and not _FULL and (_inside(src) or _inside(dst)):
            _refuse("rename", dst)
        result = real(src, dst, *args, **kwargs)
        if _AFTER and _inside(dst) and _AFTER in os.fsdecode(dst):
            _armed.set()
        return result

    return publish


def _removing(real):  # type: ignore[no-untyped-def]
    def remove(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if _armed.is_set() and not _FULL and _inside(path):
            _refuse("remove", path)
        return real(path, *args, **kwargs)

    return remove


if _DIR:
    _DIR = os.path.abspath(_DIR)
    if not _AFTER:
        _armed.set()
    builtins.open = io.open = _open  # type: ignore[assignment]
    os.open = _os_open  # type: ignore[assignment]
    os.write = _os_write  # type: ignore[assignment]
    os.mkdir = _mkdir  # type: ignore[assignment]
    os.replace = _publishing(_real_replace)  # type: ignore[assignment]
    os.rename = _publishing(_real_rename)  # type: ignore[assignment]
    os.unlink = os.remove = _removing(_real_unlink)  # type: ignore[assignment]
    os.rmdir = _removing(_real_rmdir)  # type: ignore[assignment]

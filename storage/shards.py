"""WebDataset tar shards: writing, reading, completion and the manifest.

A shard is written locally with webdataset's own :class:`~webdataset.TarWriter`, published with
one upload, and only then marked complete; readers use :func:`complete_shards` and so never see
a shard a crash interrupted.

The local tars are built in a staging folder (:data:`STAGING_DIRNAME` under the temporary
folder) and named after the writing process; a writer sweeps the partial tars of processes that
no longer run (SIGKILLed workers) when it starts, so crashes leave no litter behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import re
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO

import pyarrow as pa

from storage.core import IO_WORKERS, Storage, map_concurrently
from storage.errors import ObjectNotFoundError, ShardReadError, os_errors_translated
from storage.layout import MANIFEST_FILE, shards_of

if TYPE_CHECKING:
    import webdataset

logger = logging.getLogger(__name__)

MANIFEST_KEY = MANIFEST_FILE
MANIFEST_SCHEMA = pa.schema(
    [
        ("name", pa.string()),
        ("samples", pa.int64()),
        ("bytes", pa.int64()),
        ("sha256", pa.string()),
    ]
)


#: The folder, under the temporary folder, where shards are built before their upload.
STAGING_DIRNAME = "explain-transfer-shards"
#: A partial tar older than this is swept even if its process id belongs to a live process
#: (process ids are reused).
STALE_PARTIAL_SECONDS = 24 * 3600

_PARTIAL_NAME = re.compile(r"^.+\.pid(\d+)\.[^.]+\.partial$")
_swept: set[str] = set()


def staging_dir(temp_dir: str | None = None) -> str:
    """The folder where shards are built: ``temp_dir``, else ``$TMPDIR/explain-transfer-shards``."""
    return temp_dir or os.path.join(tempfile.gettempdir(), STAGING_DIRNAME)


def sweep_stale_partials(folder: str, max_age: float = STALE_PARTIAL_SECONDS) -> list[str]:
    """Remove the partial tars that no running process will finish.

    A partial tar is stale when the process that wrote it no longer runs, or when it is older
    than ``max_age`` seconds. Files this module did not name are left alone.

    Args:
        folder: a staging folder (see :func:`staging_dir`).
        max_age: seconds after which a partial tar is stale whatever its process.

    Returns:
        The paths removed.
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    now = time.time()
    for entry in entries:
        match = _PARTIAL_NAME.match(entry.name)
        if match is None or not entry.is_file(follow_symlinks=False):
            continue
        try:
            old = now - entry.stat(follow_symlinks=False).st_mtime > max_age
            if old or not _process_alive(int(match.group(1))):
                os.unlink(entry.path)
                removed.append(entry.path)
        except FileNotFoundError:  # another writer swept it first
            continue
    if removed:
        logger.info("removed %d stale partial shard(s) from %s", len(removed), folder)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class ShardWriter:
    """Write one shard: samples go to a local temporary tar, published on a clean exit.

    On a clean exit the tar is uploaded to ``key``, then the completion marker
    ``_completions/{basename}.json`` is written with ``{"samples", "bytes", "sha256"}`` and the
    shard's keys at a glance: ``first_key``, ``last_key`` and ``keys_increasing`` (every key
    greater than the one before it). Those three let a reader of many shards prove their keys
    unique without reading a byte of them (shards whose key ranges do not overlap). If the block
    raises, nothing is uploaded and the temporary file is removed. A stale marker of the same
    shard is removed before the upload, so a marker always describes the object beside it.

    Args:
        storage: the dataset folder.
        key: the shard's key, usually :func:`shard_name`.
        temp_dir: where the local tar is built (when None, the staging folder
            :func:`staging_dir` under the system temporary folder); it must have room for one
            shard. Partial tars of dead writers found there are removed.
        fingerprint: the inputs the shard was made from, recorded in its marker so that
            :meth:`storage.Storage.is_done` can tell a shard of other inputs.

    Example:
        >>> with ShardWriter(storage, shard_name("dom", "train", 0)) as writer:
        ...     writer.write({"__key__": "000000", "png": png_bytes, "cls": 3})
    """

    def __init__(
        self,
        storage: Storage,
        key: str,
        temp_dir: str | None = None,
        fingerprint: str | None = None,
    ) -> None:
        self.storage = storage
        self.fingerprint = fingerprint
        self.temp_dir = temp_dir
        self.key = key
        self.name = posixpath.basename(key)
        self.samples = 0
        self.bytes: int | None = None
        self.sha256: str | None = None
        self.first_key: str | None = None
        self.last_key: str | None = None
        self.keys_increasing = True
        self._temp_path: str | None = None
        self._handle: BinaryIO | None = None
        self._tar: webdataset.TarWriter | None = None

    def __enter__(self) -> ShardWriter:
        folder = staging_dir(self.temp_dir)
        with os_errors_translated("write", folder):
            os.makedirs(folder, exist_ok=True)
            if folder not in _swept:
                # Once per process and folder: the partials of dead writers are never finished.
                sweep_stale_partials(folder)
                _swept.add(folder)
            fd, self._temp_path = tempfile.mkstemp(
                prefix=f"{self.name}.pid{os.getpid()}.", suffix=".partial", dir=folder
            )
            self._handle = os.fdopen(fd, "wb")
        # A fixed mtime makes the tar a function of its samples, so a rerun reproduces the sha256.
        # An integer one: a float mtime makes tarfile put a PAX header before every member
        # (1 KB and a third of the writer's CPU per member, for a time of 0).
        import webdataset  # imports torch: only where a shard is written

        self._tar = webdataset.TarWriter(self._handle, mtime=0)
        return self

    def write(self, sample: dict[str, Any]) -> None:
        """Append one sample (a dict with ``__key__``; ``cls`` may be an int)."""
        if self._tar is None:
            raise RuntimeError("ShardWriter.write called outside its `with` block")
        with os_errors_translated("write", self._temp_path or self.name):
            self._tar.write(sample)
        self.samples += 1
        key = str(sample["__key__"])
        # A dot in the base name moves the key/field split when the tar is read back, so such
        # a key may not read as written: make no promise about the shard's keys then.
        if "." in key.rsplit("/", 1)[-1] or (self.last_key is not None and not key > self.last_key):
            self.keys_increasing = False
        if self.first_key is None:
            self.first_key = key
        self.last_key = key

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._tar is not None and self._temp_path is not None
        try:
            # TarWriter.close also closes the file object it was given.
            with os_errors_translated("write", self._temp_path):
                self._tar.close()
            if exc_type is not None:
                logger.warning("shard %s abandoned after an error; nothing published", self.key)
                return
            self.bytes, self.sha256 = _size_and_sha256(self._temp_path)
            self.storage.clear_complete(self.name)
            self.storage.upload_file(self._temp_path, self.key)
            info: dict[str, Any] = {
                "samples": self.samples,
                "bytes": self.bytes,
                "sha256": self.sha256,
            }
            if self.samples:
                info.update(
                    first_key=self.first_key,
                    last_key=self.last_key,
                    keys_increasing=self.keys_increasing,
                )
            if self.fingerprint is not None:
                info["fingerprint"] = self.fingerprint
            self.storage.mark_complete(self.name, info)
            logger.info("published shard %s (%d samples)", self.storage.url(self.key), self.samples)
        finally:
            os.unlink(self._temp_path)
            self._tar = None


def read_shard(storage: Storage, key: str) -> Iterator[dict[str, Any]]:
    """Stream the samples of one shard.

    Fields are raw bytes as stored, except ``cls``, decoded to ``int``. A member that is not a
    regular file (a symlink, a hard link, a device) contributes no field; its field name is
    listed in the sample's ``__skipped__``. The tar is read strictly: a member header that is
    cut short, damaged or missing before the end-of-archive block raises, where Python's
    ``tarfile`` (and so plain webdataset) would end the archive there without a word and lose
    every sample after it. When the shard has a completion marker, the bytes read are checked
    against its size and sha256 and the samples read against its sample count.

    Args:
        storage: the dataset folder.
        key: the shard's key.

    Yields:
        One dict per sample, with ``__key__``.

    Raises:
        ObjectNotFoundError: no shard under ``key``.
        ShardReadError: the tar is truncated or corrupt, or differs from its marker.
    """
    url = storage.url(key)
    name = posixpath.basename(key)
    try:  # one request, where asking first whether the marker exists would make two
        expected: dict[str, Any] | None = storage.completion_info(name)
    except FileNotFoundError:
        expected = None
    from webdataset.tariterators import group_by_keys  # imports torch: only where one is read

    samples = 0
    with storage.open_read(key) as stream:
        reader = _HashingReader(stream)
        try:
            for sample in group_by_keys(_tar_members(reader, url)):
                samples += 1
                yield _decode(sample)
            reader.drain()
        except (tarfile.TarError, EOFError, ValueError) as exc:
            # webdataset appends the stream and URL to the args; the first one is the reason.
            reason = exc.args[0] if exc.args else type(exc).__name__
            raise ShardReadError(f"shard {url} is truncated or corrupt: {reason}") from exc
    if expected is not None:
        if reader.size != expected.get("bytes") or reader.sha256() != expected.get("sha256"):
            raise ShardReadError(
                f"shard {url} does not match its completion marker: read {reader.size} bytes "
                f"(sha256 {reader.sha256()[:12]}), marker says {expected.get('bytes')} bytes "
                f"(sha256 {str(expected.get('sha256'))[:12]})"
            )
        if isinstance(expected.get("samples"), int) and samples != expected["samples"]:
            raise ShardReadError(
                f"shard {url} holds {samples} samples, its completion marker says "
                f"{expected['samples']}"
            )


def complete_shards(storage: Storage, name: str, split: str) -> list[str]:
    """Sorted keys of the shards of ``name``/``split`` that carry a completion marker.

    These, and only these, are what a reader may use.
    """
    return shards_of(storage.completed(), name, split)


def write_manifest(
    storage: Storage,
    shard_keys: Iterable[str],
    infos: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    workers: int = IO_WORKERS,
) -> pa.Table:
    """Write ``manifest.parquet``: one row per shard, from the shards' completion markers.

    The markers are read concurrently (one request per shard, ``workers`` at a time), and not
    at all for the shards whose marker the caller already read (``infos``).

    Args:
        storage: the dataset folder.
        shard_keys: the shards to list (each must be complete).
        infos: marker infos already read, by shard name.
        workers: marker reads in flight at once.

    Returns:
        The table written.

    Raises:
        ObjectNotFoundError: a shard has no completion marker.
    """
    names = [posixpath.basename(key) for key in sorted(shard_keys)]
    known = dict(infos or {})
    unread = [name for name in names if name not in known]

    def read(name: str) -> dict[str, Any]:
        try:
            return storage.completion_info(name)
        except FileNotFoundError:
            raise ObjectNotFoundError(
                f"shard {storage.url(name)} has no completion marker"
            ) from None

    known.update(zip(unread, map_concurrently(read, unread, workers=workers), strict=True))
    rows: dict[str, list[Any]] = {field: [] for field in MANIFEST_SCHEMA.names}
    for name in names:
        info = known[name]
        rows["name"].append(name)
        rows["samples"].append(int(info["samples"]))
        rows["bytes"].append(int(info["bytes"]))
        rows["sha256"].append(str(info["sha256"]))
    table = pa.table(rows, schema=MANIFEST_SCHEMA)
    storage.write_parquet(MANIFEST_KEY, table)
    return table


def read_manifest(storage: Storage) -> pa.Table:
    """Read ``manifest.parquet`` (columns name, samples, bytes, sha256)."""
    return storage.read_parquet(MANIFEST_KEY)


# webdataset's own rule for members that are archive metadata, not sample fields.
_META_MEMBER = re.compile(r"__[^/]*__($|/)")


class _StrictTarInfo(tarfile.TarInfo):
    """A header reader that tells a damaged or missing header from the end of the archive.

    ``tarfile`` ends iteration silently when a header after the first one is cut short,
    missing (the data stops at a member boundary) or fails its checksum: a truncated shard then
    reads as a shorter, valid one. Only an all-zero block is the end of an archive here.
    """

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        offset = tarfile_.offset
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.HeaderError as exc:
            raise tarfile.ReadError(
                f"member header at byte {offset} is missing, cut short or damaged ({exc})"
            ) from None


def _tar_members(stream: Any, url: str) -> Iterator[dict[str, Any]]:
    """``{"fname", "data", "__url__"}`` per member, as webdataset's tar iterator yields them.

    ``data`` is ``None`` for a member that is not a regular file; directories are left out.
    """
    with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictTarInfo) as tar:
        for info in tar:
            if info.isdir() or _META_MEMBER.match(info.name):
                continue
            handle = tar.extractfile(info) if info.isreg() else None
            data = handle.read() if handle is not None else None
            yield {"fname": info.name, "data": data, "__url__": url}
            tar.members = []


def _decode(sample: dict[str, Any]) -> dict[str, Any]:
    decoded = {
        k: v
        for k, v in sample.items()
        if (not k.startswith("__") or k == "__key__") and v is not None
    }
    skipped = [k for k, v in sample.items() if v is None]
    if skipped:
        decoded["__skipped__"] = skipped
    if "cls" in decoded:
        decoded["cls"] = int(decoded["cls"].decode("utf-8").strip())
    return decoded


def _size_and_sha256(path: str) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


class _HashingReader:
    """A read-only stream wrapper counting and hashing every byte that passes through."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._digest = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._digest.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        """Read what the tar reader left (end-of-archive padding) so the hash covers it all."""
        while self.read(1 << 20):
            pass

    def sha256(self) -> str:
        return self._digest.hexdigest()

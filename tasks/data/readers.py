"""Readers: one per input kind (ImageNet-style folders, WebDataset shards), used by every stage.

(About 700 lines: the two readers share the key rules, the image normalisation and the sample
checks that make their outputs interchangeable; apart they would drift, as they once did.)

Every reader yields WebDataset sample dicts (``__key__``, ``jpg`` or ``png``, ``cls``, extra
fields) and reads only through :mod:`storage`, so a local folder and an ``s3://`` prefix behave
the same. Nothing here crashes on a bad input: a file or sample that cannot be used is skipped and
recorded, with a short reason, in a :class:`~tasks.data.quarantine.QuarantineReport`; a file in
another format is converted to PNG and the conversion is recorded. Readers yield in a
deterministic order (sorted listings), which is what makes sharded stages reproducible.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import json
import logging
import numbers
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from typing import Any

from storage import Storage, StorageError, layout, open_file, open_storage
from storage.core import IO_WORKERS, is_transient, map_concurrently
from storage.shards import read_shard
from tasks.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_FIELDS,
    BadImageError,
    device_decodable,
    encode_png,
    open_image,
    sniff_format,
    to_rgb,
)
from tasks.data.quarantine import QuarantineReport

logger = logging.getLogger(__name__)

CLASS_NAMES_KEY = layout.CLASS_NAMES_FILE


IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
    ".pbm",
)


# JPEG colour models that decoders disagree on (Adobe's inverted CMYK in particular): these are
# stored as the RGB PNG our own decoder produces, so every reader sees the same pixels.
_CONVERTED_JPEG_MODES = ("CMYK", "YCCK")


_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")

# Sample fields that may hold the image in WebDataset input: the extensions above, without dot.
_INPUT_IMAGE_FIELDS = tuple(ext[1:] for ext in IMAGE_EXTENSIONS)


StorageLike = Storage | str | PathLike[str]


def _as_storage(storage: StorageLike) -> Storage:
    return storage if isinstance(storage, Storage) else open_storage(storage)


def sanitise_key(relative_path: str) -> str:
    """A WebDataset-safe sample key from a file's relative path.

    The extension is dropped, ``..``/``.``/empty segments and any leading ``/`` are removed,
    characters outside ``[A-Za-z0-9_.-]`` become ``_``, and dots in the file's stem become ``_``
    (WebDataset splits a key from its field at the first dot of the base name).

    Args:
        relative_path: e.g. ``"n01440764/n01440764_10026.JPEG"``.

    Returns:
        e.g. ``"n01440764/n01440764_10026"``.
    """
    parts = [p for p in relative_path.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    if not parts:
        return "_"
    *folders, filename = parts
    stem = filename.rsplit(".", 1)[0] if "." in filename.lstrip(".") else filename
    clean_folders = [_UNSAFE_KEY_CHARS.sub("_", folder) for folder in folders]
    clean_stem = _UNSAFE_KEY_CHARS.sub("_", stem).replace(".", "_") or "_"
    return "/".join([*clean_folders, clean_stem])


def key_problem(key: object) -> str | None:
    """Why ``key`` cannot be a sample key in a shard, or ``None`` if it can."""
    if not isinstance(key, str) or not key:
        return "bad key: empty or not a string"
    if key.startswith("/") or "://" in key or "\\" in key or "\x00" in key:
        return f"bad key: {key!r} is absolute or not a plain relative path"
    segments = key.split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        return f"bad key: {key!r} has an empty, '.' or '..' segment"
    if "." in segments[-1]:
        return f"bad key: {key!r} has a '.' in its base name"
    return None


@dataclass(frozen=True)
class ImageFolderListing:
    """The classes and image files of an ImageNet-style folder.

    Attributes:
        wnids: class folder names, sorted; the class id is the position.
        class_names: readable names in class-id order (the folder name when none is known).
        files: ``(path, class_id)`` of every file with an image extension, sorted by path.
        ignored: paths of files without an image extension or outside a class folder.
        skipped: ``(path, reason)`` of image files that cannot be listed, e.g. a name that is
            not valid UTF-8 (which no key, manifest or S3 object name can hold); the path is
            shown with the bad bytes escaped.
        keys: the sample key of each file, in ``files`` order: :func:`sanitise_key` of its path,
            made unique over the whole listing (``a b.png`` and ``a_b.jpg`` would both give
            ``a_b``; the later one in sorted order gets ``a_b_2``), so the key of a file does
            not depend on which part of the listing is read.
    """

    wnids: tuple[str, ...]
    class_names: tuple[str, ...]
    files: tuple[tuple[str, int], ...]
    ignored: tuple[str, ...]
    keys: tuple[str, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()

    @property
    def renamed(self) -> int:
        """How many files got a key other than their sanitised path (to stay unique)."""
        return sum(
            key != sanitise_key(path) for key, (path, _) in zip(self.keys, self.files, strict=True)
        )


def list_image_folder(
    root: StorageLike,
    *,
    class_names_file: str | PathLike[str] | None = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> ImageFolderListing:
    """List an ImageNet-style folder: one sub-folder per class, files inside.

    Class ids follow the sorted folder names (wnids). Hidden files and folders are ignored; files
    nested deeper belong to their top-level folder. A folder without any file that has an image
    extension is not a class.

    Args:
        root: the folder (path, URI or storage).
        class_names_file: path or URI of a file mapping wnid to readable name: text lines
            ``"n01440764 tench, Tinca tinca"`` (the first comma-separated name is used) or JSON
            (``{"n01440764": "tench"}``, or a list of names in class-id order).
        extensions: accepted file extensions (case-insensitive).

    Returns:
        The listing.
    """
    storage = _as_storage(root)
    accepted = tuple(ext.lower() for ext in extensions)
    by_class: dict[str, list[str]] = {}
    ignored = []
    skipped = []
    for key in storage.list():
        parts = key.split("/")
        if any(part.startswith(".") for part in parts):
            continue
        if len(parts) < 2 or not key.lower().endswith(accepted):
            ignored.append(key)
            continue
        if not _is_utf8(key):
            skipped.append((_printable(key), "bad file name: not valid UTF-8"))
            continue
        by_class.setdefault(parts[0], []).append(key)
    if skipped:
        logger.warning(
            "image folder %s: %d files skipped, e.g. %s (%s)",
            storage.uri,
            len(skipped),
            *skipped[0],
        )
    wnids = tuple(sorted(by_class))
    files = tuple(
        (key, class_id) for class_id, wnid in enumerate(wnids) for key in sorted(by_class[wnid])
    )
    names = _read_class_names_file(class_names_file, wnids) if class_names_file else wnids
    used: set[str] = set()
    keys = tuple(_unique_key(sanitise_key(path), used) for path, _ in files)
    return ImageFolderListing(
        wnids=wnids,
        class_names=tuple(names),
        files=files,
        ignored=tuple(_printable(path) for path in ignored),
        keys=keys,
        skipped=tuple(skipped),
    )


def _is_utf8(name: str) -> bool:
    # A local file name that is not UTF-8 arrives with surrogate escapes (PEP 383).
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(name: str) -> str:
    """``name`` with the bytes of a non-UTF-8 file name shown as ``\\xe9`` escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def image_folder_classes(
    root: StorageLike,
    *,
    class_names_file: str | PathLike[str] | None = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> list[str]:
    """Readable class names of an ImageNet-style folder, in class-id order.

    See :func:`list_image_folder` for the arguments.
    """
    listing = list_image_folder(root, class_names_file=class_names_file, extensions=extensions)
    return list(listing.class_names)


def _read_class_names_file(uri: str | PathLike[str], wnids: Sequence[str]) -> list[str]:
    text = str(uri)
    storage, key = open_file(text)
    raw = storage.read_bytes(key).decode("utf-8-sig")
    mapping: dict[str, str] = {}
    if raw.lstrip().startswith(("{", "[")):
        data = json.loads(raw)
        if isinstance(data, list):
            if len(data) != len(wnids):
                raise ValueError(
                    f"class names file {text} lists {len(data)} names for {len(wnids)} classes"
                )
            mapping = {wnid: str(item) for wnid, item in zip(wnids, data, strict=True)}
        else:
            for wnid, value in data.items():
                item = value[0] if isinstance(value, list) and value else value
                mapping[str(wnid)] = str(item)
    else:
        for line in raw.splitlines():
            wnid, _, rest = line.strip().partition(" ")
            if wnid and rest.strip():
                mapping[wnid] = rest.split(",")[0].strip()
    missing = [wnid for wnid in wnids if wnid not in mapping]
    if missing:
        logger.warning(
            "class names file %s has no name for %d classes (e.g. %s); using folder names",
            text,
            len(missing),
            missing[0],
        )
    return [mapping.get(wnid, wnid) for wnid in wnids]


def iter_image_folder(
    root: StorageLike,
    *,
    class_names_file: str | PathLike[str] | None = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    report: QuarantineReport | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[dict[str, Any]]:
    """Yield the images of an ImageNet-style folder as sample dicts, in sorted key order.

    JPEG and PNG files keep their original bytes (under ``jpg`` or ``png`` by their real format,
    whatever the extension says); CMYK/YCCK JPEGs and other formats (BMP, WebP, GIF, TIFF ...)
    are stored as RGB PNG and the conversion is recorded. Files that cannot be decoded are
    quarantined with a reason (``"zero-byte file"``, ``"not an image"``,
    ``"truncated/corrupt: ..."``, ``"too large: WxH"``, ``"unreadable: ..."``).

    Args:
        root: the folder (path, URI or storage).
        class_names_file: see :func:`list_image_folder`; read up front so a bad file fails fast.
        extensions: accepted file extensions.
        report: collects quarantined and converted files and the counts; a new one if omitted.
        max_pixels: largest accepted width * height.

    Yields:
        ``{"__key__": sanitised relative path, "jpg" | "png": bytes, "cls": int}``.
    """
    storage = _as_storage(root)
    report = report if report is not None else QuarantineReport()
    listing = list_image_folder(storage, class_names_file=class_names_file, extensions=extensions)
    logger.info(
        "image folder %s: %d classes, %d image files, %d other files",
        storage.uri,
        len(listing.wnids),
        len(listing.files),
        len(listing.ignored),
    )
    report.count("ignored", len(listing.ignored))
    report.count("renamed", listing.renamed)
    for path, reason in listing.skipped:
        report.quarantine(path, reason, stage="list")
    for (path, class_id), key in zip(listing.files, listing.keys, strict=True):
        sample = read_image_file(storage, path, key, class_id, report, max_pixels=max_pixels)
        if sample is not None:
            yield sample


def read_image_file(
    storage: Storage,
    path: str,
    key: str,
    class_id: int,
    report: QuarantineReport,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    check_pixels: bool = True,
) -> dict[str, Any] | None:
    """Read one image file of a listing as a sample, or quarantine it and return None.

    Args:
        storage: the folder.
        path: the file's key in ``storage``.
        key: its sample key (:attr:`ImageFolderListing.keys`).
        class_id: its label.
        report: receives the read, the conversion or the quarantine.
        max_pixels: largest accepted width * height.
        check_pixels: decode the image to check it (the default). False, for a reader whose
            consumer decodes every image itself (the labeller): a
            YCbCr or grayscale JPEG is checked by its header only and kept, so a body that
            does not decode is the consumer's to quarantine; other images are checked in full.
    """
    report.count("read")
    try:
        data = storage.read_bytes(path)
    except (StorageError, OSError) as exc:
        if is_transient(exc):
            # A 5xx or a dropped connection says nothing about the file: quarantining it would
            # lose it for good and shift every later position. The unit of work fails instead,
            # and its retry reads the file again.
            raise
        # StorageError covers a symlink that leads outside the input root.
        report.quarantine(path, f"unreadable: {exc}", stage="read")
        return None
    try:
        if not check_pixels and device_decodable(data, max_pixels=max_pixels):
            field_name, payload = "jpg", data
        else:
            field_name, payload = _stored_image(data, key, path, report, max_pixels)
    except BadImageError as exc:
        report.quarantine(path, exc.reason, stage="read")
        return None
    report.count("yielded")
    return {"__key__": key, field_name: payload, "cls": class_id}


def _unique_key(key: str, used: set[str]) -> str:
    # Two files can sanitise to the same key ("a b.jpg", "a_b.png"), and WebDataset input can
    # repeat a key; the sorted listing makes the suffix a rerun picks the same.
    candidate, n = key, 1
    while candidate in used:
        n += 1
        candidate = f"{key}_{n}"
    if candidate != key:
        logger.info("key %s already used; renamed to %s", key, candidate)
    used.add(candidate)
    return candidate


def image_for_storage(
    data: bytes,
    key: str,
    *,
    report: QuarantineReport | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[str, bytes]:
    """The field and bytes under which an encoded image is stored in a shard.

    JPEG and PNG keep their original bytes (under their real format); CMYK/YCCK JPEGs and other
    formats become an RGB PNG, recorded in ``report``.

    Args:
        data: the file's bytes.
        key: the sample key (for the report).
        report: receives the conversion, if any.
        max_pixels: largest accepted width * height.

    Returns:
        ``("jpg" | "png", bytes)``.

    Raises:
        BadImageError: the bytes are not a usable image.
    """
    report = report if report is not None else QuarantineReport()
    return _stored_image(data, key, key, report, max_pixels)


def _stored_image(
    data: bytes, key: str, path: str, report: QuarantineReport, max_pixels: int
) -> tuple[str, bytes]:
    """The field and bytes to store for a file: original JPEG/PNG bytes, or a PNG conversion."""
    img = open_image(data, max_pixels=max_pixels)
    try:
        rgb = to_rgb(img)
    except Exception as exc:  # any failure of an unusual mode means the file is unusable
        raise BadImageError(f"truncated/corrupt: cannot convert mode {img.mode}") from exc
    real = sniff_format(data)
    if real in ("jpg", "png") and not (real == "jpg" and img.mode in _CONVERTED_JPEG_MODES):
        return real, data
    source = f"{(img.format or 'unknown').lower()} {img.mode}"
    report.convert(key, source, "png RGB")
    logger.debug("converted %s (%s) to PNG", path, source)
    return "png", encode_png(rgb)


def webdataset_key_renames(
    storage: Storage,
    shards: Sequence[str],
    report: QuarantineReport | None = None,
    *,
    infos: Mapping[str, Mapping[str, Any]] | None = None,
    workers: int = IO_WORKERS,
) -> dict[str, str]:
    """New keys for the samples of WebDataset input whose key was already used before them.

    Keys are made unique over the whole listing, in shard order then sample order, the way
    :func:`list_image_folder` does for files: the second ``k`` becomes ``k_2``. Two samples
    with one key would otherwise be merged by webdataset's reader into one sample (when
    adjacent: ``duplicate file name in tar file``) or be two samples nobody can tell apart.

    Only the shards that could hold a repeated key are read, for their keys (the images are not
    decoded), concurrently. A shard written by :class:`~storage.shards.ShardWriter` records its
    first and last key and whether its keys increase; shards whose key ranges overlap no other
    shard's cannot repeat a key, so an export of a sorted listing is not read at all. The
    others (ranges that overlap, keys out of order, markers from another writer) are read, and
    so is any shard whose range holds a key of those (original or renamed), until none does:
    the result is the one a read of every shard would give. A shard that cannot be read is left
    out here and quarantined when its samples are read; a transient storage error is raised.

    Args:
        storage: the input folder.
        shards: its complete shards, in listing order.
        report: receives the ``renamed`` count.
        infos: the shards' completion marker infos, when already read (else read here).
        workers: shards (or markers) read at once.

    Returns:
        ``{"{shard}@{position}": new_key}`` for the renamed samples only (usually empty).
    """
    if infos is None:
        infos = dict(zip(shards, storage.completion_infos(shards, workers=workers), strict=True))
    ranges = {shard: _key_range(infos.get(shard, {})) for shard in shards}
    suspects = {shard for shard, found in ranges.items() if found is None}
    suspects |= _overlapping({s: r for s, r in ranges.items() if r not in (None, ())})
    keys_of: dict[str, list[str]] = {}
    while True:
        unread = [shard for shard in shards if shard in suspects and shard not in keys_of]
        keys_of.update(
            zip(
                unread,
                map_concurrently(lambda s: _shard_keys(storage, s), unread, workers=workers),
                strict=True,
            )
        )
        used: set[str] = set()
        renames: dict[str, str] = {}
        for shard in shards:
            for position, key in enumerate(keys_of.get(shard, ())):
                unique = _unique_key(key, used)
                if unique != key:
                    renames[f"{shard}@{position}"] = unique
        # A key of the shards read that falls inside an unread shard's range could equal one of
        # that shard's keys: read that one too and decide again.
        unread_ranges = sorted(
            (found[0], found[1], shard)
            for shard, found in ranges.items()
            if shard not in suspects and found not in (None, ())
        )
        firsts = [first for first, _, _ in unread_ranges]
        hits = set()
        for key in used:
            index = bisect.bisect_right(firsts, key) - 1
            if index >= 0 and key <= unread_ranges[index][1]:
                hits.add(unread_ranges[index][2])
        if not hits:
            break
        suspects |= hits
    logger.info(
        "input keys: %d of %d shards read to check uniqueness, %d keys renamed",
        len(keys_of),
        len(shards),
        len(renames),
    )
    if report is not None:
        report.count("renamed", len(renames))
    return renames


def _key_range(info: Mapping[str, Any]) -> tuple[str, str] | tuple[()] | None:
    """``(first, last)`` key of a shard whose marker promises increasing keys, ``()`` for an
    empty shard, ``None`` when the marker does not tell."""
    if info.get("samples") == 0:
        return ()
    first, last = info.get("first_key"), info.get("last_key")
    if info.get("keys_increasing") is True and isinstance(first, str) and isinstance(last, str):
        return (first, last)
    return None


def _overlapping(ranges: Mapping[str, tuple[str, str]]) -> set[str]:
    """The shards whose closed key range ``[first, last]`` meets another shard's."""
    overlapping: set[str] = set()
    cluster: list[str] = []
    cluster_last = ""
    for first, last, shard in sorted((r[0], r[1], s) for s, r in ranges.items()):
        if cluster and first <= cluster_last:
            cluster.append(shard)
            cluster_last = max(cluster_last, last)
            continue
        if len(cluster) > 1:
            overlapping.update(cluster)
        cluster, cluster_last = [shard], last
    if len(cluster) > 1:
        overlapping.update(cluster)
    return overlapping


def _shard_keys(storage: Storage, shard: str) -> list[str]:
    """The sample keys of one shard, in order; none when the shard cannot be read."""
    try:
        return [str(sample.get("__key__")) for sample in read_shard(storage, shard)]
    except StorageError as exc:
        if is_transient(exc):
            raise
        logger.warning("input shard %s unreadable while listing keys: %s", shard, exc)
        return []


def iter_webdataset(
    storage_uri: StorageLike,
    name: str | None = None,
    split: str | None = None,
    *,
    report: QuarantineReport | None = None,
    validate: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[dict[str, Any]]:
    """Yield the samples of the complete shards of a dataset folder, in shard order.

    Only shards with a completion marker are read. A shard that turns out truncated, corrupt or
    different from its marker is reported (``bad_shards``) and contributes *no* sample, not even
    those before the damage: a shard is the unit of completion, so a reader sees all of it or
    none of it and counts never depend on where the damage sits. To allow that, each shard is
    read whole before its samples are yielded (memory: one shard).

    Args:
        storage_uri: the dataset folder (path, URI or storage).
        name: dataset name of the shards to read; all names if ``None``.
        split: split to read; all splits if ``None``.
        report: collects skipped samples and shards; a new one if omitted.
        validate: decode every image (and check ``cls``) before yielding it; samples that fail
            are quarantined. Without it, only the presence of an image field and ``cls`` is
            checked.
        max_pixels: largest accepted width * height when validating.

    Yields:
        Sample dicts with raw bytes per field and ``cls`` as ``int``.
    """
    storage = _as_storage(storage_uri)
    report = report if report is not None else QuarantineReport()
    for key in _complete_shards(storage, name, split):
        yield from read_shard_samples(
            storage, key, report, validate=validate, max_pixels=max_pixels
        )


def read_shard_samples(
    storage: Storage,
    shard: str,
    report: QuarantineReport,
    *,
    start: int = 0,
    stop: int | None = None,
    validate: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    renames: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """The usable samples ``[start, stop)`` of one complete shard; bad ones quarantined.

    The shard is read whole first: one that turns out truncated, corrupt or different from its
    marker is reported (``bad_shards``) and gives no sample at all, not even those before the
    damage, so counts never depend on where the damage sits. An image stored under another
    image extension (``jpeg``, ``webp``, ``bmp`` ...) is accepted like a file of an image
    folder: JPEG and PNG bytes are kept (under ``jpg``/``png``), other formats become PNG.

    Args:
        storage: the dataset folder.
        shard: the shard's key.
        report: receives reads, quarantined samples and bad shards.
        start: first sample position in the shard.
        stop: one past the last position (None: the end).
        validate: decode every image (and check ``cls``); without it only the key, an image
            field and the label are checked.
        max_pixels: largest accepted width * height when validating.
        renames: new keys by ``"{shard}@{position}"`` (:func:`webdataset_key_renames`).
    """
    try:
        samples = list(read_shard(storage, shard))
    except StorageError as exc:
        if is_transient(exc):
            # Not the shard's fault: the unit of work fails and its retry reads it again,
            # where quarantining it would drop all its samples for good.
            raise
        report.count("bad_shards")
        report.quarantine(shard, f"bad shard: {exc}", stage="read")
        return []
    usable = []
    for position, sample in enumerate(samples[start:stop], start=start):
        report.count("read")
        if renames and f"{shard}@{position}" in renames:
            sample["__key__"] = renames[f"{shard}@{position}"]
        problem = _usable_problem(sample, report, validate, max_pixels)
        if problem is not None:
            report.quarantine(f"{shard}:{sample.get('__key__')}", problem, stage="read")
            continue
        report.count("yielded")
        usable.append(sample)
    return usable


def read_shard_head(
    storage: Storage,
    shard: str,
    start: int,
    stop: int,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[dict[str, Any]]:
    """The usable samples at positions ``[start, stop)`` of a shard, reading only that far.

    For a look at a few samples of many shards (the dataset mean): the stream is closed after
    position ``stop - 1``, so a sample at the head of a shard costs a fraction of the shard.
    Unlike :func:`read_shard_samples` nothing is checked against the marker (the shard is not
    read to its end) and nothing is reported: an unusable sample is left out, a shard that
    cannot be read gives none (logged). A transient storage error is raised.
    """
    usable = []
    report = QuarantineReport()
    try:
        # Closed on leaving: the rest of the shard is never fetched.
        with contextlib.closing(read_shard(storage, shard)) as samples:
            for sample in itertools.islice(samples, start, stop):
                if _usable_problem(sample, report, False, max_pixels) is None:
                    usable.append(sample)
    except StorageError as exc:
        if is_transient(exc):
            raise
        logger.warning("input shard %s unreadable while sampling it: %s", shard, exc)
    return usable


def _usable_problem(
    sample: dict[str, Any], report: QuarantineReport, validate: bool, max_pixels: int
) -> str | None:
    """Why a WebDataset input sample cannot be used (its image normalised in place), or None."""
    problem = key_problem(sample.get("__key__"))
    if problem is None:
        problem = _image_field_problem(sample, report, max_pixels)
    if problem is None:
        problem = _sample_problem(sample, None, validate, max_pixels)
    return problem


def _image_field_problem(
    sample: dict[str, Any], report: QuarantineReport, max_pixels: int
) -> str | None:
    """Store an image found under another image extension as ``jpg``/``png``, in place.

    Returns:
        Why the sample's image cannot be used, or ``None``.
    """
    fields = [f for f in _INPUT_IMAGE_FIELDS if isinstance(sample.get(f), bytes | bytearray)]
    if len(fields) != 1:
        skipped = sample.get("__skipped__")
        detail = f" (members not regular files: {', '.join(skipped)})" if skipped else ""
        return f"no single image field: found {fields or 'none'}{detail}"
    if fields[0] in IMAGE_FIELDS:
        return None
    data = bytes(sample.pop(fields[0]))
    key = str(sample.get("__key__"))
    try:
        field_name, payload = _stored_image(data, key, key, report, max_pixels)
    except BadImageError as exc:
        return exc.reason
    sample[field_name] = payload
    return None


def _complete_shards(storage: Storage, name: str | None, split: str | None) -> list[str]:
    return layout.shards_of(storage.completed(), name, split)


def _sample_problem(
    sample: Mapping[str, Any], num_classes: int | None, decode: bool, max_pixels: int
) -> str | None:
    """Why a sample cannot be stored or used, or ``None``."""
    problem = key_problem(sample.get("__key__"))
    if problem is not None:
        return problem
    fields = [f for f in IMAGE_FIELDS if isinstance(sample.get(f), bytes | bytearray)]
    if len(fields) != 1:
        return f"no single image field: found {fields or 'none'} among {IMAGE_FIELDS}"
    label = sample.get("cls")
    if label is None:
        return "missing label"
    if isinstance(label, bool) or not isinstance(label, numbers.Integral):
        return f"bad label: {label!r} is not an int"
    if label < 0 or (num_classes is not None and label >= num_classes):
        return f"label out of range: {label} not in [0, {num_classes})"
    if decode:
        try:
            to_rgb(open_image(bytes(sample[fields[0]]), max_pixels=max_pixels))
        except BadImageError as exc:
            return exc.reason
        except Exception as exc:  # an unusual mode that cannot convert is a corrupt file
            return f"truncated/corrupt: {exc}"
    return None


def read_class_names(storage: StorageLike) -> list[str]:
    """The class names stored by :func:`write_class_names` (a plain JSON list is accepted too)."""
    data = _as_storage(storage).read_json(CLASS_NAMES_KEY)
    names = data["class_names"] if isinstance(data, dict) else data
    return [str(name) for name in names]

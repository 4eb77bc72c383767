"""Data sources: ImageNet-style folders, WebDataset shards, and export of samples to shards.

Every source yields WebDataset sample dicts (``__key__``, ``jpg`` or ``png``, ``cls``, extra
fields) and reads only through :mod:`storage`, so a local folder and an ``s3://`` prefix behave
the same. Nothing here crashes on a bad input: a file or sample that cannot be used is skipped and
recorded, with a short reason, in a :class:`QuarantineReport`; a file in another format is
converted to PNG and the conversion is recorded.

Deterministic shard assignment (what makes a rerun of :func:`export_to_shards` fill only missing
shards): samples are assigned by their *position in the input*, counting the ones that end up
quarantined, never by what was written. With ``samples_per_shard`` the sample at position ``i``
goes to shard ``i // samples_per_shard``; with ``num_shards`` the input is materialised and
position ``i`` of ``n`` goes to shard ``i * num_shards // n`` (contiguous, sizes differing by at
most one). Sources therefore have to yield in a deterministic order, which all of them here do
(sorted listings, generated splits).
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import numbers
import posixpath
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from os import PathLike
from typing import Any

from PIL import Image

from storage import Storage, StorageError, open_file, open_storage
from storage.shards import ShardWriter, complete_shards, read_shard, shard_name, write_manifest
from tasks.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_FIELDS,
    BadImageError,
    encode_png,
    open_image,
    sniff_format,
    to_rgb,
)

logger = logging.getLogger(__name__)

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
CLASS_NAMES_KEY = "classes.json"
REPORTS_PREFIX = "reports/"

# JPEG colour models that decoders disagree on (Adobe's inverted CMYK in particular): these are
# stored as the RGB PNG our own decoder produces, so every reader sees the same pixels.
_CONVERTED_JPEG_MODES = ("CMYK", "YCCK")
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")

StorageLike = Storage | str | PathLike[str]


@dataclass(frozen=True)
class QuarantineEntry:
    """A skipped input: its key (or path), why, and at which stage (``read`` or ``export``)."""

    key: str
    reason: str
    stage: str

    @property
    def category(self) -> str:
        """The reason without its details (``"too large: 9000x9000"`` -> ``"too large"``)."""
        return self.reason.split(":", 1)[0]


@dataclass(frozen=True)
class ConversionEntry:
    """A kept input whose stored form differs from the original: ``source`` -> ``target``."""

    key: str
    source: str
    target: str


@dataclass
class QuarantineReport:
    """What a source or an export skipped, converted and counted.

    Counters used here: ``read`` (inputs looked at by a source), ``yielded`` (samples a source
    passed on), ``ignored`` (files without an image extension), ``renamed`` (keys changed to stay
    unique), ``received`` / ``written`` / ``skipped`` (samples given to an export, written by it,
    or passed over because their shard was already complete), ``bad_shards``.

    Every input of a source is either yielded or quarantined, and every sample an export receives
    is written, quarantined or skipped, so ``read == yielded + quarantined(read)`` and
    ``received == written + skipped + quarantined(export)``.
    """

    counts: Counter[str] = field(default_factory=Counter)
    quarantined: list[QuarantineEntry] = field(default_factory=list)
    converted: list[ConversionEntry] = field(default_factory=list)

    def count(self, what: str, n: int = 1) -> None:
        """Add ``n`` to counter ``what``."""
        self.counts[what] += n

    def quarantine(self, key: str, reason: str, *, stage: str) -> None:
        """Record a skipped input."""
        logger.warning("quarantined %s at %s: %s", key, stage, reason)
        self.quarantined.append(QuarantineEntry(key=key, reason=reason, stage=stage))

    def convert(self, key: str, source: str, target: str) -> None:
        """Record a kept input whose stored form was converted."""
        logger.info("converted %s from %s to %s", key, source, target)
        self.converted.append(ConversionEntry(key=key, source=source, target=target))

    def num_quarantined(self, stage: str | None = None) -> int:
        """Number of quarantined inputs, at one stage or in all."""
        return sum(1 for entry in self.quarantined if stage is None or entry.stage == stage)

    def reasons(self) -> dict[str, int]:
        """Quarantined inputs per reason category, e.g. ``{"not an image": 2}``."""
        return dict(sorted(Counter(entry.category for entry in self.quarantined).items()))

    def merge(self, other: QuarantineReport) -> None:
        """Add another report's counts and entries to this one."""
        self.counts.update(other.counts)
        self.quarantined.extend(other.quarantined)
        self.converted.extend(other.converted)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary with every entry."""
        return {
            "counts": dict(sorted(self.counts.items())),
            "num_quarantined": len(self.quarantined),
            "num_converted": len(self.converted),
            "reasons": self.reasons(),
            "quarantined": [asdict(entry) for entry in self.quarantined],
            "converted": [asdict(entry) for entry in self.converted],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuarantineReport:
        """Rebuild a report from :meth:`to_dict` output."""
        return cls(
            counts=Counter({k: int(v) for k, v in data.get("counts", {}).items()}),
            quarantined=[QuarantineEntry(**entry) for entry in data.get("quarantined", [])],
            converted=[ConversionEntry(**entry) for entry in data.get("converted", [])],
        )


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
        files: ``(key, class_id)`` of every file with an image extension, sorted by key.
        ignored: keys of files without an image extension or outside a class folder.
    """

    wnids: tuple[str, ...]
    class_names: tuple[str, ...]
    files: tuple[tuple[str, int], ...]
    ignored: tuple[str, ...]


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
    for key in storage.list():
        parts = key.split("/")
        if any(part.startswith(".") for part in parts):
            continue
        if len(parts) < 2 or not key.lower().endswith(accepted):
            ignored.append(key)
            continue
        by_class.setdefault(parts[0], []).append(key)
    wnids = tuple(sorted(by_class))
    files = tuple(
        (key, class_id) for class_id, wnid in enumerate(wnids) for key in sorted(by_class[wnid])
    )
    names = _read_class_names_file(class_names_file, wnids) if class_names_file else wnids
    return ImageFolderListing(
        wnids=wnids, class_names=tuple(names), files=files, ignored=tuple(ignored)
    )


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
    used_keys: set[str] = set()
    for path, class_id in listing.files:
        report.count("read")
        key = _unique_key(sanitise_key(path), used_keys, report)
        try:
            data = storage.read_bytes(path)
        except (StorageError, OSError) as exc:
            report.quarantine(path, f"unreadable: {exc}", stage="read")
            continue
        try:
            field_name, payload = _stored_image(data, key, path, report, max_pixels)
        except BadImageError as exc:
            report.quarantine(path, exc.reason, stage="read")
            continue
        report.count("yielded")
        yield {"__key__": key, field_name: payload, "cls": class_id}


def _unique_key(key: str, used: set[str], report: QuarantineReport) -> str:
    # Two files can sanitise to the same key ("a b.jpg", "a_b.png"); the sorted listing makes
    # the suffix a rerun picks the same.
    candidate, n = key, 1
    while candidate in used:
        n += 1
        candidate = f"{key}_{n}"
    if candidate != key:
        report.count("renamed")
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
        try:
            samples = list(read_shard(storage, key))
        except StorageError as exc:
            report.count("bad_shards")
            report.quarantine(key, f"bad shard: {exc}", stage="read")
            continue
        for sample in samples:
            report.count("read")
            problem = _sample_problem(sample, None, validate, max_pixels)
            if problem is not None:
                report.quarantine(f"{key}:{sample.get('__key__')}", problem, stage="read")
                continue
            report.count("yielded")
            yield sample


def _complete_shards(storage: Storage, name: str | None, split: str | None) -> list[str]:
    if name is not None and split is not None:
        return complete_shards(storage, name, split)
    name_pattern = re.escape(name) if name is not None else ".+"
    split_pattern = re.escape(split) if split is not None else "[^-]+"
    pattern = re.compile(rf"{name_pattern}-{split_pattern}-\d{{6,}}\.tar")
    return sorted(unit for unit in storage.completed() if pattern.fullmatch(unit))


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


def shard_report_key(shard: str) -> str:
    """Key of the per-shard export report, written before the shard's completion marker."""
    return f"{REPORTS_PREFIX}shards/{posixpath.basename(shard).removesuffix('.tar')}.json"


def split_report_key(name: str, split: str) -> str:
    """Key of the report of an export: ``reports/{name}-{split}.json``."""
    return f"{REPORTS_PREFIX}{name}-{split}.json"


def export_to_shards(
    samples: Iterable[Mapping[str, Any]],
    storage: StorageLike,
    name: str,
    split: str,
    *,
    samples_per_shard: int = 256,
    num_shards: int | None = None,
    num_classes: int | None = None,
    report: QuarantineReport | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    overwrite: bool = False,
) -> list[str]:
    """Write samples to WebDataset shards ``{name}-{split}-{index:06d}.tar``, skipping done ones.

    Each sample is checked before it is written: a safe key (no absolute path, ``..`` or dot in
    the base name), no duplicate key, exactly one ``jpg``/``png`` image that decodes, an ``int``
    label in ``[0, num_classes)``. Failures are quarantined in the report; other fields pass
    through unchanged. Shards are assigned by input position (module docstring), so a rerun
    recomputes the same assignment and, unless ``overwrite``, passes over complete shards without
    validating them again. A shard is published only when all of it is written (storage's
    :class:`~storage.shards.ShardWriter`), after its own report ``reports/shards/{shard}.json``.

    At the end the folder's ``manifest.parquet`` is rewritten from every complete shard (all
    splits), and ``reports/{name}-{split}.json`` holds ``this_run`` (the ``report`` of this call,
    which may also hold what a source recorded) and ``export`` (the per-shard reports of every
    shard of the split, summed: the record of what the split holds, whatever the reruns).

    Args:
        samples: sample dicts in a deterministic order.
        storage: the dataset folder (path, URI or storage).
        name: dataset name.
        split: split name.
        samples_per_shard: input samples per shard (ignored if ``num_shards`` is given).
        num_shards: number of shards instead; materialises ``samples`` to count them.
        num_classes: labels must be below this (only non-negative if ``None``).
        report: collects this run's counts and entries; a new one if omitted.
        max_pixels: largest accepted width * height.
        overwrite: rewrite shards that are already complete.

    Returns:
        The keys of the split's shards touched by this input (written or already complete), in
        order.
    """
    if num_shards is None and samples_per_shard <= 0:
        raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
    if num_shards is not None and num_shards <= 0:
        raise ValueError(f"num_shards must be positive, got {num_shards}")
    folder = _as_storage(storage)
    report = report if report is not None else QuarantineReport()
    shard_keys: list[str] = []
    seen_keys: set[str] = set()
    for index, batch in _shard_batches(samples, samples_per_shard, num_shards):
        key = shard_name(name, split, index)
        shard_keys.append(key)
        if not overwrite and folder.is_complete(key):
            seen_keys.update(str(sample.get("__key__")) for sample in batch)
            report.count("received", len(batch))
            report.count("skipped", len(batch))
            logger.info("shard %s already complete; skipped", folder.url(key))
            continue
        report.merge(_write_shard(folder, key, batch, seen_keys, num_classes, max_pixels))

    if shard_keys:
        all_complete = sorted(unit for unit in folder.completed() if unit.endswith(".tar"))
        write_manifest(folder, all_complete)
    folder.write_json(
        split_report_key(name, split),
        {
            "name": name,
            "split": split,
            "shards": shard_keys,
            "this_run": report.to_dict(),
            "export": _split_export_report(folder, name, split).to_dict(),
        },
    )
    return shard_keys


def _shard_batches(
    samples: Iterable[Mapping[str, Any]], samples_per_shard: int, num_shards: int | None
) -> Iterator[tuple[int, list[Mapping[str, Any]]]]:
    """``(shard index, samples)`` by input position (module docstring), one shard in memory."""
    total = 0
    if num_shards is not None:
        samples = list(samples)
        total = len(samples)

    def shard_of(pair: tuple[int, Mapping[str, Any]]) -> int:
        if num_shards is None:
            return pair[0] // samples_per_shard
        return pair[0] * num_shards // total

    for index, group in itertools.groupby(enumerate(samples), key=shard_of):
        yield index, [sample for _, sample in group]


def _write_shard(
    folder: Storage,
    key: str,
    batch: Sequence[Mapping[str, Any]],
    seen_keys: set[str],
    num_classes: int | None,
    max_pixels: int,
) -> QuarantineReport:
    shard_report = QuarantineReport()
    with ShardWriter(folder, key) as writer:
        for sample in batch:
            shard_report.count("received")
            sample_key = sample.get("__key__")
            problem = _sample_problem(sample, num_classes, True, max_pixels)
            if problem is None and sample_key in seen_keys:
                problem = f"duplicate key: {sample_key}"
            if problem is not None:
                shard_report.quarantine(str(sample_key), problem, stage="export")
                continue
            seen_keys.add(str(sample_key))
            writer.write(_normalise_fields(sample, shard_report))
            shard_report.count("written")
        # Before the marker: a complete shard always has its report.
        folder.write_json(shard_report_key(key), shard_report.to_dict())
    return shard_report


def _normalise_fields(sample: Mapping[str, Any], report: QuarantineReport) -> dict[str, Any]:
    """The sample with its image under the field of its real format (bytes unchanged)."""
    out = {k: (bytes(v) if isinstance(v, bytearray) else v) for k, v in sample.items()}
    out["cls"] = int(out["cls"])
    for field_name in IMAGE_FIELDS:
        data = out.get(field_name)
        if isinstance(data, bytes):
            real = sniff_format(data)
            if real is None:
                # Decodable but neither container: store the decoded pixels as PNG.
                del out[field_name]
                out["png"] = encode_png(to_rgb(Image.open(io.BytesIO(data))))
                report.convert(str(sample["__key__"]), field_name, "png RGB")
            elif real != field_name:
                out[real] = out.pop(field_name)
                report.convert(str(sample["__key__"]), f"{real} under {field_name}", real)
    return out


def _split_export_report(folder: Storage, name: str, split: str) -> QuarantineReport:
    total = QuarantineReport()
    for key in complete_shards(folder, name, split):
        report_key = shard_report_key(key)
        if folder.exists(report_key):
            total.merge(QuarantineReport.from_dict(folder.read_json(report_key)))
        else:
            logger.warning("shard %s has no export report", folder.url(key))
    return total


def write_class_names(storage: StorageLike, class_names: Sequence[str], **info: Any) -> None:
    """Store ``classes.json`` beside the shards: the names the zero-shot head is built from.

    Args:
        storage: the dataset folder.
        class_names: readable names in class-id order.
        **info: other JSON-able facts about the domain (description, wnids, image size ...).
    """
    names = [str(name) for name in class_names]
    if len(set(names)) != len(names):
        logger.warning("class names are not unique: %s", names)
    _as_storage(storage).write_json(CLASS_NAMES_KEY, {"class_names": names, **info})


def read_class_names(storage: StorageLike) -> list[str]:
    """The class names stored by :func:`write_class_names` (a plain JSON list is accepted too)."""
    data = _as_storage(storage).read_json(CLASS_NAMES_KEY)
    names = data["class_names"] if isinstance(data, dict) else data
    return [str(name) for name in names]


def export_synthetic_domain(
    storage: StorageLike,
    domain: str,
    *,
    splits: Sequence[str] = ("train", "val", "test"),
    seed: int = 0,
    per_class: int | Mapping[str, int] | None = None,
    image_size: int = 56,
    samples_per_shard: int = 256,
) -> dict[str, list[str]]:
    """Export a built-in synthetic domain: ``classes.json`` and the shards of each split.

    The dataset name is the domain name; a rerun fills only missing shards.

    Args:
        storage: the dataset folder.
        domain: a key of :data:`tasks.data.synthetic.SYNTHETIC_DOMAINS`.
        splits: splits to export.
        seed: generation seed.
        per_class: samples per class, one number or one per split (defaults per split if None).
        image_size: side length in pixels.
        samples_per_shard: samples per shard.

    Returns:
        The shard keys of each split.
    """
    from tasks.data.synthetic import SYNTHETIC_DOMAINS, make_split

    spec = SYNTHETIC_DOMAINS[domain]
    folder = _as_storage(storage)
    write_class_names(
        folder,
        spec.class_names,
        domain=spec.name,
        description=spec.description,
        related=spec.related,
        evidence=spec.evidence,
        image_size=image_size,
        seed=seed,
    )
    shards = {}
    for split in splits:
        count = per_class.get(split) if isinstance(per_class, Mapping) else per_class
        samples = make_split(domain, split, seed=seed, per_class=count, image_size=image_size)
        shards[split] = export_to_shards(
            samples,
            folder,
            domain,
            split,
            samples_per_shard=samples_per_shard,
            num_classes=spec.num_classes,
        )
    return shards


__all__ = [
    "CLASS_NAMES_KEY",
    "IMAGE_EXTENSIONS",
    "ConversionEntry",
    "ImageFolderListing",
    "QuarantineEntry",
    "QuarantineReport",
    "export_synthetic_domain",
    "export_to_shards",
    "image_folder_classes",
    "image_for_storage",
    "iter_image_folder",
    "iter_webdataset",
    "key_problem",
    "list_image_folder",
    "read_class_names",
    "sanitise_key",
    "shard_report_key",
    "split_report_key",
    "write_class_names",
]

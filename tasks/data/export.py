"""Export samples to WebDataset shards, with a quarantine report per shard and per split.

Deterministic shard assignment (what makes a rerun fill only missing shards): samples are
assigned by their *position in the input*, counting the ones that end up quarantined, never by
what was written. Position ``i`` goes to shard ``i // samples_per_shard`` (with ``num_shards``,
:func:`export_to_shards` materialises the input and position ``i`` of ``n`` goes to shard
``i * num_shards // n``: contiguous, sizes differing by at most one). Sources therefore have to
yield in a deterministic order, which all of them here do.

Two ways in:

- :func:`export_to_shards` takes any iterable of samples and writes its shards one after the
  other. It has to read the whole input to know where each shard starts, so a rerun still reads
  (and a source still decodes) every sample before it can pass over a complete shard.
- :func:`export_listed_shard` exports one shard of a *listing* (files, sample indices): the
  caller knows each shard's units from the listing alone, so a complete shard is recognised
  before any of its units is read, units are read (fetched, decoded) on a bounded thread pool,
  and shards are independent units of work that a flow can fan out. :func:`finish_split` then
  writes the split's report and the manifest. Built-in synthetic domains and ImageFolder domains
  (:mod:`tasks.data.domains`) are exported this way.
"""

from __future__ import annotations

import io
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from storage import Storage, layout
from storage.fingerprints import fingerprint_of
from storage.layout import shard_name, shard_report_key, split_report_key
from storage.shards import ShardWriter, complete_shards, write_manifest
from tasks.data.images import DEFAULT_MAX_PIXELS, IMAGE_FIELDS, encode_png, sniff_format, to_rgb
from tasks.data.prefetch import ordered_map
from tasks.data.quarantine import QuarantineReport
from tasks.data.readers import StorageLike, _as_storage, _sample_problem

logger = logging.getLogger(__name__)

#: Reads one unit of a listing: ``unit -> (sample or None, report)``. It runs on pool threads,
#: so it records into the report it returns (merged in listing order), never a shared one.
UnitRead = Callable[[Any], tuple[Mapping[str, Any] | None, QuarantineReport]]

#: Threads reading (fetching and decoding) the units of one shard by default: storage reads wait
#: on the network and Pillow releases the GIL while it decodes, so they overlap.
DEFAULT_READ_WORKERS = 8


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
    fingerprint: str | None = None,
    check_images: bool = True,
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
        fingerprint: what the samples were made from (e.g. a generator's settings), recorded
            in each shard's marker: a complete shard of other inputs is rewritten, not reused.
        check_images: decode every image to check it; False only for a source that has just
            decoded each image itself (a second decode would find nothing new).

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
        if not overwrite and folder.is_done(key, fingerprint, key):
            seen_keys.update(str(sample.get("__key__")) for sample in batch)
            report.count("received", len(batch))
            report.count("skipped", len(batch))
            logger.info("shard %s already complete; skipped", folder.url(key))
            continue
        shard_report = QuarantineReport()
        _write_shard(
            folder,
            key,
            batch,
            shard_report,
            seen_keys,
            num_classes,
            max_pixels,
            fingerprint,
            check_images,
        )
        report.merge(shard_report)
    finish_split(folder, name, split, shard_keys, report, manifest=bool(shard_keys))
    return shard_keys


def listed_shards(total: int, samples_per_shard: int) -> list[range]:
    """The positions in a listing of ``total`` units that each shard holds (module docstring).

    Raises:
        ValueError: ``samples_per_shard`` is not positive.
    """
    if samples_per_shard <= 0:
        raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
    return [
        range(start, min(start + samples_per_shard, total))
        for start in range(0, total, samples_per_shard)
    ]


@dataclass
class ShardOutcome:
    """What exporting one shard did.

    Attributes:
        shard: the shard's key.
        skipped: it was already complete (for the same inputs), so nothing was read.
        report: the shard's counts and entries: what its reads recorded and what the export
            wrote, quarantined or skipped (``skipped`` counts its listed units).
        seconds: wall time of the export of this shard.
    """

    shard: str
    skipped: bool
    report: QuarantineReport = field(default_factory=QuarantineReport)
    seconds: float = 0.0

    @property
    def samples(self) -> int:
        """Samples written to the shard by this export (0 when skipped)."""
        return self.report.counts["written"]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (what a flow's shard task returns)."""
        return {
            "shard": self.shard,
            "skipped": self.skipped,
            "report": self.report.to_dict(),
            "seconds": round(self.seconds, 3),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShardOutcome:
        """Rebuild an outcome from :meth:`to_dict` output."""
        return cls(
            shard=str(data["shard"]),
            skipped=bool(data["skipped"]),
            report=QuarantineReport.from_dict(data["report"]),
            seconds=float(data.get("seconds", 0.0)),
        )


def export_listed_shard(
    units: Sequence[Any],
    read: UnitRead,
    storage: StorageLike,
    name: str,
    split: str,
    index: int,
    *,
    num_classes: int | None = None,
    fingerprint: str | None = None,
    workers: int = DEFAULT_READ_WORKERS,
    overwrite: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    check_images: bool = True,
) -> ShardOutcome:
    """Export shard ``index`` of a listing: the shard's ``units``, read and written in order.

    The caller takes the units from the listing (:func:`listed_shards`), so unless
    ``overwrite`` a shard that is already complete for the same ``fingerprint`` is passed over
    before any unit is read. Otherwise ``read`` is applied to the units on ``workers`` threads
    (at most ``2 * workers`` read ahead: memory is a few images, not a shard) and the samples
    are checked and written as :func:`export_to_shards` does; the reads' reports go into the
    shard's own report, so what a read quarantined stays on record across reruns.

    Keys are checked for duplicates within the shard only: listings give every unit its own key
    (:func:`tasks.data.readers.list_image_folder` makes them unique), which is what lets the
    shards of a split be exported independently, in any order or in parallel.

    Args:
        units: the shard's units, in listing order.
        read: reads one unit (:data:`UnitRead`); a unit it cannot use gives ``None``.
        storage: the dataset folder.
        name: dataset name.
        split: split name.
        index: the shard's index in the split.
        num_classes: labels must be below this.
        fingerprint: what the split's listing was made from (recorded in the marker).
        workers: threads reading units (1: in this thread).
        overwrite: rewrite the shard even when it is complete.
        max_pixels: largest accepted width * height.
        check_images: decode each image to check it; False when ``read`` has decoded it.

    Returns:
        The outcome (skipped or written, and the shard's report).
    """
    folder = _as_storage(storage)
    key = shard_name(name, split, index)
    start = time.perf_counter()
    if not overwrite and folder.is_done(key, fingerprint, key):
        logger.info("shard %s already complete; skipped", folder.url(key))
        skipped = QuarantineReport()
        skipped.count("skipped", len(units))
        return ShardOutcome(key, True, skipped, time.perf_counter() - start)
    shard_report = QuarantineReport()

    def samples() -> Iterator[Mapping[str, Any]]:
        # Closed with the stream: a failed write cancels the pending reads and joins the pool.
        with closing(ordered_map(read, units, workers=workers)) as reads:
            for sample, part in reads:
                shard_report.merge(part)
                if sample is not None:
                    yield sample

    with closing(samples()) as stream:
        _write_shard(
            folder,
            key,
            stream,
            shard_report,
            set(),
            num_classes,
            max_pixels,
            fingerprint,
            check_images,
        )
    return ShardOutcome(key, False, shard_report, time.perf_counter() - start)


def finish_split(
    storage: StorageLike,
    name: str,
    split: str,
    shard_keys: Sequence[str],
    report: QuarantineReport,
    *,
    manifest: bool = True,
    retire_fingerprint: str | None = None,
    workers: int = DEFAULT_READ_WORKERS,
) -> QuarantineReport:
    """Close an export of one split: its report, and (unless told not to) the manifest.

    ``reports/{name}-{split}.json`` gets ``shards`` (this export's keys), ``this_run``
    (``report``) and ``export`` (the summed reports of every complete shard of the split, read
    on ``workers`` threads).

    Args:
        storage: the dataset folder.
        name: dataset name.
        split: split name.
        shard_keys: the split's shards in this export, in order.
        report: this run's counts and entries.
        manifest: rewrite ``manifest.parquet`` from every complete shard (all splits); a caller
            finishing several splits writes it once, after the last.
        retire_fingerprint: the fingerprint this export's shards carry. When given, a complete
            shard of the split that is not among ``shard_keys`` and was made from other inputs
            (a longer listing of before) loses its marker, then its object: no reader may mix it
            with this export's shards.
        workers: threads reading the shard reports.

    Returns:
        The split's summed export report (``export`` above).
    """
    folder = _as_storage(storage)
    if retire_fingerprint is not None:
        _retire_stale_shards(folder, name, split, shard_keys, retire_fingerprint)
    total = _split_export_report(folder, name, split, workers)
    folder.write_json(
        split_report_key(name, split),
        {
            "name": name,
            "split": split,
            "shards": list(shard_keys),
            "this_run": report.to_dict(),
            "export": total.to_dict(),
        },
    )
    if manifest:
        write_complete_manifest(folder)
    return total


def write_complete_manifest(storage: StorageLike) -> None:
    """Rewrite ``manifest.parquet`` from every complete shard of the folder (all splits)."""
    folder = _as_storage(storage)
    write_manifest(folder, sorted(unit for unit in folder.completed() if unit.endswith(".tar")))


def _retire_stale_shards(
    folder: Storage, name: str, split: str, current: Sequence[str], fingerprint: str
) -> None:
    keep = set(current)
    for key in complete_shards(folder, name, split):
        if key in keep or folder.completion_info(key).get("fingerprint") == fingerprint:
            continue
        logger.warning("shard %s is not part of this export's listing: retired", folder.url(key))
        folder.clear_complete(key)  # first: a reader never sees a marker without its data
        if folder.exists(key):
            folder.delete(key)


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
    samples: Iterable[Mapping[str, Any]],
    shard_report: QuarantineReport,
    seen_keys: set[str],
    num_classes: int | None,
    max_pixels: int,
    fingerprint: str | None,
    check_images: bool,
) -> None:
    with ShardWriter(folder, key, fingerprint=fingerprint) as writer:
        for sample in samples:
            shard_report.count("received")
            sample_key = sample.get("__key__")
            problem = _sample_problem(sample, num_classes, check_images, max_pixels)
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


def _split_export_report(
    folder: Storage, name: str, split: str, workers: int = 1
) -> QuarantineReport:
    def read(key: str) -> QuarantineReport | None:
        report_key = shard_report_key(key)
        if not folder.exists(report_key):
            logger.warning("shard %s has no export report", folder.url(key))
            return None
        return QuarantineReport.from_dict(folder.read_json(report_key))

    total = QuarantineReport()
    for part in ordered_map(read, complete_shards(folder, name, split), workers=workers):
        if part is not None:
            total.merge(part)
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
    _as_storage(storage).write_json(layout.CLASS_NAMES_FILE, {"class_names": names, **info})


def export_synthetic_domain(
    storage: StorageLike,
    domain: str,
    *,
    splits: Sequence[str] = ("train", "val", "test"),
    seed: int = 0,
    per_class: int | Mapping[str, int] | None = None,
    image_size: int = 56,
    samples_per_shard: int = 256,
    workers: int = 1,
) -> dict[str, list[str]]:
    """Export a built-in synthetic domain: ``classes.json`` and the shards of each split.

    The dataset name is the domain name. Sample ``i`` of a split is drawn on its own
    (:func:`tasks.data.synthetic.make_sample`, class ``i % C``: every shard holds every class),
    so each shard is a listed shard (:func:`export_listed_shard`): a rerun fills only missing
    shards and draws no image of a complete one. The shards are the ones
    :func:`export_to_shards` writes from :func:`~tasks.data.synthetic.make_split`, byte for byte.

    Args:
        storage: the dataset folder.
        domain: a key of :data:`tasks.data.synthetic.SYNTHETIC_DOMAINS`.
        splits: splits to export.
        seed: generation seed.
        per_class: samples per class, one number or one per split (defaults per split if None).
        image_size: side length in pixels.
        samples_per_shard: samples per shard.
        workers: threads drawing the images of a shard.

    Returns:
        The shard keys of each split.
    """
    from tasks.data.synthetic import SYNTHETIC_DOMAINS, make_sample, split_length

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
        inputs = fingerprint_of("synthetic", domain, split, seed, count, image_size)

        def draw(index: int, split: str = split) -> tuple[dict[str, Any], QuarantineReport]:
            sample = make_sample(domain, split, index, seed=seed, image_size=image_size)
            return sample, QuarantineReport()

        report = QuarantineReport()
        keys = []
        positions = listed_shards(split_length(domain, split, count), samples_per_shard)
        for index, units in enumerate(positions):
            outcome = export_listed_shard(
                units,
                draw,
                folder,
                domain,
                split,
                index,
                num_classes=spec.num_classes,
                fingerprint=inputs,
                workers=workers,
            )
            report.merge(outcome.report)
            keys.append(outcome.shard)
        finish_split(folder, domain, split, keys, report, manifest=False, retire_fingerprint=inputs)
        shards[split] = keys
    write_complete_manifest(folder)
    return shards

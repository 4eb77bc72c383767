"""Export samples to WebDataset shards, with a quarantine report per shard and per split.

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
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from PIL import Image

from storage import Storage, layout
from storage.fingerprints import fingerprint_of
from storage.layout import shard_name, shard_report_key, split_report_key
from storage.shards import ShardWriter, complete_shards, write_manifest
from tasks.data.images import DEFAULT_MAX_PIXELS, IMAGE_FIELDS, encode_png, sniff_format, to_rgb
from tasks.data.quarantine import QuarantineReport
from tasks.data.readers import StorageLike, _as_storage, _sample_problem

logger = logging.getLogger(__name__)


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
        report.merge(
            _write_shard(folder, key, batch, seen_keys, num_classes, max_pixels, fingerprint)
        )

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
    fingerprint: str | None,
) -> QuarantineReport:
    shard_report = QuarantineReport()
    with ShardWriter(folder, key, fingerprint=fingerprint) as writer:
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
        inputs = fingerprint_of("synthetic", domain, split, seed, count, image_size)
        shards[split] = export_to_shards(
            samples,
            folder,
            domain,
            split,
            samples_per_shard=samples_per_shard,
            num_classes=spec.num_classes,
            fingerprint=inputs,
        )
    return shards

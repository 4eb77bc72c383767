"""The input of a build: its sorted listing, split into output shards, read through the readers.

Planning lists the input once, in one process; nothing here reads image data for the listing
itself. WebDataset input is listed from its shards' completion markers (read concurrently):
sample counts, and the key ranges that prove keys unique without reading the shards
(:func:`~tasks.data.readers.webdataset_key_renames`). The dataset-mean baseline is estimated
from a seeded, systematic sample over the whole listing (:func:`dataset_mean`).
"""

from __future__ import annotations

import bisect
import itertools
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from storage import Storage, StorageError, open_storage
from storage.core import IO_WORKERS, is_transient, map_concurrently
from storage.shards import complete_shards, read_shard
from tasks.build_dataset.config import BuildConfig
from tasks.data.images import BadImageError, decode_image, image_to_tensor, sample_image_bytes
from tasks.data.prefetch import ordered_map
from tasks.data.quarantine import QuarantineReport
from tasks.data.readers import (
    list_image_folder,
    read_class_names,
    read_image_file,
    read_shard_head,
    read_shard_samples,
    webdataset_key_renames,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Images read to estimate the dataset-mean baseline: about two per class of ImageNet-1k, spread
#: over the whole listing (:func:`mean_sample`); every image when the input has fewer.
MEAN_SAMPLE_SIZE = 2048

#: The name of the sampling rule, recorded with the mean (``config.json``).
MEAN_SAMPLE_RULE = "systematic-v1"


def _input_storage(config: BuildConfig) -> Storage:
    return open_storage(config.input_uri)


@dataclass
class InputListing:
    """The input of a build, as planning lists it.

    Attributes:
        units: for a synthetic domain the sample indices, for an image folder
            ``"{class_id}:{key}:{path}"`` per file, for WebDataset input ``"{shard}@{samples}"``
            per complete input shard (with ``max_per_class``: ``"{shard}@{start}:{stop}"`` per
            run of kept samples); sorted. With ``max_per_class`` only the first images of each
            class, in this order, are listed.
        class_names: the classes, in label order.
        renames: WebDataset input only: new keys of samples whose key was used earlier in the
            listing, by ``"{shard}@{position}"`` (:func:`webdataset_key_renames`).
        report: what listing skipped (file names that cannot be keys), with reasons.
    """

    units: list[str]
    class_names: list[str]
    renames: dict[str, str] = field(default_factory=dict)
    report: QuarantineReport = field(default_factory=QuarantineReport)


def list_input(config: BuildConfig) -> InputListing:
    """The sorted input listing and the class names of a build.

    For WebDataset input every complete input shard is read once here, for its keys only, so
    that a key repeated anywhere in the input gets a unique replacement fixed in the plan.
    """
    if config.input_kind == "synthetic":
        from tasks.data.synthetic import SYNTHETIC_DOMAINS, split_length

        if config.input_uri not in SYNTHETIC_DOMAINS:
            raise ValueError(
                f"unknown synthetic domain {config.input_uri!r}; "
                f"available: {', '.join(sorted(SYNTHETIC_DOMAINS))}"
            )
        total = split_length(config.input_uri, config.source_split, config.synthetic_per_class)
        names = list(SYNTHETIC_DOMAINS[config.input_uri].class_names)
        # Class index % C sits at position index (tasks.data.synthetic).
        indices = _first_per_class(
            range(total), [i % len(names) for i in range(total)], config.max_per_class
        )
        return InputListing([f"{i:08d}" for i in indices], names)
    storage = _input_storage(config)
    report = QuarantineReport()
    if config.input_kind == "imagefolder":
        listing = list_image_folder(storage, class_names_file=config.class_names_file)
        if not listing.files:
            raise ValueError(f"no image files under {storage.uri}")
        units = [
            f"{class_id}:{key}:{path}"
            for (path, class_id), key in zip(listing.files, listing.keys, strict=True)
        ]
        units = _first_per_class(
            units, [class_id for _, class_id in listing.files], config.max_per_class
        )
        for path, reason in listing.skipped:
            report.quarantine(path, reason, stage="list")
        return InputListing(units, list(listing.class_names), report=report)
    name = config.input_name
    if name is None:
        raise ValueError("webdataset input needs input_name (the dataset name of the shards)")
    shards = complete_shards(storage, name, config.source_split)
    if not shards:
        raise ValueError(
            f"no complete shards {name}-{config.source_split}-*.tar under {storage.uri}"
        )
    # One marker per shard, read concurrently: counts and key ranges, no shard data.
    infos = dict(zip(shards, storage.completion_infos(shards), strict=True))
    if config.max_per_class is not None:
        units = _webdataset_first_per_class(storage, shards, config.max_per_class, infos)
    else:
        units = [f"{shard}@{_shard_samples(storage, shard, infos[shard])}" for shard in shards]
    renames = webdataset_key_renames(storage, shards, report, infos=infos)
    return InputListing(units, read_class_names(storage), renames=renames, report=report)


def _shard_samples(storage: Storage, shard: str, info: Mapping[str, Any]) -> int:
    """A complete shard's sample count: its marker's, or counted when the marker has none."""
    samples = info.get("samples")
    if isinstance(samples, int):
        return samples
    return sum(1 for _ in read_shard(storage, shard))


def _first_per_class(units: Sequence[T], classes: Sequence[int], limit: int | None) -> list[T]:
    """The units whose class has not yet been seen ``limit`` times before them, in order."""
    if limit is None:
        return list(units)
    seen: Counter[int] = Counter()
    kept = []
    for unit, cls in zip(units, classes, strict=True):
        seen[cls] += 1
        if seen[cls] <= limit:
            kept.append(unit)
    return kept


def _webdataset_first_per_class(
    storage: Storage, shards: Sequence[str], limit: int, infos: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    """Units ``"{shard}@{start}:{stop}"`` covering the first ``limit`` samples of each class.

    Every shard is read for its labels (the images are not decoded; shards concurrently, the
    labels counted in listing order). A sample without a usable label is kept: it counts for no
    class and is quarantined, with its reason, when read.
    """

    def labels_of(shard: str) -> list[Any] | None:
        try:
            return [sample.get("cls") for sample in read_shard(storage, shard)]
        except StorageError as exc:
            if is_transient(exc):
                raise
            # Listed whole: reading it quarantines the shard (with its reason), as without limit.
            logger.warning("input shard %s unreadable while listing labels: %s", shard, exc)
            return None

    units = []
    seen: Counter[int] = Counter()
    for shard, labels in zip(shards, map_concurrently(labels_of, shards), strict=True):
        if labels is None:
            units.append(f"{shard}@0:{int(infos[shard].get('samples', 0))}")
            continue
        keep = []
        for label in labels:
            if isinstance(label, int) and not isinstance(label, bool):
                seen[label] += 1
                keep.append(seen[label] <= limit)
            else:
                keep.append(True)
        start = None
        for position, kept in enumerate([*keep, False]):
            if kept and start is None:
                start = position
            elif not kept and start is not None:
                units.append(f"{shard}@{start}:{position}")
                start = None
    return units


def _unit_span(unit: str) -> tuple[str, int, int]:
    """``(shard, start, stop)`` of a WebDataset unit: ``shard@start:stop``, or ``shard@count``."""
    shard, _, span = unit.rpartition("@")
    start, colon, stop = span.partition(":")
    return (shard, int(start), int(stop)) if colon else (shard, 0, int(start))


def _range_size(unit: str) -> int:
    """Samples in a WebDataset unit: ``shard@start:stop``, or ``shard@count``."""
    _, start, stop = _unit_span(unit)
    return stop - start


def _sample_ranges(units: Sequence[str], shard_index: int, num_shards: int) -> list[str]:
    """Sample ranges ``"{shard}@{start}:{stop}"`` of output shard ``shard_index``."""
    spans = [_unit_span(unit) for unit in units]
    total = sum(stop - start for _, start, stop in spans)
    low, high = shard_index * total // num_shards, (shard_index + 1) * total // num_shards
    ranges, offset = [], 0
    for shard, first, last in spans:
        count = last - first
        start, stop = max(low - offset, 0), min(high - offset, count)
        if start < stop:
            ranges.append(f"{shard}@{first + start}:{first + stop}")
        offset += count
    return ranges


UnitReader = Callable[[str], tuple[list[dict[str, Any]], QuarantineReport]]


def unit_reader(config: BuildConfig, renames: Mapping[str, str] | None = None) -> UnitReader:
    """A function that reads one unit of the listing: ``unit -> (samples, report)``.

    Reads through the readers of :mod:`tasks.data.readers` (the same as every other stage); bad
    images are quarantined in the returned report (with the reason) and not returned. Each call
    has its own report, so units can be read in parallel and their reports merged in order.

    Args:
        config: the build.
        renames: :attr:`InputListing.renames` (WebDataset input).
    """
    if config.input_kind == "synthetic":
        from tasks.data.synthetic import make_sample

        def read_synthetic(unit: str) -> tuple[list[dict[str, Any]], QuarantineReport]:
            report = QuarantineReport()
            report.count("read")
            sample = make_sample(
                config.input_uri,
                config.source_split,
                int(unit),
                seed=config.synthetic_seed,
                image_size=config.image_size,
            )
            return [sample], report

        return read_synthetic
    storage = _input_storage(config)
    if config.input_kind == "imagefolder":

        def read_file(unit: str) -> tuple[list[dict[str, Any]], QuarantineReport]:
            report = QuarantineReport()
            class_id, key, path = unit.split(":", 2)
            # The labeller decodes every image it labels (on the host or the device), so a
            # JPEG is checked here by its header only: decoding it here too would double the
            # decoding (a body that does not decode is quarantined by the labeller instead).
            sample = read_image_file(storage, path, key, int(class_id), report, check_pixels=False)
            return ([] if sample is None else [sample]), report

        return read_file

    def read_range(unit: str) -> tuple[list[dict[str, Any]], QuarantineReport]:
        report = QuarantineReport()
        shard, _, span = unit.rpartition("@")
        start, _, stop = span.partition(":")
        samples = read_shard_samples(
            storage,
            shard,
            report,
            start=int(start) if stop else 0,
            stop=int(stop) if stop else None,
            validate=False,
            renames=renames,
        )
        return samples, report

    return read_range


def iter_units(
    config: BuildConfig,
    units: Sequence[str],
    report: QuarantineReport,
    renames: Mapping[str, str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield the input samples of some units of the listing, in listing order.

    Reads one unit at a time with :func:`unit_reader`; bad images are quarantined in ``report``
    (with the reason) and never yielded.
    """
    read = unit_reader(config, renames)
    for unit in units:
        samples, part = read(unit)
        report.merge(part)
        yield from samples


def _image_tensor(sample: dict[str, Any], size: int) -> torch.Tensor:
    _, data = sample_image_bytes(sample)
    # a large JPEG is decoded at the scale nearest above the model's input (Image.draft)
    return image_to_tensor(decode_image(data, draft_size=size), size)


def mean_sample(sizes: Sequence[int], sample_size: int, seed: int) -> list[tuple[int, int]]:
    """Which images estimate the dataset mean: ``(unit index, images from its head)`` pairs.

    A systematic sample over the whole listing: ``sample_size`` positions evenly spaced over
    the listing's images, from an offset drawn from ``seed``; every image when there are no
    more than ``sample_size``. A sorted listing (an image folder, classes in order) is thereby
    stratified over its classes in proportion to their sizes, and a listing in any order is
    covered from end to end. Each position is moved to the head of the unit (WebDataset run)
    holding it, so that a shard is read as a prefix: ``k`` positions in one unit take its first
    ``k`` images.

    Args:
        sizes: images per unit of the listing, in order (1 for a file or a synthetic index).
        sample_size: how many positions.
        seed: the labelling seed.
    """
    total = sum(sizes)
    if total <= sample_size:
        return [(index, size) for index, size in enumerate(sizes) if size > 0]
    offset = random.Random(f"baseline-mean:{seed}").random()
    ends = list(itertools.accumulate(sizes))
    counts: Counter[int] = Counter()
    for j in range(sample_size):
        position = int((j + offset) * total / sample_size)
        counts[bisect.bisect_right(ends, position)] += 1
    return sorted(counts.items())


def dataset_mean(config: BuildConfig, units: Sequence[str]) -> tuple[list[float], dict[str, Any]]:
    """Per-channel mean in ``[0, 1]`` of a sample of the whole input (:func:`mean_sample`).

    Deterministic: the sample depends on the listing and the labelling seed only, and the
    images are read concurrently but summed in listing order. Unreadable images are left out.

    Returns:
        ``(mean, provenance)``: the mean (rounded to 6 decimals) and how it was estimated
        (rule, sample size, seed, images used), which the build stores in ``config.json``.

    Raises:
        ValueError: no image of the sample could be read.
    """
    if config.input_kind == "webdataset":
        spans = [_unit_span(unit) for unit in units]
        sizes = [stop - start for _, start, stop in spans]
    else:
        sizes = [1] * len(units)
    chosen = mean_sample(sizes, MEAN_SAMPLE_SIZE, config.label.seed)
    read = _mean_reader(config, units)
    # Storage reads wait on I/O: many in flight. A synthetic image is rendered in Python.
    workers = 1 if config.input_kind == "synthetic" else IO_WORKERS
    total = torch.zeros(3, dtype=torch.float64)
    count = 0
    for means in ordered_map(read, chosen, workers=workers, ahead=4 * workers):
        for mean in means:
            total += mean
            count += 1
    if count == 0:
        raise ValueError(
            f"no readable image among the {len(chosen)} input units sampled to estimate the "
            "dataset mean"
        )
    provenance = {
        "rule": MEAN_SAMPLE_RULE,
        "sample_size": MEAN_SAMPLE_SIZE,
        "seed": config.label.seed,
        "images": count,
        "units": len(chosen),
    }
    return [round(float(v), 6) for v in total / count], provenance


def _mean_reader(
    config: BuildConfig, units: Sequence[str]
) -> Callable[[tuple[int, int]], list[torch.Tensor]]:
    """``(unit index, images) -> per-image channel means`` of the head of that unit."""
    size = config.image_size
    if config.input_kind == "webdataset":
        storage = _input_storage(config)

        def samples_of(index: int, count: int) -> list[dict[str, Any]]:
            shard, start, _ = _unit_span(units[index])
            return read_shard_head(storage, shard, start, start + count)

    else:
        read = unit_reader(config)

        def samples_of(index: int, count: int) -> list[dict[str, Any]]:
            return read(units[index])[0]

    def means(item: tuple[int, int]) -> list[torch.Tensor]:
        out = []
        for sample in samples_of(*item):
            try:
                out.append(_image_tensor(sample, size).double().mean(dim=(1, 2)))
            except BadImageError:
                continue
        return out

    return means

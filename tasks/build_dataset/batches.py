"""The labeller's input: batches of samples and decoded images, prepared ahead of the model.

Four steps overlap when ``workers > 1``: reading units (input files, or input-shard ranges, the
next one fetched while the current one is decoded), decoding and resizing images (a pool of
threads: Pillow releases the GIL while it works), stacking a batch (into pinned memory for a
CUDA device), and, in the caller, the model. Each step is bounded, so memory is a few batches
and the input units in flight, never a whole output shard.

With ``decode_device`` (``BuildConfig.decode: device``) the threads only check each JPEG's
header; the batch's JPEGs are decoded and resized in one call where the model runs (nvjpeg on a
GPU), so the host's cost per image is the header and the copy of the encoded bytes. Other
formats and CMYK JPEGs are still decoded by the threads; their tensors join the batch on the
device. A JPEG the device cannot decode is decoded on the host; one the host cannot decode
either is quarantined when its batch is decoded, so that batch carries one image fewer.

Nothing about the result depends on the number of workers: samples come in listing order, bad
inputs are quarantined with the same reasons, and the quarantine entries are handed over in
the order a serial read makes them (each batch carries what happened since the previous one).
``workers == 1`` runs every step inline in the caller's thread, like the labeller always did.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tasks.build_dataset.config import BuildConfig
from tasks.build_dataset.inputs import _image_tensor, unit_reader
from tasks.data.images import (
    BadImageError,
    decode_jpegs,
    device_decodable,
    resize_to_tensor,
    sample_image_bytes,
)
from tasks.data.prefetch import RunAhead, default_decode_workers, ordered_map
from tasks.data.quarantine import QuarantineReport

logger = logging.getLogger(__name__)

#: Input units (files, or input-shard ranges) read ahead of the decoder: for shard ranges, the
#: one being decoded and the next.
RANGES_AHEAD = 2

#: Prepared batches waiting for the model.
BATCHES_AHEAD = 2


@dataclass
class InputBatch:
    """Samples ready for the model, and what happened to the inputs read since the last batch.

    Attributes:
        samples: the input samples (listing order), ``images_per_batch`` of them except in the
            last batch, which may be empty.
        images: their images, ``[N, 3, S, S]`` float in ``[0, 1]`` (pinned for a CUDA device;
            on the decoding device when decoded there), or ``None`` when there is no sample.
        report: reads, conversions and quarantined inputs since the previous batch; merging the
            batches' reports in order gives the report of a serial read.
    """

    samples: list[dict[str, Any]]
    images: torch.Tensor | None
    report: QuarantineReport = field(default_factory=QuarantineReport)


def decode_workers(config: BuildConfig, device: torch.device) -> int:
    """The configured decode workers, or the default: the cores per GPU (per core on CPU)."""
    if config.decode_workers is not None:
        return config.decode_workers
    accelerators = torch.cuda.device_count() if device.type == "cuda" else 1
    return default_decode_workers(accelerators)


def _label_problem(sample: dict[str, Any], num_classes: int) -> str | None:
    label_id = sample.get("cls")
    if not isinstance(label_id, int) or not 0 <= label_id < num_classes:
        return f"label out of range: {label_id!r} not in [0, {num_classes})"
    return None


@dataclass(frozen=True)
class _Encoded:
    """A JPEG left encoded for the device (its header already checked)."""

    data: bytes


def _decode_on(
    device: torch.device,
    samples: list[dict[str, Any]],
    images: list[torch.Tensor | _Encoded],
    size: int,
    report: QuarantineReport,
) -> tuple[list[dict[str, Any]], torch.Tensor | None]:
    """One batch on ``device``: its JPEGs decoded and resized there, its other images copied.

    A JPEG the device cannot decode is decoded on the host instead (nvjpeg does not take every
    JPEG libjpeg does, e.g. arithmetic coding), so decoding on the device never loses an image
    the host labels; one neither can decode is quarantined with the host's reason.
    """
    decoded = iter(decode_jpegs([i.data for i in images if isinstance(i, _Encoded)], device))
    kept: list[dict[str, Any]] = []
    tensors: list[torch.Tensor] = []
    for sample, image in zip(samples, images, strict=True):
        if isinstance(image, _Encoded):
            pixels = next(decoded)
            if isinstance(pixels, BadImageError):
                try:
                    image = _image_tensor(sample, size)
                except BadImageError as exc:
                    report.quarantine(str(sample.get("__key__")), exc.reason, stage="label")
                    continue
                logger.info(
                    "%s: decoded on the host (the device refused it: %s)",
                    sample.get("__key__"),
                    pixels.reason,
                )
            else:
                image = resize_to_tensor(pixels, size)
        kept.append(sample)
        tensors.append(image.to(device))
    return kept, torch.stack(tensors) if tensors else None


def _for_device(sample: dict[str, Any], size: int) -> torch.Tensor | _Encoded:
    """A sample's JPEG left encoded for the device, or its image decoded on the host."""
    _, data = sample_image_bytes(sample)
    return _Encoded(data) if device_decodable(data) else _image_tensor(sample, size)


def sample_images(
    samples: Sequence[dict[str, Any]], size: int, device: torch.device, *, decode: str = "host"
) -> torch.Tensor:
    """The samples' images on ``device`` as the labeller made them under ``decode``.

    For work on samples already labelled (extending a version): they decoded then, so a
    failure now is an error, not a quarantine.

    Raises:
        BadImageError: an image does not decode.
    """
    if decode != "device":
        return torch.stack([_image_tensor(s, size) for s in samples]).to(device)
    images = [_for_device(sample, size) for sample in samples]
    report = QuarantineReport()
    kept, stacked = _decode_on(device, list(samples), images, size, report)
    if report.quarantined:
        entry = report.quarantined[0]
        raise BadImageError(f"{entry.reason} (sample {entry.key})")
    assert stacked is not None and len(kept) == len(samples)
    return stacked


def _stack(images: Sequence[torch.Tensor], pin_memory: bool) -> torch.Tensor:
    if not pin_memory:
        return torch.stack(list(images))
    out = torch.empty((len(images), *images[0].shape), dtype=images[0].dtype, pin_memory=True)
    return torch.stack(list(images), out=out)


def _batches(
    config: BuildConfig,
    units: Sequence[str],
    num_classes: int,
    workers: int,
    pin_memory: bool,
    renames: Mapping[str, str] | None,
    decode_device: torch.device | None,
) -> Iterator[InputBatch]:
    read = unit_reader(config, renames)
    per_batch = config.label.images_per_batch
    size = config.image_size
    # Input-shard ranges are big (a whole input shard is read at once): two at a time at most.
    ranges = config.input_kind == "webdataset"
    readers = min(workers, RANGES_AHEAD) if ranges else workers
    units_ahead = RANGES_AHEAD if ranges else 4 * workers

    def fetched() -> Iterator[dict[str, Any] | QuarantineReport]:
        # A unit's report goes first, its samples after: the order a serial read records them.
        with contextlib.closing(
            ordered_map(read, units, workers=readers, ahead=units_ahead)
        ) as parts:
            for samples, part in parts:
                yield part
                yield from samples

    def prepare(
        item: dict[str, Any] | QuarantineReport,
    ) -> tuple[dict[str, Any] | QuarantineReport, torch.Tensor | _Encoded | str | None]:
        """``(item, image tensor, JPEG for the device or quarantine reason)``; reports pass."""
        if isinstance(item, QuarantineReport):
            return item, None
        problem = _label_problem(item, num_classes)
        if problem is not None:
            return item, problem
        try:
            if decode_device is not None:
                return item, _for_device(item, size)
            return item, _image_tensor(item, size)
        except BadImageError as exc:
            return item, exc.reason

    def batch(samples: list[dict[str, Any]], images: list[Any]) -> InputBatch:
        if decode_device is not None:
            samples, stacked = _decode_on(decode_device, samples, images, size, report)
            return InputBatch(samples, stacked, report)
        return InputBatch(samples, _stack(images, pin_memory) if images else None, report)

    report = QuarantineReport()
    samples: list[dict[str, Any]] = []
    images: list[torch.Tensor | _Encoded] = []
    with (
        contextlib.closing(fetched()) as stream,
        contextlib.closing(
            ordered_map(prepare, stream, workers=workers, ahead=max(4 * workers, per_batch))
        ) as prepared,
    ):
        for item, result in prepared:
            if isinstance(item, QuarantineReport):
                report.merge(item)
            elif isinstance(result, str):
                report.quarantine(str(item.get("__key__")), result, stage="label")
            else:
                samples.append(item)
                images.append(result)
                if len(samples) == per_batch:
                    yield batch(samples, images)
                    report, samples, images = QuarantineReport(), [], []
    yield batch(samples, images)


def input_batches(
    config: BuildConfig,
    units: Sequence[str],
    *,
    num_classes: int,
    workers: int = 1,
    pin_memory: bool = False,
    renames: Mapping[str, str] | None = None,
    decode_device: torch.device | None = None,
) -> contextlib.AbstractContextManager[Iterator[InputBatch]]:
    """The labelling batches of some units of the listing, prepared ahead when ``workers > 1``.

    Use as a context manager: leaving it (also by an exception) stops the readers and decoders
    and joins their threads. Samples whose label is not in ``[0, num_classes)`` or whose image
    does not decode are quarantined at stage ``"label"``, as the labeller always did.

    Args:
        config: the build.
        units: units of the listing, in order (:meth:`BuildPlan.shard_units`).
        num_classes: classes of the explained model.
        workers: threads that read and decode (1: all inline in the caller's thread).
        pin_memory: stack the images in pinned memory (for non-blocking copies to a GPU).
        renames: new keys of repeated WebDataset input keys (:attr:`BuildPlan.renamed_keys`).
        decode_device: decode and resize the JPEGs there, a batch at a time (None: on the
            host, by the threads).
    """
    if workers <= 1:
        return contextlib.closing(
            _batches(config, units, num_classes, 1, pin_memory, renames, decode_device)
        )
    return RunAhead(
        lambda: _batches(config, units, num_classes, workers, pin_memory, renames, decode_device),
        depth=BATCHES_AHEAD,
        name="input-batches",
    )

"""The labeller's input: batches of samples and decoded images, prepared ahead of the model.

Four steps overlap when ``workers > 1``: reading units (input files, or input-shard ranges, the
next one fetched while the current one is decoded), decoding and resizing images (a pool of
threads: Pillow releases the GIL while it works), stacking a batch (into pinned memory for a
CUDA device), and, in the caller, the model. Each step is bounded, so memory is a few batches
and the input units in flight, never a whole output shard.

Nothing about the result depends on the number of workers: samples come in listing order, bad
inputs are quarantined with the same reasons, and the quarantine entries are handed over in
the order a serial read makes them (each batch carries what happened since the previous one).
``workers == 1`` runs every step inline in the caller's thread, like the labeller always did.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tasks.build_dataset.config import BuildConfig
from tasks.build_dataset.inputs import _image_tensor, unit_reader
from tasks.data.images import BadImageError
from tasks.data.prefetch import RunAhead, default_decode_workers, ordered_map
from tasks.data.quarantine import QuarantineReport

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
        images: their images, ``[N, 3, S, S]`` float in ``[0, 1]`` (pinned for a CUDA device),
            or ``None`` when there is no sample.
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
    ) -> tuple[dict[str, Any] | QuarantineReport, torch.Tensor | str | None]:
        """``(item, image tensor or quarantine reason)``; reports pass through."""
        if isinstance(item, QuarantineReport):
            return item, None
        problem = _label_problem(item, num_classes)
        if problem is not None:
            return item, problem
        try:
            return item, _image_tensor(item, size)
        except BadImageError as exc:
            return item, exc.reason

    report = QuarantineReport()
    samples: list[dict[str, Any]] = []
    images: list[torch.Tensor] = []
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
                    yield InputBatch(samples, _stack(images, pin_memory), report)
                    report, samples, images = QuarantineReport(), [], []
    yield InputBatch(samples, _stack(images, pin_memory) if images else None, report)


def input_batches(
    config: BuildConfig,
    units: Sequence[str],
    *,
    num_classes: int,
    workers: int = 1,
    pin_memory: bool = False,
    renames: Mapping[str, str] | None = None,
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
    """
    if workers <= 1:
        return contextlib.closing(_batches(config, units, num_classes, 1, pin_memory, renames))
    return RunAhead(
        lambda: _batches(config, units, num_classes, workers, pin_memory, renames),
        depth=BATCHES_AHEAD,
        name="input-batches",
    )

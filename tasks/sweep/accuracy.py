"""Accuracy on a target's whole split: forward passes only, on more images than the reference.

A Kernel SHAP reference costs hundreds of model evaluations per image, so it holds a subset of a
split; accuracy costs one forward pass per image, so it is measured on the whole split of the
target's exported data (``TargetSpec.accuracy_data``), where one image is a small fraction of a
point. The split is read with the same streaming reader as fine-tuning's validation
(:func:`tasks.data.stream.list_split`, :class:`~tasks.data.stream.OrderedStream`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from tasks.data.stream import Batch, Decoder, OrderedStream, SplitShards, list_split
from tasks.model import SelfExplainingCLIP
from tasks.sweep.split_cache import cached_batches

logger = logging.getLogger(__name__)


@dataclass
class AccuracyData:
    """One split of a labelled dataset folder, streamed in shard order for accuracy.

    A split of at most ``cache_images`` samples is decoded once and kept (a sweep reads it once
    per lambda); a larger one is streamed again each time.

    Attributes:
        shards: the split's complete shards.
        image_size: side the images are resized to (the model's).
        limit: read only the first ``limit`` samples (None: all).
        cache_images: largest split kept in memory once decoded.
    """

    shards: SplitShards
    image_size: int
    limit: int | None = None
    cache_images: int = 4096
    _cache: dict[int, list[Batch]] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        total = self.shards.samples
        return total if self.limit is None else min(self.limit, total)

    def batches(self, size: int) -> Iterator[Batch]:
        """Consecutive batches of at most ``size`` samples (images and labels), in shard order."""
        decoder = Decoder(self.image_size, targets="no", where=self.shards.uri)
        yield from cached_batches(
            self._cache,
            size,
            lambda: OrderedStream(self.shards, decoder, batch_size=size, limit=self.limit).loader(),
            keep=len(self) <= self.cache_images,
        )


def load_accuracy_data(
    uri: str,
    split: str,
    *,
    name: str | None = None,
    image_size: int,
    max_images: int | None = None,
) -> AccuracyData:
    """Open the split ``split`` of the dataset folder ``uri`` for accuracy (reads no shard).

    Args:
        uri: the dataset folder (a target's exported WebDataset data).
        split: ``"val"`` or ``"test"``.
        name: the shards' dataset name (None: the only one with shards of ``split``).
        image_size: side the images are resized to.
        max_images: keep only the first samples in shard order.

    Raises:
        ValueError: no complete shard of the split.
    """
    data = AccuracyData(list_split(uri, split, name), image_size, limit=max_images)
    logger.info("accuracy data %s (%s): %d images", uri, split, len(data))
    return data


def accuracy_data_fingerprint(uri: str, name: str | None) -> str:
    """What the accuracy of a folder's val and test splits depends on: their shards' content
    (:meth:`SplitShards.content`).

    Raises:
        FileNotFoundError: the folder holds no complete shard of val or test (it is gone).
    """
    parts: list[Any] = []
    for split in ("val", "test"):
        try:
            parts.extend(list_split(uri, split, name).content())
        except ValueError as exc:
            raise FileNotFoundError(f"no accuracy data of {split} at {uri}: {exc}") from exc
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def measure_accuracy(
    sem: SelfExplainingCLIP, data: AccuracyData, *, batch_size: int = 256
) -> dict[str, Any]:
    """The model's top-1 accuracy over the whole split: one forward pass per image.

    Args:
        sem: the model, in its current (possibly edited) weights.
        data: the split.
        batch_size: images per forward pass.

    Returns:
        ``{"accuracy": fraction, "images": count, "correct": [1.0 | 0.0 per image, in order]}``.

    Raises:
        ValueError: a label outside the model's classes.
    """
    was_training = sem.training
    sem.eval()
    classifier = sem.as_classifier().eval()
    device = sem.class_embeddings.device
    classes = int(sem.class_embeddings.shape[0])
    correct: list[torch.Tensor] = []
    for batch in data.batches(batch_size):
        if batch.labels.numel() and int(batch.labels.max()) >= classes:
            raise ValueError(
                f"accuracy data {data.shards.uri}: label {int(batch.labels.max())} outside the "
                f"model's {classes} classes"
            )
        logits = classifier(batch.images.to(device))
        correct.append((logits.argmax(dim=1).cpu() == batch.labels).double())
    sem.train(was_training)
    values = torch.cat(correct) if correct else torch.zeros(0, dtype=torch.float64)
    total = int(values.numel())
    return {
        "accuracy": float(values.mean()) if total else float("nan"),
        "images": total,
        "correct": values.tolist(),
    }

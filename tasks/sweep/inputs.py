"""What a sweep reads: the vector, each target model theta_T and its Kernel SHAP references.

Each input is read through :mod:`storage` and checked against the others before any
evaluation: the vector against theta_T (keys, shapes, pretrained base), each reference against
theta_T (grid, explained model, classes, image size). The fingerprints here tie stored rows to
the *content* of the inputs, not only to their URIs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from storage import layout, open_file, open_storage
from storage.checkpoints import checkpoint_fingerprint
from tasks.algorithms.vectors import ExplainabilityVector
from tasks.config import resolve_device
from tasks.data.stream import Batch, Decoder, OrderedStream, SplitShards, first_sample, list_split
from tasks.model import SelfExplainingCLIP, load_sem
from tasks.model.loading import weights_uri
from tasks.sweep.accuracy import accuracy_data_fingerprint
from tasks.sweep.config import SweepConfig, TargetSpec
from tasks.sweep.split_cache import cached_batches

logger = logging.getLogger(__name__)


def load_vector(uri: str) -> ExplainabilityVector:
    """Read the explainability vector stored at ``uri`` (a ``.safetensors`` file URI)."""
    storage, key = open_file(uri)
    return ExplainabilityVector.load(storage, key)


@dataclass
class EvalData:
    """One split of a target's Kernel SHAP reference, streamed from its shards batch by batch.

    Batches come in shard order (the X-dataset builder keeps its input's order). A split of at
    most ``cache_images`` samples is decoded once and kept, since a sweep reads each split once
    per lambda; a larger one is streamed again each time, so memory never holds a large split.

    Attributes:
        uri: the reference dataset version folder.
        split: the split's name.
        shards: the split's complete shards.
        image_size: side the images are resized to.
        grid: ``(gh, gw)`` of the reference maps.
        has_masks: whether the samples carry object masks.
        class_names: the classes of the explained model's head.
        model_fingerprint: fingerprint of the model the reference explains.
        baseline_mean: the stored per-channel dataset mean (empty when not stored).
        label_seed: the global seed of the reference's labelling.
        budget: the reference's Kernel SHAP budget.
        limit: read only the first ``limit`` samples (None: all).
        cache_images: largest split kept in memory once decoded.
        num_workers: ``DataLoader`` decoding workers of a streamed pass.
    """

    uri: str
    split: str
    shards: SplitShards
    image_size: int
    grid: tuple[int, int]
    has_masks: bool
    class_names: list[str]
    model_fingerprint: str
    baseline_mean: list[float]
    label_seed: int
    budget: int
    limit: int | None = None
    cache_images: int = 4096
    num_workers: int = 0
    _cache: dict[int, list[Batch]] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        total = self.shards.samples
        return total if self.limit is None else min(self.limit, total)

    def _stream(self, size: int, limit: int | None) -> OrderedStream:
        decoder = Decoder(
            self.image_size,
            targets="require",
            masks=self.has_masks,
            grid=self.grid,
            check_classes=True,
            where=self.uri,
        )
        return OrderedStream(
            self.shards, decoder, batch_size=size, limit=limit, num_workers=self.num_workers
        )

    def batches(self, size: int) -> Iterator[Batch]:
        """Consecutive batches of at most ``size`` samples, in shard order."""
        yield from cached_batches(
            self._cache,
            size,
            lambda: self._stream(size, self.limit).loader(),
            keep=len(self) <= self.cache_images,
        )

    def first(self, n: int) -> EvalData:
        """The same split limited to its first ``n`` samples (its own cache)."""
        limit = n if self.limit is None else min(n, self.limit)
        return dataclasses.replace(self, limit=limit, _cache={})

    def head(self, n: int) -> Batch:
        """The first ``n`` samples as one batch."""
        limit = n if self.limit is None else min(n, self.limit)
        return next(iter(self._stream(max(1, limit), limit).loader()))

    def channel_mean(self) -> list[float]:
        """The per-channel mean of the split's images (one streamed pass)."""
        total, count = torch.zeros(3, dtype=torch.float64), 0
        for batch in self.batches(256):
            total += batch.images.double().mean(dim=(2, 3)).sum(dim=0)
            count += len(batch.keys)
        return (total / max(1, count)).tolist()


def has_reference(uri: str) -> bool:
    """Whether ``uri`` is an explanation dataset version (it holds its ``config.json``)."""
    return open_storage(uri).exists(layout.DATASET_CONFIG_FILE)


def load_reference(
    uri: str, *, image_size: int | None = None, max_images: int | None = None
) -> EvalData:
    """Open a Kernel SHAP reference (an X-dataset version folder) for streaming.

    Reads the listing and the first sample (its grid and fields); the samples are decoded
    batch by batch when evaluated.

    Args:
        uri: the version folder (holding ``config.json`` and complete shards).
        image_size: side the images are resized to (None: the labelling's image size).
        max_images: keep only the first samples in shard order.

    Raises:
        ValueError: no ``config.json``, no complete shard, or a sample without ``shap.npy`` or
            whose first explained class is not its label (found when it is read).
    """
    storage = open_storage(uri)
    if not storage.exists(layout.DATASET_CONFIG_FILE):
        raise ValueError(f"{uri} is not an explanation dataset version (no config.json)")
    meta = storage.read_json(layout.DATASET_CONFIG_FILE)
    build = meta["config"]
    name, split = build["name"], build["split"]
    size = int(image_size or build.get("image_size", 56))
    try:
        shards = list_split(storage.uri, split, name)
    except ValueError as exc:
        raise ValueError(f"reference {uri} has no complete shard of {name}-{split}") from exc
    first = first_sample(shards)
    if "shap.npy" not in first:
        raise ValueError(f"reference {uri}: sample {first['__key__']} has no shap.npy")
    phi = np.load(io.BytesIO(first["shap.npy"]), allow_pickle=False)
    label = build.get("label", {})
    data = EvalData(
        uri=storage.uri,
        split=split,
        shards=shards,
        image_size=size,
        grid=(int(phi.shape[1]), int(phi.shape[2])),
        has_masks="mask.png" in first,
        class_names=list(meta.get("class_names", [])),
        model_fingerprint=str(meta.get("model_fingerprint", "")),
        baseline_mean=[float(v) for v in meta.get("baseline_mean") or []],
        label_seed=int(label.get("seed", 0)),
        budget=int(label.get("budget", 0)),
        limit=max_images,
    )
    logger.info("reference %s (%s): %d images, grid %s", uri, split, len(data), data.grid)
    return data


@dataclass
class TargetModel:
    """theta_T loaded for a sweep.

    Attributes:
        sem: the self-explaining model with the target's head, on its device.
        state: theta_T's open_clip state dict (CPU), what the vector is applied to.
        fingerprint: theta_T's fingerprint.
        base_fingerprint: fingerprint of the pretrained base theta_T was fine-tuned from.
        class_names: the head's classes.
        uri: where theta_T was read.
    """

    sem: SelfExplainingCLIP
    state: dict[str, Tensor]
    fingerprint: str
    base_fingerprint: str | None
    class_names: list[str]
    uri: str

    def load_lambda(self, vector: ExplainabilityVector, coef: float, **checks: Any) -> None:
        """Set the SEM's weights to theta_T + coef * tau (``checks`` go to ``apply_to``)."""
        edited = vector.apply_to(self.state, coef, base_fingerprint=self.base_fingerprint, **checks)
        self.sem.clip.load_state_dict(edited, strict=True)


def load_target(spec: TargetSpec, grid: int, device: str = "cpu") -> TargetModel:
    """Load theta_T (a fine-tuned model and its sidecar) as a SEM with a ``grid`` x ``grid`` map.

    Args:
        spec: the target.
        grid: attribution grid side.
        device: where the SEM runs.
    """
    # Loaded on the device (the head's text tower runs there); the state the vector is
    # applied to is a copy on the CPU.
    loaded = load_sem(
        spec.model,
        class_names=spec.class_names,
        domain=spec.domain,
        grid=(grid, grid),
        device=resolve_device(device),
    )
    state = {k: v.detach().to("cpu", copy=True) for k, v in loaded.sem.clip.state_dict().items()}
    return TargetModel(
        sem=loaded.sem.eval(),
        state=state,
        fingerprint=loaded.fingerprint,
        base_fingerprint=loaded.base_fingerprint,
        class_names=loaded.class_names,
        uri=spec.model,
    )


def _head(config: SweepConfig, spec: TargetSpec) -> Tensor:
    """The class embeddings the SEM of ``spec``'s model reads its maps through."""
    grid = (config.grid, config.grid)
    loaded = load_sem(
        spec.model,
        class_names=spec.class_names,
        domain=spec.domain,
        grid=grid,
        device=resolve_device(config.device),
    )
    return loaded.sem.class_embeddings.cpu()


def source_direction(config: SweepConfig) -> Tensor | None:
    """s: the normalised mean of the source's class embeddings (None without a ``source``
    role, or with several)."""
    sources = [spec for spec in config.targets if spec.role == "source"]
    if len(sources) != 1:
        return None
    return torch.nn.functional.normalize(_head(config, sources[0]).mean(dim=0), dim=0)


def head_alignment(config: SweepConfig) -> dict[str, float]:
    """alpha of each transfer target: how its head reads what theta_X learned on the source's.

    The SEM's map for class c is the cosine of each patch token with the class embedding t_c.
    With s the normalised mean of the source's class embeddings (:func:`source_direction`, the
    only direction the source's head shows theta_X), t_c = alpha_c s + r_c, and whatever the
    vector does to patch tokens along s reaches a target's maps scaled by alpha_c: a negative
    mean alpha turns a transferred map around. A real CLIP's prompts share a large common
    component, so alpha is positive between its domains; a text tower trained on a few prompts
    alone need not be.

    Heads come from each model's own text tower (fine-tuning trains the image encoder only, so
    they are the base's).

    Returns:
        target domain -> the mean over its classes of ``t_c . s``; empty when the sweep has no
        ``source`` role (nothing to read s from).
    """
    s = source_direction(config)
    if s is None:
        return {}
    return {
        spec.domain: float((_head(config, spec) @ s).mean())
        for spec in config.targets
        if spec.role == "target"
    }


def check_vector(
    vector: ExplainabilityVector, target: TargetModel, *, allow_different_base: bool = False
) -> None:
    """Refuse a vector that does not fit theta_T: other keys, shapes or pretrained base.

    Raises:
        ValueError: with the reason (``apply_to``'s own checks).
    """
    if target.base_fingerprint is None and not allow_different_base:
        raise ValueError(
            f"target model {target.uri} records no base fingerprint: cannot check that the "
            "vector shares its pretrained base (set allow_different_base to apply it anyway)"
        )
    # Coefficient 0 runs every key, shape and base check without computing anything.
    vector.apply_to(
        target.state,
        0.0,
        base_fingerprint=target.base_fingerprint,
        allow_different_base=allow_different_base,
    )


def check_reference(data: EvalData, target: TargetModel, spec: TargetSpec, grid: int) -> None:
    """Refuse a reference that does not explain theta_T on the sweep's grid.

    Raises:
        ValueError: another grid, explained model, class list or image size.
    """
    where = f"target {spec.domain!r}, reference {data.uri}"
    if data.grid != (grid, grid):
        raise ValueError(f"{where}: reference grid {data.grid} is not the sweep grid {grid}x{grid}")
    if data.model_fingerprint and data.model_fingerprint != target.fingerprint:
        raise ValueError(
            f"{where}: the reference explains model {data.model_fingerprint}, not theta_T "
            f"{target.fingerprint} ({target.uri})"
        )
    if data.class_names and data.class_names != target.class_names:
        raise ValueError(
            f"{where}: reference classes {data.class_names} differ from the head's "
            f"{target.class_names}"
        )
    size = target.sem.clip.visual.image_size
    size = size if isinstance(size, int) else size[0]
    if data.image_size != size:
        raise ValueError(f"{where}: images are {data.image_size} px, the model takes {size}")


def _digest(parts: list[str]) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:16]


def target_fingerprint(config: SweepConfig, target: str) -> str:
    """What a target's rows depend on: its settings and the content of the vector and theta_T.

    URIs alone would not do: a vector or model rewritten in place must not reuse stale rows.
    (Reference datasets are versioned by content already, so their URIs suffice; the accuracy
    data, re-exported in place, counts by its shards' completion markers.)
    """
    spec = config.target(target)
    parts = [
        config.result_fingerprint(target=target),
        checkpoint_fingerprint(config.vector),
        checkpoint_fingerprint(weights_uri(spec.model)),
    ]
    if spec.accuracy_data is not None:
        parts.append(accuracy_data_fingerprint(spec.accuracy_data, spec.accuracy_name))
    return _digest(parts)


def inputs_fingerprint(config: SweepConfig) -> str:
    """What the whole sweep's rows depend on: every target's :func:`target_fingerprint`."""
    return _digest([target_fingerprint(config, spec.domain) for spec in config.targets])

"""What a sweep reads: the vector, each target model theta_T and its Kernel SHAP references.

Each input is read through :mod:`storage` and checked against the others before any
evaluation: the vector against theta_T (keys, shapes, pretrained base), each reference against
theta_T (grid, explained model, classes, image size). The fingerprints here tie stored rows to
the *content* of the inputs, not only to their URIs.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from storage import layout, open_file, open_storage
from storage.checkpoints import checkpoint_fingerprint
from storage.shards import complete_shards, read_shard
from tasks.algorithms.vectors import ExplainabilityVector
from tasks.config import resolve_device
from tasks.data.images import sample_to_tensor
from tasks.model import SelfExplainingCLIP, load_sem
from tasks.model.loading import weights_uri
from tasks.sweep.config import SweepConfig, TargetSpec

logger = logging.getLogger(__name__)


def load_vector(uri: str) -> ExplainabilityVector:
    """Read the explainability vector stored at ``uri`` (a ``.safetensors`` file URI)."""
    storage, key = open_file(uri)
    return ExplainabilityVector.load(storage, key)


@dataclass
class EvalData:
    """One split of a target's Kernel SHAP reference, held in memory and sorted by key.

    Attributes:
        uri: the reference dataset version folder.
        split: the split's name.
        keys: sample keys, sorted.
        images: ``[N, 3, s, s]`` uint8 images.
        labels: ``[N]`` int64 labels.
        reference: ``[N, gh, gw]`` float32 Kernel SHAP maps of the label class.
        masks: ``[N, s, s]`` bool object masks, or None when the domain has none.
        class_names: the classes of the explained model's head.
        model_fingerprint: fingerprint of the model the reference explains.
        baseline_mean: the stored per-channel dataset mean (empty when not stored).
        label_seed: the global seed of the reference's labelling.
        budget: the reference's Kernel SHAP budget.
    """

    uri: str
    split: str
    keys: list[str]
    images: Tensor
    labels: Tensor
    reference: Tensor
    masks: Tensor | None
    class_names: list[str]
    model_fingerprint: str
    baseline_mean: list[float]
    label_seed: int
    budget: int

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def grid(self) -> tuple[int, int]:
        """``(gh, gw)`` of the reference maps."""
        return tuple(self.reference.shape[1:])

    def batches(self, size: int) -> Iterator[slice]:
        """Consecutive slices of at most ``size`` samples."""
        for start in range(0, len(self), size):
            yield slice(start, min(start + size, len(self)))

    def float_images(self, index: slice) -> Tensor:
        """The images at ``index`` in ``[0, 1]``."""
        return self.images[index].float().div_(255.0)


def _decode_mask(data: bytes, size: int) -> Tensor:
    mask = Image.open(io.BytesIO(data)).convert("L")
    if mask.size != (size, size):
        mask = mask.resize((size, size), Image.Resampling.NEAREST)
    return torch.from_numpy(np.asarray(mask) > 127)


def has_reference(uri: str) -> bool:
    """Whether ``uri`` is an explanation dataset version (it holds its ``config.json``)."""
    return open_storage(uri).exists(layout.DATASET_CONFIG_FILE)


def load_reference(
    uri: str, *, image_size: int | None = None, max_images: int | None = None
) -> EvalData:
    """Read a Kernel SHAP reference (an X-dataset version folder) into memory.

    Args:
        uri: the version folder (holding ``config.json`` and complete shards).
        image_size: side the images are resized to (None: the labelling's image size).
        max_images: keep only the first samples by key.

    Raises:
        ValueError: no ``config.json``, no complete shard, or a sample without ``shap.npy`` or
            whose first explained class is not its label.
    """
    storage = open_storage(uri)
    if not storage.exists(layout.DATASET_CONFIG_FILE):
        raise ValueError(f"{uri} is not an explanation dataset version (no config.json)")
    meta = storage.read_json(layout.DATASET_CONFIG_FILE)
    build = meta["config"]
    name, split = build["name"], build["split"]
    size = int(image_size or build.get("image_size", 56))
    shard_keys = complete_shards(storage, name, split)
    if not shard_keys:
        raise ValueError(f"reference {uri} has no complete shard of {name}-{split}")
    samples: dict[str, tuple[Tensor, int, np.ndarray, Tensor | None]] = {}
    for shard_key in shard_keys:
        for sample in read_shard(storage, shard_key):
            key = sample["__key__"]
            if "shap.npy" not in sample:
                raise ValueError(f"reference {uri}: sample {key} has no shap.npy")
            phi = np.load(io.BytesIO(sample["shap.npy"]), allow_pickle=False)
            info = sample.get("json")
            info = json.loads(info) if isinstance(info, bytes | str) else (info or {})
            classes = info.get("classes")
            if classes and int(classes[0]) != int(sample["cls"]):
                raise ValueError(
                    f"reference {uri}: sample {key} explains class {classes[0]} first, "
                    f"not its label {sample['cls']}"
                )
            mask = _decode_mask(sample["mask.png"], size) if "mask.png" in sample else None
            image = (sample_to_tensor(sample, size) * 255.0).round().to(torch.uint8)
            samples[key] = (image, int(sample["cls"]), phi[0].astype(np.float32), mask)
    keys = sorted(samples)[:max_images]
    masks = [samples[k][3] for k in keys]
    label = build.get("label", {})
    data = EvalData(
        uri=storage.uri,
        split=split,
        keys=keys,
        images=torch.stack([samples[k][0] for k in keys]),
        labels=torch.tensor([samples[k][1] for k in keys], dtype=torch.int64),
        reference=torch.from_numpy(np.stack([samples[k][2] for k in keys])),
        masks=torch.stack(masks) if all(m is not None for m in masks) else None,
        class_names=list(meta.get("class_names", [])),
        model_fingerprint=str(meta.get("model_fingerprint", "")),
        baseline_mean=[float(v) for v in meta.get("baseline_mean") or []],
        label_seed=int(label.get("seed", 0)),
        budget=int(label.get("budget", 0)),
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
    # Loaded on the CPU first: the state the vector is applied to stays there.
    loaded = load_sem(
        spec.model, class_names=spec.class_names, domain=spec.domain, grid=(grid, grid)
    )
    state = {k: v.detach().clone() for k, v in loaded.sem.clip.state_dict().items()}
    return TargetModel(
        sem=loaded.sem.to(resolve_device(device)).eval(),
        state=state,
        fingerprint=loaded.fingerprint,
        base_fingerprint=loaded.base_fingerprint,
        class_names=loaded.class_names,
        uri=spec.model,
    )


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
    if data.images.shape[-1] != size:
        raise ValueError(f"{where}: images are {data.images.shape[-1]} px, the model takes {size}")


def _digest(parts: list[str]) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:16]


def target_fingerprint(config: SweepConfig, target: str) -> str:
    """What a target's rows depend on: its settings and the content of the vector and theta_T.

    URIs alone would not do: a vector or model rewritten in place must not reuse stale rows.
    (Reference datasets are versioned by content already, so their URIs suffice.)
    """
    spec = config.target(target)
    return _digest(
        [
            config.result_fingerprint(target=target),
            checkpoint_fingerprint(config.vector),
            checkpoint_fingerprint(weights_uri(spec.model)),
        ]
    )


def inputs_fingerprint(config: SweepConfig) -> str:
    """What the whole sweep's rows depend on: every target's :func:`target_fingerprint`."""
    return _digest([target_fingerprint(config, spec.domain) for spec in config.targets])

"""Stage 4: the transfer sweep, theta_T + lambda * tau_X over targets and lambdas (DESIGN.md).

For every target domain the target model theta_T (fine-tuned for prediction only from the same
pretrained base as the vector) is edited with each lambda of a grid and evaluated on the target's
validation and test splits: accuracy, and the quality of the self-explaining model's single-pass
attributions for the label class (agreement with a Kernel SHAP reference of theta_T, insertion
and deletion AUC with the edited model itself, pointing game where object masks exist). Kernel
SHAP explanations of theta_T at several budgets are evaluated the same way, as the baseline that
costs ``budget`` model inferences per image instead of one. lambda is selected on validation:
the best explanation quality whose accuracy is at most ``accuracy_tolerance`` points below
lambda = 0.

The work is split so that an orchestrator can run one target per task:

1. :func:`validate_sweep` loads the vector and every target model and refuses mismatched keys,
   shapes or pretrained bases before any evaluation;
2. :func:`sweep_target` evaluates one target, selects its lambda, writes its rows and heatmaps
   (skipped when its completion marker exists for the same settings);
3. :func:`assemble_sweep` writes the table, the plot and the summary, then the completion
   marker of the whole sweep.

:func:`run_sweep` runs the three in turn. Outputs live under ``{output_uri}/sweeps/{name}/``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from storage import Storage, open_storage
from storage.shards import complete_shards, read_shard
from tasks.algorithms.kernel_shap import blur_baseline, derive_seed, kernel_shap_explain
from tasks.algorithms.metrics import accuracy, explanation_quality
from tasks.algorithms.vectors import ExplainabilityVector
from tasks.config import Device, StageConfig, resolve_device
from tasks.data.images import sample_to_tensor
from tasks.model import SelfExplainingCLIP, model_fingerprint, zero_shot_head

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]

RESULTS_FILE = "results.parquet"
PLOT_FILE = "sweep.png"
SUMMARY_FILE = "summary.json"
RESULTS_UNIT = "results"
QUALITY_METRICS = ("pearson", "spearman", "topk", "insertion_auc", "deletion_auc", "pointing")
# Lower is better for these; every other quality metric is "higher is better".
LOWER_IS_BETTER = frozenset({"deletion_auc"})
# Settings that change where or how fast the sweep runs, never its numbers.
_RESULT_NEUTRAL_FIELDS = ("device", "batch_size", "forward_batch_size", "output_uri", "name")

TABLE_SCHEMA = pa.schema(
    [
        ("target", pa.string()),
        ("related", pa.bool_()),
        ("method", pa.string()),
        ("lambda", pa.float64()),
        ("inferences", pa.int64()),
        ("split", pa.string()),
        ("images", pa.int64()),
        ("accuracy", pa.float64()),
        ("pearson", pa.float64()),
        ("spearman", pa.float64()),
        ("topk", pa.float64()),
        ("insertion_auc", pa.float64()),
        ("deletion_auc", pa.float64()),
        ("pointing", pa.float64()),
        ("chosen", pa.bool_()),
    ]
)


class TargetSpec(StageConfig):
    """One target domain of a sweep.

    Attributes:
        domain: the target domain's name (the ``target`` column of the table).
        model: URI of theta_T's ``model.safetensors`` or of its fine-tuning run directory.
        class_names: the head's classes in label order (None: from theta_T's fine-tuning config,
            else the synthetic domain's).
        val_reference: URI of the X-dataset version folder holding the Kernel SHAP reference of
            theta_T on the validation split.
        test_reference: the same for the test split.
        related: whether the domain is related to the source (informational, kept in the table).
    """

    domain: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    model: str
    class_names: tuple[str, ...] | None = None
    val_reference: str
    test_reference: str
    related: bool = True


class SweepConfig(StageConfig):
    """Configuration of one transfer sweep.

    Attributes:
        name: the sweep's name; outputs go to ``{output_uri}/sweeps/{name}/``.
        vector: URI of the explainability vector (``.safetensors`` with its sidecar).
        targets: the target domains.
        lambdas: the scales of the vector; finite, increasing, 0 included.
        kernel_shap_budgets: Kernel SHAP budgets (model inferences per image) of the baseline.
        kernel_shap_splits: splits the Kernel SHAP baseline is evaluated on.
        accuracy_tolerance: largest accepted validation accuracy drop from lambda = 0, in
            accuracy points (1.0 = one percentage point).
        selection_metric: the explanation-quality metric lambda is selected on.
        topk: cells of the top-k overlap.
        grid: attribution grid side (``grid x grid`` cells); must match the references.
        baseline: what a removed cell shows, for Kernel SHAP and insertion/deletion: ``"mean"``
            (the reference dataset's stored per-channel mean), ``"zero"`` or ``"blur"``.
        output: the value Kernel SHAP explains (``"logit"`` or ``"prob"``).
        auc_output: the score insertion/deletion curves follow (``"prob"``: AUCs in [0, 1]).
        auc_steps: insertion/deletion steps (None: one cell per step).
        seed: seeds the Kernel SHAP baseline (always different coalitions from the reference's).
        heatmap_images: test images drawn in the heatmap figure of each target.
        max_images: cap on the images read per split (the first by key; None: all).
        batch_size: images per SEM forward pass and per evaluation chunk.
        forward_batch_size: masked inputs per model call (Kernel SHAP, insertion/deletion).
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda[:i]"``.
        output_uri: root of the outputs.
        allow_different_base: apply the vector to a theta_T from another pretrained base.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    vector: str
    targets: tuple[TargetSpec, ...] = Field(min_length=1)
    lambdas: tuple[float, ...] = tuple(i * 0.25 for i in range(9))
    kernel_shap_budgets: tuple[int, ...] = (25, 50, 100, 150, 300)
    kernel_shap_splits: tuple[Literal["val", "test"], ...] = ("test",)
    accuracy_tolerance: float = Field(1.0, ge=0)
    selection_metric: Literal[
        "pearson", "spearman", "topk", "insertion_auc", "deletion_auc", "pointing"
    ] = "pearson"
    topk: int = Field(5, ge=1)
    grid: int = Field(7, ge=1)
    baseline: Literal["mean", "zero", "blur"] = "mean"
    output: Literal["logit", "prob"] = "logit"
    auc_output: Literal["logit", "prob"] = "prob"
    auc_steps: int | None = Field(None, ge=1)
    seed: int = Field(0, ge=0)
    heatmap_images: int = Field(6, ge=0)
    max_images: int | None = Field(None, ge=1)
    batch_size: int = Field(64, ge=1)
    forward_batch_size: int = Field(1024, ge=1)
    device: Device = "auto"
    output_uri: str
    allow_different_base: bool = False

    @field_validator("lambdas")
    @classmethod
    def _check_lambdas(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value:
            raise ValueError("lambdas is empty")
        if not all(math.isfinite(v) for v in value):
            raise ValueError(f"lambdas must be finite, got {value}")
        if any(b <= a for a, b in zip(value, value[1:], strict=False)):
            raise ValueError(f"lambdas must be strictly increasing, got {value}")
        if 0.0 not in value:
            raise ValueError(
                "lambdas must include 0.0 (the prediction-only target is the baseline)"
            )
        return value

    @field_validator("kernel_shap_budgets")
    @classmethod
    def _check_budgets(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(b < 2 for b in value):
            raise ValueError(
                f"Kernel SHAP budgets count empty and full coalitions: >= 2, got {value}"
            )
        if len(set(value)) != len(value):
            raise ValueError(f"Kernel SHAP budgets repeat: {value}")
        return tuple(sorted(value))

    @model_validator(mode="after")
    def _check_targets(self) -> SweepConfig:
        domains = [t.domain for t in self.targets]
        repeated = sorted({d for d in domains if domains.count(d) > 1})
        if repeated:
            raise ValueError(f"targets repeat domains: {repeated}")
        if self.topk > self.grid * self.grid:
            raise ValueError(f"topk {self.topk} exceeds the {self.grid * self.grid} grid cells")
        if self.auc_steps is not None and self.auc_steps > self.grid * self.grid:
            raise ValueError(f"auc_steps {self.auc_steps} exceeds the grid cells")
        return self

    def target(self, domain: str) -> TargetSpec:
        """The target spec of ``domain``.

        Raises:
            KeyError: no target has that domain.
        """
        for spec in self.targets:
            if spec.domain == domain:
                return spec
        raise KeyError(f"sweep {self.name!r} has no target {domain!r}")

    def result_fingerprint(self, *, target: str | None = None) -> str:
        """Fingerprint of what determines the numbers (of one target's rows when given)."""
        fields = self.to_dict()
        for name in _RESULT_NEUTRAL_FIELDS:
            fields.pop(name)
        if target is not None:
            fields.pop("heatmap_images")
            fields["targets"] = [self.target(target).to_dict()]
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def sweep_storage(config: SweepConfig) -> Storage:
    """Where a sweep's outputs live: ``{output_uri}/sweeps/{name}``."""
    return open_storage(config.output_uri).child(f"sweeps/{config.name}")


def _split_file_uri(uri: str) -> tuple[str, str]:
    """(parent URI, file name) of a file URI, for :func:`storage.open_storage`."""
    parent, _, name = str(uri).rstrip("/").rpartition("/")
    if not name:
        raise ValueError(f"not a file URI: {uri!r}")
    return parent or ".", name


def load_vector(uri: str) -> ExplainabilityVector:
    """Read the explainability vector stored at ``uri`` (a ``.safetensors`` file URI)."""
    parent, key = _split_file_uri(uri)
    return ExplainabilityVector.load(open_storage(parent), key)


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
    if not storage.exists("config.json"):
        raise ValueError(f"{uri} is not an explanation dataset version (no config.json)")
    meta = storage.read_json("config.json")
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


def _class_names(spec: TargetSpec, finetune_config: Any) -> list[str]:
    if spec.class_names is not None:
        return list(spec.class_names)
    if finetune_config.class_names is not None:
        return list(finetune_config.class_names)
    from tasks.data.synthetic import SYNTHETIC_DOMAINS

    domain = SYNTHETIC_DOMAINS.get(spec.domain) or SYNTHETIC_DOMAINS.get(finetune_config.domain)
    if domain is None:
        raise ValueError(f"target {spec.domain!r} is not a synthetic domain: set class_names")
    return list(domain.class_names)


def load_target(spec: TargetSpec, grid: int, device: str = "cpu") -> TargetModel:
    """Load theta_T (a fine-tuned model and its sidecar) as a SEM with a ``grid`` x ``grid`` map.

    Args:
        spec: the target.
        grid: attribution grid side.
        device: where the SEM runs.
    """
    from tasks.finetune import FinetuneConfig, load_finetuned

    if spec.model.rstrip("/").endswith(".safetensors"):
        parent, key = _split_file_uri(spec.model)
    else:
        parent, key = spec.model, "model.safetensors"
    clip_model, sidecar = load_finetuned(open_storage(parent), key, as_sem=False)
    finetune_config = FinetuneConfig.model_validate(sidecar["config"])
    names = _class_names(spec, finetune_config)
    head = zero_shot_head(
        clip_model, names, finetune_config.templates, model_name=finetune_config.model_name
    )
    state = {k: v.detach().clone() for k, v in clip_model.state_dict().items()}
    sem = SelfExplainingCLIP(clip_model, head, grid=(grid, grid)).to(resolve_device(device)).eval()
    return TargetModel(
        sem=sem,
        state=state,
        fingerprint=sidecar.get("fingerprint") or model_fingerprint(clip_model),
        base_fingerprint=sidecar.get("base_fingerprint"),
        class_names=names,
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


def _check_reference(data: EvalData, target: TargetModel, spec: TargetSpec, grid: int) -> None:
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


def baseline_tensor(
    images: Tensor, name: str, mean: Sequence[float], grid: tuple[int, int]
) -> Tensor:
    """What a removed cell shows, in ``[0, 1]`` image space, for Kernel SHAP and insertion AUC.

    Args:
        images: ``[N, 3, H, W]`` images in ``[0, 1]``.
        name: ``"mean"`` (``mean`` per channel), ``"zero"`` or ``"blur"`` (sigma = half a cell,
            the labeller's blur).
        mean: per-channel dataset mean; when empty the images' own mean is used.
        grid: the cell grid.

    Returns:
        ``[3, H, W]`` (shared by every image) or ``[N, 3, H, W]`` (blur).
    """
    channels, height, width = images.shape[1:]
    if name == "mean":
        values = torch.tensor(list(mean), dtype=images.dtype, device=images.device)
        if values.numel() == 0:
            logger.warning("no stored dataset mean: using the mean of the evaluated images")
            values = images.mean(dim=(0, 2, 3))
        return values.view(channels, 1, 1).expand(channels, height, width)
    if name == "zero":
        return images.new_zeros(channels, height, width)
    if name == "blur":
        return blur_baseline(images, grid)
    raise ValueError(f"unknown baseline {name!r}")


def _chunk_baseline(baseline: Tensor, index: slice) -> Tensor:
    return baseline[index] if baseline.dim() == 4 else baseline


def _reduce(per_image: Mapping[str, list[Tensor]], correct: int, total: int) -> dict[str, float]:
    scores = {"accuracy": correct / total if total else math.nan, "images": total}
    for name in QUALITY_METRICS:
        values = per_image.get(name)
        scores[name] = float(torch.cat(values).double().nanmean()) if values else math.nan
    return scores


def _quality(
    maps: Tensor,
    data: EvalData,
    index: slice,
    images: Tensor,
    model_fn: Callable[[Tensor], Tensor],
    baseline: Tensor,
    *,
    topk: int,
    auc_output: str,
    auc_steps: int | None,
    forward_batch_size: int,
) -> dict[str, Tensor]:
    device = images.device
    return explanation_quality(
        maps.to(device),
        reference=data.reference[index].to(device),
        k=topk,
        model_fn=model_fn,
        images=images,
        classes=data.labels[index].to(device),
        baseline=_chunk_baseline(baseline, index),
        steps=auc_steps,
        output=auc_output,
        batch_size=forward_batch_size,
        masks=None if data.masks is None else data.masks[index].to(device),
        reduce=False,
    )


@torch.no_grad()
def sem_label_maps(
    sem: SelfExplainingCLIP, images: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor]:
    """One SEM pass: ``(logits [N, C], label-class attribution maps [N, gh, gw])``."""
    device = sem.class_embeddings.device
    logits, maps = sem(images.to(device))
    label_maps = maps[torch.arange(len(labels), device=device), labels.to(device)]
    return logits, label_maps


@torch.no_grad()
def evaluate_sem(
    sem: SelfExplainingCLIP,
    data: EvalData,
    *,
    baseline: Tensor,
    topk: int = 5,
    auc_output: str = "prob",
    auc_steps: int | None = None,
    batch_size: int = 64,
    forward_batch_size: int = 1024,
) -> dict[str, float]:
    """Accuracy and quality of the SEM's single-pass label-class attributions on one split.

    Agreement (Pearson, Spearman, top-k overlap) is measured against the reference's label-class
    Kernel SHAP maps, insertion/deletion AUC with the SEM's own classifier (the edited model),
    the pointing game against the object masks when the split has them.

    Args:
        sem: the model, in its current (possibly edited) weights.
        data: the split and its reference.
        baseline: from :func:`baseline_tensor` over the split's images.
        topk: cells of the top-k overlap.
        auc_output: ``"prob"`` or ``"logit"`` curves.
        auc_steps: insertion/deletion steps (None: one cell per step).
        batch_size: images per chunk.
        forward_batch_size: masked inputs per model call.

    Returns:
        ``accuracy`` (fraction), ``images``, and every metric of :data:`QUALITY_METRICS` (NaN
        where not measurable: ``pointing`` without masks).
    """

    def explain(images: Tensor, labels: Tensor, index: Tensor, classifier: nn.Module):
        return sem_label_maps(sem, images, labels)

    return _evaluate(
        sem,
        data,
        explain,
        baseline=baseline,
        topk=topk,
        auc_output=auc_output,
        auc_steps=auc_steps,
        batch_size=batch_size,
        forward_batch_size=forward_batch_size,
    )


@torch.no_grad()
def evaluate_kernel_shap(
    model: SelfExplainingCLIP,
    data: EvalData,
    budget: int,
    *,
    baseline: Tensor,
    output: str = "logit",
    seed: int = 1,
    topk: int = 5,
    auc_output: str = "prob",
    auc_steps: int | None = None,
    batch_size: int = 64,
    forward_batch_size: int = 1024,
) -> dict[str, float]:
    """Quality of Kernel SHAP explanations of ``model`` (theta_T) at ``budget`` inferences.

    The same metrics as :func:`evaluate_sem`, the attributions being Kernel SHAP's for the label
    class. Each image's coalitions are seeded from its key and ``seed``; pass a seed other than
    the reference's, or the baseline would reproduce the reference instead of estimating it.

    Args:
        model: theta_T as a SEM (its classifier is explained).
        data: the split and its reference.
        budget: model evaluations per image, empty and full coalitions included.
        baseline: from :func:`baseline_tensor` over the split's images.
        output: ``"logit"`` or ``"prob"`` value function.
        seed: global seed of the coalitions.
        topk: cells of the top-k overlap.
        auc_output: ``"prob"`` or ``"logit"`` curves.
        auc_steps: insertion/deletion steps.
        batch_size: images per chunk.
        forward_batch_size: masked inputs per model call.

    Returns:
        As :func:`evaluate_sem`; ``accuracy`` is the model's own.
    """
    device = model.class_embeddings.device

    def explain(images: Tensor, labels: Tensor, index: Tensor, classifier: nn.Module):
        result = kernel_shap_explain(
            classifier,
            images,
            labels.to(device),
            grid=data.grid,
            budget=budget,
            baseline=_chunk_baseline(baseline.to(device), index),
            output=output,
            seed=[derive_seed(key, seed) for key in data.keys[index]],
            batch_size=forward_batch_size,
        )
        return classifier(images), result.phi

    return _evaluate(
        model,
        data,
        explain,
        baseline=baseline,
        topk=topk,
        auc_output=auc_output,
        auc_steps=auc_steps,
        batch_size=batch_size,
        forward_batch_size=forward_batch_size,
    )


def _evaluate(
    model: SelfExplainingCLIP,
    data: EvalData,
    explain: Callable[[Tensor, Tensor, Tensor, nn.Module], tuple[Tensor, Tensor]],
    *,
    baseline: Tensor,
    topk: int,
    auc_output: str,
    auc_steps: int | None,
    batch_size: int,
    forward_batch_size: int,
) -> dict[str, float]:
    """Accuracy and quality over a split, in chunks, of the maps ``explain`` returns.

    ``explain(images, labels, index, classifier) -> (logits, label-class maps)``; the maps are
    scored by :func:`_quality` with the model's own classifier for insertion/deletion.
    """
    was_training = model.training
    model.eval()
    device = model.class_embeddings.device
    classifier = model.as_classifier().eval()
    per_image: dict[str, list[Tensor]] = {}
    correct = 0
    for index in data.batches(batch_size):
        images = data.float_images(index).to(device)
        labels = data.labels[index]
        logits, maps = explain(images, labels, index, classifier)
        correct += round(accuracy(logits, labels) * len(images))
        scores = _quality(
            maps,
            data,
            index,
            images,
            classifier,
            baseline.to(device),
            topk=topk,
            auc_output=auc_output,
            auc_steps=auc_steps,
            forward_batch_size=forward_batch_size,
        )
        for name, values in scores.items():
            per_image.setdefault(name, []).append(values.cpu())
    model.train(was_training)
    return _reduce(per_image, correct, len(data))


def _better(metric: str, a: float, b: float) -> bool:
    return a < b if metric in LOWER_IS_BETTER else a > b


def select_lambda(
    rows: Sequence[Mapping[str, Any]], *, metric: str = "pearson", tolerance: float = 1.0
) -> float:
    """The lambda of best ``metric`` whose accuracy is at most ``tolerance`` points below lambda 0.

    Args:
        rows: the SEM rows of one target on the validation split (``lambda``, ``accuracy`` as a
            fraction, ``metric``).
        metric: the quality metric to optimise (lower is better for ``deletion_auc``).
        tolerance: accepted accuracy drop in accuracy points (1.0 = one percentage point).

    Returns:
        The selected lambda; ties go to the smaller ``|lambda|`` (the smaller edit), and lambda 0
        is kept when no other lambda has a finite score.

    Raises:
        ValueError: no row at lambda 0.
    """
    at_zero = [r for r in rows if r["lambda"] == 0.0]
    if not at_zero:
        raise ValueError("lambda selection needs the lambda = 0 row")
    # A hair of slack so that an accuracy equal to the floor is not lost to rounding.
    floor = at_zero[0]["accuracy"] - tolerance / 100.0 - 1e-12
    best_lambda, best_score = 0.0, at_zero[0].get(metric, math.nan)
    for row in sorted(rows, key=lambda r: (abs(r["lambda"]), r["lambda"])):
        score = row.get(metric, math.nan)
        if row["accuracy"] < floor or score is None or not math.isfinite(score):
            continue
        if (
            best_score is None
            or not math.isfinite(best_score)
            or _better(metric, score, best_score)
        ):
            best_lambda, best_score = float(row["lambda"]), score
    return best_lambda


@dataclass
class TargetOutcome:
    """The rows of one target and where its figures are.

    Attributes:
        target: the target domain.
        rows: table rows (SEM per lambda and split, Kernel SHAP per budget and split).
        chosen_lambda: the lambda selected on validation.
        heatmap_key: key of ``heatmaps-{target}.png`` under the sweep folder (None: no images).
        seconds: evaluation time.
        skipped: whether stored results were reused.
    """

    target: str
    rows: list[dict[str, Any]]
    chosen_lambda: float
    heatmap_key: str | None
    seconds: float = 0.0
    skipped: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (what a flow task returns)."""
        return {
            "target": self.target,
            "rows": self.rows,
            "chosen_lambda": self.chosen_lambda,
            "heatmap_key": self.heatmap_key,
            "seconds": self.seconds,
            "skipped": self.skipped,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TargetOutcome:
        """The inverse of :meth:`to_dict`."""
        return cls(**dict(data))


def _target_unit(target: str) -> str:
    return f"target-{target}"


def _checkpoint_fingerprint(uri: str, default_file: str | None = None) -> str:
    """The content fingerprint in a checkpoint's sidecar (no tensor is read)."""
    from storage.checkpoints import load_sidecar

    if uri.rstrip("/").endswith(".safetensors"):
        parent, key = _split_file_uri(uri)
    else:
        parent, key = uri, default_file or ""
    return str(load_sidecar(open_storage(parent), key).get("state_fingerprint", ""))


def target_fingerprint(config: SweepConfig, target: str) -> str:
    """What a target's rows depend on: its settings and the content of the vector and theta_T.

    URIs alone would not do: a vector or model rewritten in place must not reuse stale rows.
    (Reference datasets are versioned by content already, so their URIs suffice.)
    """
    spec = config.target(target)
    parts = [
        config.result_fingerprint(target=target),
        _checkpoint_fingerprint(config.vector),
        _checkpoint_fingerprint(spec.model, "model.safetensors"),
    ]
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:16]


def _inputs_fingerprint(config: SweepConfig) -> str:
    parts = [target_fingerprint(config, spec.domain) for spec in config.targets]
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:16]


def _row(
    spec: TargetSpec, method: str, coef: float, inferences: int, split: str, scores: Mapping
) -> dict[str, Any]:
    row = {
        "target": spec.domain,
        "related": spec.related,
        "method": method,
        "lambda": coef,
        "inferences": inferences,
        "split": split,
        "images": int(scores["images"]),
        "accuracy": float(scores["accuracy"]),
        "chosen": False,
    }
    row.update({name: float(scores[name]) for name in QUALITY_METRICS})
    return row


def validate_sweep(config: SweepConfig) -> dict[str, Any]:
    """Check the vector against every target model before any evaluation.

    Loads the vector and each theta_T (CPU) and runs the vector's key, shape and base checks,
    and checks that each reference exists.

    Returns:
        ``{"vector": vector description, "targets": {domain: theta_T fingerprint}}``.

    Raises:
        ValueError: the first mismatch found, naming the target.
    """
    vector = load_vector(config.vector)
    fingerprints = {}
    for spec in config.targets:
        target = load_target(spec, config.grid, "cpu")
        try:
            check_vector(vector, target, allow_different_base=config.allow_different_base)
        except ValueError as exc:
            raise ValueError(
                f"vector {config.vector} cannot be applied to {spec.domain!r}: {exc}"
            ) from exc
        for uri in (spec.val_reference, spec.test_reference):
            if not open_storage(uri).exists("config.json"):
                raise ValueError(f"target {spec.domain!r}: no reference dataset at {uri}")
        fingerprints[spec.domain] = target.fingerprint
    return {"vector": repr(vector), "targets": fingerprints}


def sweep_target(
    config: SweepConfig,
    target: str,
    *,
    vector: ExplainabilityVector | None = None,
    progress: ProgressCallback | None = None,
    overwrite: bool = False,
) -> TargetOutcome:
    """Evaluate one target at every lambda and Kernel SHAP budget, and select its lambda.

    Writes ``targets/{target}.parquet`` (its rows) and ``heatmaps-{target}.png`` (test images
    with the SEM's label-class maps at lambda 0 and at the chosen lambda) under the sweep folder,
    then the target's completion marker; a complete target with the same settings is read back
    instead of recomputed.

    Args:
        config: the sweep.
        target: the domain of one of ``config.targets``.
        vector: the loaded vector (None: read from ``config.vector``).
        progress: called as ``progress(done, total)`` after each evaluation.
        overwrite: recompute even when complete.

    Raises:
        ValueError: vector and theta_T mismatch, or a reference that does not fit theta_T.
    """
    spec = config.target(target)
    out = sweep_storage(config)
    fingerprint = target_fingerprint(config, target)
    unit, rows_key = _target_unit(target), f"targets/{target}.parquet"
    if not overwrite and out.is_complete(unit) and out.exists(rows_key):
        info = out.completion_info(unit)
        if info.get("fingerprint") == fingerprint:
            logger.info("sweep %s: target %s already complete, skipped", config.name, target)
            return TargetOutcome(
                target=target,
                rows=out.read_parquet(rows_key).to_pylist(),
                chosen_lambda=float(info["chosen_lambda"]),
                heatmap_key=info.get("heatmap_key"),
                seconds=float(info.get("seconds", 0.0)),
                skipped=True,
            )
        logger.info("sweep %s: target %s was run with other settings, redoing", config.name, target)
    started = time.perf_counter()
    vector = vector if vector is not None else load_vector(config.vector)
    model = load_target(spec, config.grid, config.device)
    check_vector(vector, model, allow_different_base=config.allow_different_base)
    data = {
        "val": load_reference(spec.val_reference, max_images=config.max_images),
        "test": load_reference(spec.test_reference, max_images=config.max_images),
    }
    for split_data in data.values():
        _check_reference(split_data, model, spec, config.grid)
    device = model.sem.class_embeddings.device
    baselines = {
        split: baseline_tensor(
            d.images.float().div(255.0).to(device), config.baseline, d.baseline_mean, d.grid
        )
        for split, d in data.items()
    }
    common = dict(
        topk=config.topk,
        auc_output=config.auc_output,
        auc_steps=config.auc_steps,
        batch_size=config.batch_size,
        forward_batch_size=config.forward_batch_size,
    )
    total = 2 * len(config.lambdas) + len(config.kernel_shap_budgets) * len(
        config.kernel_shap_splits
    )
    done = 0

    def advance() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    rows: list[dict[str, Any]] = []
    model.load_lambda(vector, 0.0, allow_different_base=config.allow_different_base)
    for split in config.kernel_shap_splits:
        d = data[split]
        for budget in config.kernel_shap_budgets:
            scores = evaluate_kernel_shap(
                model.sem,
                d,
                budget,
                baseline=baselines[split],
                output=config.output,
                # Never the reference's own coalitions: those would agree with it perfectly.
                seed=d.label_seed + 1 + config.seed,
                **common,
            )
            rows.append(_row(spec, "kernel_shap", math.nan, budget, split, scores))
            logger.info("%s %s Kernel SHAP %d: %s", target, split, budget, scores)
            advance()

    n_heat = min(config.heatmap_images, len(data["test"]))
    heat_index = slice(0, n_heat)
    heat_maps: dict[float, Tensor] = {}
    for coef in config.lambdas:
        model.load_lambda(vector, coef, allow_different_base=config.allow_different_base)
        for split in ("val", "test"):
            scores = evaluate_sem(model.sem, data[split], baseline=baselines[split], **common)
            rows.append(_row(spec, "sem", coef, 1, split, scores))
            logger.info("%s %s lambda %g: %s", target, split, coef, scores)
            advance()
        if n_heat:
            test = data["test"]
            _, maps = sem_label_maps(
                model.sem, test.float_images(heat_index), test.labels[heat_index]
            )
            heat_maps[coef] = maps.cpu()

    val_rows = [r for r in rows if r["method"] == "sem" and r["split"] == "val"]
    chosen = select_lambda(
        val_rows, metric=config.selection_metric, tolerance=config.accuracy_tolerance
    )
    for row in rows:
        row["chosen"] = row["method"] == "sem" and row["lambda"] == chosen
    logger.info("sweep %s: target %s chose lambda %g on validation", config.name, target, chosen)

    heatmap_key = None
    if n_heat:
        heatmap_key = f"heatmaps-{target}.png"
        out.write_bytes(heatmap_key, _heatmap_png(data["test"], heat_index, heat_maps, chosen))
    out.write_parquet(rows_key, pa.Table.from_pylist(rows, schema=TABLE_SCHEMA))
    seconds = time.perf_counter() - started
    out.mark_complete(
        unit,
        {
            "fingerprint": fingerprint,
            "chosen_lambda": chosen,
            "heatmap_key": heatmap_key,
            "seconds": seconds,
        },
    )
    return TargetOutcome(target, rows, chosen, heatmap_key, seconds=seconds)


def _heatmap_png(
    data: EvalData, index: slice, maps: Mapping[float, Tensor], chosen: float
) -> bytes:
    from tasks.plots import heatmap_overlay

    images = data.float_images(index)
    names = [
        data.class_names[int(c)] if data.class_names else str(int(c)) for c in data.labels[index]
    ]
    shown = [0.0] if chosen == 0.0 else [0.0, chosen]
    return heatmap_overlay(
        torch.cat([images] * len(shown)),
        torch.cat([maps[coef] for coef in shown]),
        titles=[f"{name} λ={coef:g}" for coef in shown for name in names],
        ncols=len(names),
    )


@dataclass
class SweepResult:
    """A complete sweep.

    Attributes:
        rows: the table as row dicts.
        table: the table (:data:`TABLE_SCHEMA`).
        chosen: target -> lambda selected on validation.
        summary: what ``summary.json`` holds.
        uris: ``table``, ``plot``, ``summary`` and ``heatmaps`` (target -> URI).
        skipped: whether a complete sweep was read back instead of run.
    """

    rows: list[dict[str, Any]]
    table: pa.Table
    chosen: dict[str, float]
    summary: dict[str, Any]
    uris: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False


def _metrics(row: Mapping[str, Any] | None) -> dict[str, float] | None:
    if row is None:
        return None
    return {name: row[name] for name in ("accuracy", *QUALITY_METRICS)}


def _summary_of_target(rows: list[dict[str, Any]], chosen: float) -> dict[str, Any]:
    def sem(split: str, coef: float) -> dict[str, Any] | None:
        found = [
            r for r in rows if r["method"] == "sem" and r["split"] == split and r["lambda"] == coef
        ]
        return found[0] if found else None

    test_chosen = sem("test", chosen)
    kernel_shap = {}
    for row in rows:
        if row["method"] == "kernel_shap":
            kernel_shap.setdefault(row["split"], {})[str(row["inferences"])] = _metrics(row)
    # The largest budget whose Kernel SHAP agreement the single SEM pass matches or beats.
    matched = None
    if test_chosen is not None and math.isfinite(test_chosen["pearson"]):
        for budget, scores in sorted(
            kernel_shap.get("test", {}).items(), key=lambda kv: int(kv[0])
        ):
            if math.isfinite(scores["pearson"]) and scores["pearson"] <= test_chosen["pearson"]:
                matched = int(budget)
    return {
        "related": rows[0]["related"] if rows else None,
        "chosen_lambda": chosen,
        "val": {"lambda_0": _metrics(sem("val", 0.0)), "chosen": _metrics(sem("val", chosen))},
        "test": {"lambda_0": _metrics(sem("test", 0.0)), "chosen": _metrics(test_chosen)},
        "kernel_shap": kernel_shap,
        "sem_matches_kernel_shap_budget": matched,
    }


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def assemble_sweep(config: SweepConfig, outcomes: Sequence[TargetOutcome]) -> SweepResult:
    """Write the table, the plot and the summary of a sweep, then its completion marker.

    Args:
        config: the sweep.
        outcomes: one per target, from :func:`sweep_target`.

    Raises:
        ValueError: an outcome is missing for some target.
    """
    out = sweep_storage(config)
    by_target = {o.target: o for o in outcomes}
    missing = [t.domain for t in config.targets if t.domain not in by_target]
    if missing:
        raise ValueError(f"sweep {config.name}: no results for targets {missing}")
    ordered = [by_target[t.domain] for t in config.targets]
    rows = [row for outcome in ordered for row in outcome.rows]
    table = pa.Table.from_pylist(rows, schema=TABLE_SCHEMA)
    chosen = {o.target: o.chosen_lambda for o in ordered}
    from tasks.plots import plot_sweep

    # A crash while rewriting must not leave the old marker vouching for half-new files.
    out.clear_complete(RESULTS_UNIT)
    out.write_parquet(RESULTS_FILE, table)
    out.write_bytes(PLOT_FILE, plot_sweep(table, chosen_lambdas=chosen))
    uris = {
        "table": out.url(RESULTS_FILE),
        "plot": out.url(PLOT_FILE),
        "summary": out.url(SUMMARY_FILE),
        "heatmaps": {o.target: out.url(o.heatmap_key) for o in ordered if o.heatmap_key},
    }
    summary = {
        "name": config.name,
        "vector": config.vector,
        "chosen": chosen,
        "selection": {
            "split": "val",
            "metric": config.selection_metric,
            "accuracy_tolerance_points": config.accuracy_tolerance,
        },
        "targets": {o.target: _summary_of_target(o.rows, o.chosen_lambda) for o in ordered},
        "uris": uris,
        "config": config.to_dict(),
    }
    out.write_json(SUMMARY_FILE, _json_safe(summary))
    out.mark_complete(
        RESULTS_UNIT,
        {
            "fingerprint": config.result_fingerprint(),
            "inputs": _inputs_fingerprint(config),
            "rows": len(rows),
        },
    )
    logger.info("sweep %s: %d rows written to %s", config.name, len(rows), uris["table"])
    return SweepResult(rows=rows, table=table, chosen=chosen, summary=summary, uris=uris)


def load_sweep(config: SweepConfig) -> SweepResult | None:
    """The stored result of a complete sweep; None when incomplete or its inputs changed.

    Raises:
        ValueError: a complete sweep of that name was run with other settings.
    """
    out = sweep_storage(config)
    if not (out.is_complete(RESULTS_UNIT) and out.exists(RESULTS_FILE)):
        return None
    info = out.completion_info(RESULTS_UNIT)
    if info.get("fingerprint") != config.result_fingerprint():
        raise ValueError(
            f"sweep {config.name!r} at {out.uri} was run with other settings: choose another "
            "name or overwrite it"
        )
    try:
        inputs = _inputs_fingerprint(config)
    except FileNotFoundError:
        logger.warning(
            "sweep %s: its vector or a target model is gone; keeping its results", config.name
        )
        inputs = info.get("inputs")
    if info.get("inputs") != inputs:
        logger.info("sweep %s: the vector or a target model changed since it ran", config.name)
        return None
    table = out.read_parquet(RESULTS_FILE)
    summary = out.read_json(SUMMARY_FILE)
    chosen = {k: float(v) for k, v in summary["chosen"].items()}
    return SweepResult(
        rows=table.to_pylist(),
        table=table,
        chosen=chosen,
        summary=summary,
        uris=summary["uris"],
        skipped=True,
    )


def run_sweep(
    config: SweepConfig, progress: ProgressCallback | None = None, *, overwrite: bool = False
) -> SweepResult:
    """Run a whole transfer sweep (or read it back when complete).

    Args:
        config: the sweep.
        progress: called as ``progress(done, total)`` over every evaluation of every target.
        overwrite: recompute even when complete.

    Returns:
        The :class:`SweepResult`.

    Raises:
        ValueError: a vector that does not fit a target model (checked for every target before
            any evaluation), a reference that does not fit, or a complete sweep of the same
            name with other settings (without ``overwrite``).
    """
    if not overwrite:
        stored = load_sweep(config)
        if stored is not None:
            logger.info("sweep %s already complete: skipped", config.name)
            return stored
    validate_sweep(config)
    vector = load_vector(config.vector)
    per_target = 2 * len(config.lambdas) + len(config.kernel_shap_budgets) * len(
        config.kernel_shap_splits
    )
    total = per_target * len(config.targets)
    outcomes = []
    for i, spec in enumerate(config.targets):

        def report(done: int, _total: int, offset: int = i * per_target) -> None:
            if progress is not None:
                progress(offset + done, total)

        outcomes.append(
            sweep_target(config, spec.domain, vector=vector, progress=report, overwrite=overwrite)
        )
    return assemble_sweep(config, outcomes)

"""The evaluation engine: accuracy and attribution quality of SEM and Kernel SHAP maps.

:func:`evaluate_sem` scores the SEM's single-pass label-class maps (one inference per image),
:func:`evaluate_kernel_shap` scores Kernel SHAP maps of theta_T at a budget of inferences, both
against the target's reference with the same metrics. :func:`evaluate_target` runs every
evaluation of one target, lambda by lambda and budget by budget, into the sweep's table rows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from tasks.algorithms.kernel_shap import blur_baseline, derive_seed, kernel_shap_explain
from tasks.algorithms.metrics import accuracy, explanation_quality
from tasks.algorithms.vectors import ExplainabilityVector
from tasks.data.stream import Batch
from tasks.model import SelfExplainingCLIP
from tasks.sweep.accuracy import AccuracyData, measure_accuracy
from tasks.sweep.config import QUALITY_METRICS, SweepConfig, TargetSpec
from tasks.sweep.inputs import EvalData, TargetModel

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]


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


Baseline = Callable[[Tensor], Tensor]


def split_baseline(data: EvalData, name: str) -> Baseline:
    """The baseline of a split's batches: ``images -> [3, H, W]`` or ``[N, 3, H, W]`` (blur).

    The "mean" baseline is the stored dataset mean, or (not stored) the split's own mean, read
    in one streamed pass; "blur" is per image, so it is computed batch by batch.
    """
    mean = list(data.baseline_mean)
    if name == "mean" and not mean:
        logger.warning("no stored dataset mean: using the mean of the evaluated images")
        mean = data.channel_mean()

    def baseline(images: Tensor) -> Tensor:
        return baseline_tensor(images, name, mean, data.grid)

    return baseline


def _reduce(per_image: Mapping[str, list[Tensor]], correct: int, total: int) -> dict[str, Any]:
    scores: dict[str, Any] = {"accuracy": correct / total if total else math.nan, "images": total}
    for name in QUALITY_METRICS:
        values = per_image.get(name)
        scores[name] = float(torch.cat(values).double().nanmean()) if values else math.nan
    # Per-image values, image order kept, for paired intervals (tasks.sweep.statistics).
    scores["per_image"] = {
        name: torch.cat(values).double().tolist() for name, values in per_image.items() if values
    }
    return scores


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
    baseline: Baseline,
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
        baseline: the split's :func:`split_baseline`.
        topk: cells of the top-k overlap.
        auc_output: ``"prob"`` or ``"logit"`` curves.
        auc_steps: insertion/deletion steps (None: one cell per step).
        batch_size: images per chunk.
        forward_batch_size: masked inputs per model call.

    Returns:
        ``accuracy`` (fraction), ``images``, and every metric of :data:`QUALITY_METRICS` (NaN
        where not measurable: ``pointing`` without masks).
    """

    def explain(batch: Batch, images: Tensor, base: Tensor, classifier: nn.Module):
        return sem_label_maps(sem, images, batch.labels)

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
    baseline: Baseline,
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
        baseline: the split's :func:`split_baseline`.
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

    def explain(batch: Batch, images: Tensor, base: Tensor, classifier: nn.Module):
        result = kernel_shap_explain(
            classifier,
            images,
            batch.labels.to(device),
            grid=data.grid,
            budget=budget,
            baseline=base,
            output=output,
            seed=[derive_seed(key, seed) for key in batch.keys],
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
    explain: Callable[[Batch, Tensor, Tensor, nn.Module], tuple[Tensor, Tensor]],
    *,
    baseline: Baseline,
    topk: int,
    auc_output: str,
    auc_steps: int | None,
    batch_size: int,
    forward_batch_size: int,
) -> dict[str, Any]:
    """Accuracy and quality over a split, streamed batch by batch, of the maps ``explain`` gives.

    ``explain(batch, images, baseline, classifier) -> (logits, label-class maps)``; the maps are
    scored against the batch's reference with the model's own classifier for insertion/deletion
    and accumulated per image.
    """
    was_training = model.training
    model.eval()
    device = model.class_embeddings.device
    classifier = model.as_classifier().eval()
    per_image: dict[str, list[Tensor]] = {}
    correct, total = 0, 0
    for batch in data.batches(batch_size):
        images = batch.images.to(device)
        base = baseline(images)
        logits, maps = explain(batch, images, base, classifier)
        correct += round(accuracy(logits, batch.labels) * len(images))
        total += len(images)
        per_image.setdefault("correct", []).append(
            (logits.argmax(dim=1).cpu() == batch.labels.cpu()).double()
        )
        scores = explanation_quality(
            maps.to(device),
            reference=batch.targets.to(device),
            k=topk,
            model_fn=classifier,
            images=images,
            classes=batch.labels.to(device),
            baseline=base,
            steps=auc_steps,
            output=auc_output,
            batch_size=forward_batch_size,
            masks=None if batch.masks is None else batch.masks.to(device),
            reduce=False,
        )
        for name, values in scores.items():
            per_image.setdefault(name, []).append(values.cpu())
    model.train(was_training)
    return _reduce(per_image, correct, total)


def table_row(
    spec: TargetSpec, method: str, coef: float, inferences: int, split: str, scores: Mapping
) -> dict[str, Any]:
    """One row of the sweep table (``chosen`` False until lambda is selected)."""
    row = {
        "target": spec.domain,
        "related": spec.related,
        "role": spec.role,
        "method": method,
        "lambda": coef,
        "inferences": inferences,
        "split": split,
        "images": int(scores["images"]),
        "accuracy_images": int(scores.get("accuracy_images", scores["images"])),
        "accuracy": float(scores["accuracy"]),
        "chosen": False,
    }
    row.update({name: float(scores[name]) for name in QUALITY_METRICS})
    if "per_image" in scores:
        row["per_image"] = scores["per_image"]
    return row


def with_accuracy(scores: Mapping[str, Any], measured: Mapping[str, Any]) -> dict[str, Any]:
    """``scores`` with accuracy from :func:`tasks.sweep.accuracy.measure_accuracy` instead.

    ``accuracy``, ``accuracy_images`` and ``per_image["correct"]`` then describe the larger
    accuracy set; the explanation metrics stay on the reference's images.
    """
    out = dict(scores)
    out["accuracy"] = measured["accuracy"]
    out["accuracy_images"] = measured["images"]
    out["per_image"] = {**scores.get("per_image", {}), "correct": list(measured["correct"])}
    return out


def metric_options(config: SweepConfig) -> dict[str, Any]:
    """The sweep's settings every SEM and Kernel SHAP evaluation shares."""
    return dict(
        topk=config.topk,
        auc_output=config.auc_output,
        auc_steps=config.auc_steps,
        batch_size=config.batch_size,
        forward_batch_size=config.forward_batch_size,
    )


def kernel_shap_data(config: SweepConfig, data: EvalData, role: str = "target") -> EvalData:
    """The images the Kernel SHAP rows explain: the first ``kernel_shap_images`` (or all); in
    domain (``role`` ``"source"``) the first ``source_kernel_shap_images`` when it is set."""
    images = config.kernel_shap_images
    if role == "source" and config.source_kernel_shap_images is not None:
        images = config.source_kernel_shap_images
    return data if images is None else data.first(images)


def kernel_shap_seed(config: SweepConfig, data: EvalData) -> int:
    """The Kernel SHAP rows' seed: never the reference's own coalitions, which would agree
    with it perfectly."""
    return data.label_seed + 1 + config.seed


def evaluate_edited_kernel_shap(
    config: SweepConfig,
    spec: TargetSpec,
    model: TargetModel,
    vector: ExplainabilityVector,
    data: EvalData,
    coef: float,
    rows: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """Kernel SHAP of the edited model theta_T + ``coef`` tau on the Kernel SHAP test images.

    Its insertion and deletion AUCs are what a faithful explanation of the edited model reaches,
    the yardstick of the SEM pass at ``coef`` (which explains that same model); its Pearson is
    against the reference of theta_T, like every row.

    At ``coef`` 0 the edited model is theta_T, so the test ``kernel_shap`` row of ``rows`` at the
    same budget (same images, same seed: the same numbers) is taken instead of recomputed.

    Returns:
        A ``kernel_shap_edited`` table row at lambda ``coef``.
    """
    budget = int(config.edited_kernel_shap_budget)
    row = _measured_theta_t_row(rows, budget) if coef == 0.0 else None
    if row is None:
        d = kernel_shap_data(config, data)
        model.load_lambda(vector, coef, allow_different_base=config.allow_different_base)
        scores = evaluate_kernel_shap(
            model.sem,
            d,
            budget,
            baseline=split_baseline(data, config.baseline),
            output=config.output,
            seed=kernel_shap_seed(config, d),
            **metric_options(config),
        )
        logger.info(
            "%s test Kernel SHAP %d of the model at lambda %g: %s",
            spec.domain,
            budget,
            coef,
            scores,
        )
        row = table_row(spec, "kernel_shap_edited", coef, budget, "test", scores)
    else:
        row = {**row, "method": "kernel_shap_edited", "lambda": 0.0, "chosen": False}
    # The edited model's accuracy as the table gives it everywhere: the SEM row at ``coef``.
    for sem in rows:
        if (sem["method"], sem["split"], sem["lambda"]) == ("sem", "test", coef):
            row["accuracy"], row["accuracy_images"] = sem["accuracy"], sem["accuracy_images"]
            if "correct" in sem.get("per_image", {}):
                row["per_image"] = {
                    **row.get("per_image", {}),
                    "correct": sem["per_image"]["correct"],
                }
    return row


class _OwnReference:
    """The batches of ``data`` with another reference's maps as their targets (by key)."""

    def __init__(self, data: EvalData, maps: Mapping[str, Tensor]) -> None:
        self.data, self.maps = data, maps
        self.grid = data.grid

    def batches(self, size: int) -> Iterator[Batch]:
        """The batches of :meth:`EvalData.batches`, their targets replaced."""
        for batch in self.data.batches(size):
            targets = torch.stack([self.maps[key] for key in batch.keys])
            yield batch._replace(targets=targets)


@torch.no_grad()
def evaluate_edited_agreement(
    config: SweepConfig,
    spec: TargetSpec,
    model: TargetModel,
    vector: ExplainabilityVector,
    data: EvalData,
    coef: float,
) -> list[dict[str, Any]]:
    """The edited model's single pass against Kernel SHAP of the edited model, on its own terms.

    theta_T + ``coef`` tau is explained by Kernel SHAP at the reference's budget (the
    reference's own seed: the same coalitions as theta_T's reference, another model) on the
    Kernel SHAP test images; that is the yardstick of a ``sem_vs_edited`` row (the SEM pass)
    and of one ``kernel_shap_vs_edited`` row per budget of ``edited_agreement_budgets`` (the
    Kernel SHAP rows' seed), so the report can say which budget the transferred pass matches.

    Returns:
        The rows, at lambda ``coef``, every metric against the edited model's reference.
    """
    d = kernel_shap_data(config, data)
    model.load_lambda(vector, coef, allow_different_base=config.allow_different_base)
    sem = model.sem
    was_training = sem.training
    sem.eval()
    device = sem.class_embeddings.device
    classifier = sem.as_classifier().eval()
    baseline = split_baseline(data, config.baseline)
    reference: dict[str, Tensor] = {}
    for batch in d.batches(config.batch_size):
        images = batch.images.to(device)
        result = kernel_shap_explain(
            classifier,
            images,
            batch.labels.to(device),
            grid=d.grid,
            budget=d.budget,
            baseline=baseline(images),
            output=config.output,
            seed=[derive_seed(key, d.label_seed) for key in batch.keys],
            batch_size=config.forward_batch_size,
        )
        reference.update(zip(batch.keys, result.phi.float().cpu(), strict=True))
    sem.train(was_training)
    own = _OwnReference(d, reference)
    options = metric_options(config)
    scores = evaluate_sem(sem, own, baseline=baseline, **options)
    rows = [table_row(spec, "sem_vs_edited", coef, 1, "test", scores)]
    for budget in config.edited_agreement_budgets:
        scores = evaluate_kernel_shap(
            sem,
            own,
            budget,
            baseline=baseline,
            output=config.output,
            seed=kernel_shap_seed(config, d),
            **options,
        )
        rows.append(table_row(spec, "kernel_shap_vs_edited", coef, budget, "test", scores))
    logger.info(
        "%s at lambda %g against its own reference (budget %d, %d images): %s",
        spec.domain,
        coef,
        d.budget,
        len(reference),
        {(r["method"], r["inferences"]): round(r["pearson"], 3) for r in rows},
    )
    return rows


def _measured_theta_t_row(rows: Sequence[Mapping[str, Any]], budget: int) -> Mapping | None:
    """The test ``kernel_shap`` row of theta_T at ``budget`` among ``rows``, if measured."""
    for row in rows:
        if (row["method"], row["split"], row["inferences"]) == ("kernel_shap", "test", budget):
            return row
    return None


def evaluate_target(
    config: SweepConfig,
    spec: TargetSpec,
    model: TargetModel,
    vector: ExplainabilityVector,
    data: Mapping[str, EvalData],
    *,
    heatmap_images: int = 0,
    progress: ProgressCallback | None = None,
    accuracy_data: Mapping[str, AccuracyData] | None = None,
) -> tuple[list[dict[str, Any]], dict[float, Tensor]]:
    """Every evaluation of one target: Kernel SHAP of theta_T per budget, the SEM per lambda.

    Args:
        config: the sweep.
        spec: the target.
        model: theta_T (its weights are edited in place, lambda by lambda).
        vector: the explainability vector tau.
        data: split -> its data (``spec.splits``), checked against ``model``.
        heatmap_images: the first test images whose SEM maps are kept at every lambda.
        progress: called as ``progress(done, config.evaluations_per_target(target))`` after
            each one.
        accuracy_data: ``{"val": ..., "test": ...}`` whole splits on which accuracy is measured
            (forward passes only) instead of on the reference's images; Kernel SHAP rows carry
            theta_T's (lambda 0) accuracy on them.

    Returns:
        ``(rows, maps)``: the table rows (none chosen yet) and lambda -> ``[n, gh, gw]`` label-
        class maps of the first ``heatmap_images`` test images (CPU).
    """
    target, done = spec.domain, 0
    total = config.evaluations_per_target(target)

    def advance() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    baselines = {split: split_baseline(d, config.baseline) for split, d in data.items()}
    common = metric_options(config)
    measured: dict[tuple[float, str], dict[str, Any]] = {}

    def accurate(scores: dict[str, Any], coef: float, split: str) -> dict[str, Any]:
        """``scores`` with accuracy on the split's accuracy set at ``coef`` (when there is one)."""
        if accuracy_data is None:
            return scores
        if (coef, split) not in measured:
            measured[coef, split] = measure_accuracy(
                model.sem, accuracy_data[split], batch_size=config.batch_size
            )
        return with_accuracy(scores, measured[coef, split])

    rows: list[dict[str, Any]] = []
    model.load_lambda(vector, 0.0, allow_different_base=config.allow_different_base)
    for split in (s for s in config.kernel_shap_splits if s in spec.splits):
        d = kernel_shap_data(config, data[split], spec.role)
        for budget in config.kernel_shap_budgets:
            scores = evaluate_kernel_shap(
                model.sem,
                d,
                budget,
                baseline=baselines[split],
                output=config.output,
                seed=kernel_shap_seed(config, d),
                **common,
            )
            scores = accurate(scores, 0.0, split)
            rows.append(table_row(spec, "kernel_shap", math.nan, budget, split, scores))
            logger.info("%s %s Kernel SHAP %d: %s", target, split, budget, scores)
            advance()

    heat = data["test"].head(heatmap_images) if heatmap_images else None
    heat_maps: dict[float, Tensor] = {}
    for coef in spec.lambdas(config.lambdas):
        model.load_lambda(vector, coef, allow_different_base=config.allow_different_base)
        for split in spec.splits:
            scores = evaluate_sem(model.sem, data[split], baseline=baselines[split], **common)
            scores = accurate(scores, coef, split)
            rows.append(table_row(spec, "sem", coef, 1, split, scores))
            logger.info("%s %s lambda %g: %s", target, split, coef, scores)
            advance()
        if heat is not None:
            _, maps = sem_label_maps(model.sem, heat.images, heat.labels)
            heat_maps[coef] = maps.cpu()
    return rows, heat_maps

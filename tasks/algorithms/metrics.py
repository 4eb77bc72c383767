"""Accuracy and explanation-quality metrics, batched in torch on the inputs' device.

Conventions shared by every function here:

- Attributions are ``[N, gh, gw]``: one map per image, for the one class explained in that
  image. Comparisons between two attributions (:func:`pearson`, :func:`spearman`,
  :func:`topk_overlap`) flatten the cells and return one value per image.
- A grid cell covers the pixels that nearest-neighbour upsampling assigns to it: pixel row ``y``
  of an ``H``-pixel image belongs to cell row ``floor(y * gh / H)`` (columns likewise), exactly
  what ``F.interpolate(mode="nearest")`` does. For ``H`` divisible by ``gh`` that is a block of
  ``H / gh`` rows.
- Correlations are computed in float64. A constant map has no correlation: the result is NaN for
  that image (as in scipy), and :func:`explanation_quality` averages with ``nanmean``.
- "Higher is better" for everything except :func:`insertion_deletion_auc`'s deletion AUC.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

ModelFn = Callable[[Tensor], Tensor]


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy as a fraction in [0, 1].

    Args:
        logits: ``[N, C]`` scores.
        labels: ``[N]`` integer class ids.
    """
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} logits rows but {labels.shape[0]} labels")
    if labels.numel() == 0:
        raise ValueError("accuracy of an empty batch")
    return float((logits.argmax(dim=-1) == labels.to(logits.device)).double().mean())


def _flat_pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    if a.shape != b.shape:
        raise ValueError(f"attribution shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dim() < 2:
        raise ValueError(f"expected [N, ...] attributions, got shape {tuple(a.shape)}")
    return a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).to(a.device).double()


def _row_pearson(a: Tensor, b: Tensor) -> Tensor:
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    denom = torch.linalg.vector_norm(a, dim=1) * torch.linalg.vector_norm(b, dim=1)
    r = (a * b).sum(dim=1) / denom
    # Rounding can push |r| a hair above 1 for (anti)proportional maps.
    return torch.where(denom > 0, r.clamp(-1.0, 1.0), torch.full_like(r, float("nan")))


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Per-image Pearson correlation over cells.

    Args:
        a: ``[N, gh, gw]`` (or any ``[N, ...]``) attributions.
        b: attributions of the same shape.

    Returns:
        ``[N]`` float64, NaN where either map is constant.
    """
    return _row_pearson(*_flat_pair(a, b))


def average_ranks(x: Tensor) -> Tensor:
    """1-based ranks along the last dimension, ties given their average rank (scipy's rankdata).

    Args:
        x: ``[N, P]`` values.

    Returns:
        ``[N, P]`` float64 ranks.
    """
    sorted_x, order = torch.sort(x, dim=-1, stable=True)
    sorted_x = sorted_x.contiguous()
    first = torch.searchsorted(sorted_x, sorted_x, right=False)
    last = torch.searchsorted(sorted_x, sorted_x, right=True)
    rank_sorted = (first + last + 1).double() / 2.0
    return torch.empty_like(rank_sorted).scatter_(-1, order, rank_sorted)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Per-image Spearman correlation over cells: Pearson of average ranks (ties averaged).

    Args:
        a: ``[N, gh, gw]`` (or any ``[N, ...]``) attributions.
        b: attributions of the same shape.

    Returns:
        ``[N]`` float64, NaN where either map is constant.
    """
    fa, fb = _flat_pair(a, b)
    return _row_pearson(average_ranks(fa), average_ranks(fb))


def topk_overlap(a: Tensor, b: Tensor, k: int) -> Tensor:
    """Per-image fraction of shared cells among the ``k`` highest of each map.

    ``|topk(a) ∩ topk(b)| / k``. Ties at the k-th value are broken by ``torch.topk``'s order,
    which is deterministic for a given input but arbitrary.

    Args:
        a: ``[N, gh, gw]`` attributions.
        b: attributions of the same shape.
        k: number of cells, ``1 <= k <= gh * gw``.

    Returns:
        ``[N]`` float64 in [0, 1].
    """
    fa, fb = _flat_pair(a, b)
    if not 1 <= k <= fa.shape[1]:
        raise ValueError(f"k must be in [1, {fa.shape[1]}], got {k}")
    in_a = torch.zeros_like(fa, dtype=torch.bool).scatter_(1, fa.topk(k, dim=1).indices, True)
    in_b = torch.zeros_like(fb, dtype=torch.bool).scatter_(1, fb.topk(k, dim=1).indices, True)
    return (in_a & in_b).sum(dim=1).double() / k


def cell_masks_to_pixels(cell_masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Upsample ``[..., gh, gw]`` cell masks to ``[..., H, W]`` pixels with nearest neighbours."""
    lead = cell_masks.shape[:-2]
    flat = cell_masks.reshape(-1, 1, *cell_masks.shape[-2:])
    pixels = F.interpolate(flat.float(), size=size, mode="nearest")
    return pixels.reshape(*lead, *size).to(cell_masks.dtype)


def _step_counts(num_cells: int, steps: int | None, device: torch.device) -> Tensor:
    if steps is None:
        steps = num_cells
    if not 1 <= steps <= num_cells:
        raise ValueError(f"steps must be in [1, {num_cells}], got {steps}")
    counts = torch.round(torch.arange(steps + 1, dtype=torch.float64) * num_cells / steps)
    return counts.long().to(device)


def _trapezoid_unit(curve: Tensor, x: Tensor) -> Tensor:
    """Trapezoid-rule area of ``curve`` ``[N, S+1]`` over ``x`` ``[S+1]`` running from 0 to 1."""
    widths = x[1:] - x[:-1]
    return ((curve[:, 1:] + curve[:, :-1]) / 2.0 * widths).sum(dim=1)


@torch.no_grad()
def insertion_deletion_auc(
    model_fn: ModelFn,
    images: Tensor,
    attributions: Tensor,
    classes: Tensor,
    *,
    grid: tuple[int, int] | None = None,
    baseline: Tensor | float,
    steps: int | None = None,
    output: Literal["prob", "logit"] = "prob",
    batch_size: int = 256,
) -> tuple[Tensor, Tensor]:
    """Insertion and deletion AUC of the explained class (Petsiuk et al., RISE, 2018).

    Cells are ordered by decreasing attribution (ties by cell index). Insertion starts from the
    baseline and pastes the image's cells in that order; deletion starts from the image and
    replaces its cells by the baseline's in that order. After each of the ``S + 1`` steps
    (``S = steps``, default one cell per step, so ``P + 1`` points for ``P`` cells) the model's
    output for the explained class is recorded, and the area under that curve is taken by the
    trapezoid rule over the fraction of cells changed, x in [0, 1]. With ``output="prob"``
    (softmax over the model's classes) both AUCs are in [0, 1]. Higher insertion and lower
    deletion are better.

    All masked images of a group of input images are built at once and sent through
    ``model_fn`` in batches of about ``batch_size``.

    Args:
        model_fn: images ``[B, 3, H, W]`` -> logits ``[B, C]``; called without gradients.
        images: ``[N, 3, H, W]`` model inputs (already normalised as the model expects).
        attributions: ``[N, gh, gw]``, one map per image.
        classes: ``[N]`` the explained class of each image.
        grid: ``(gh, gw)``; checked against the attributions when given.
        baseline: what a removed cell shows, broadcastable to ``images`` (e.g. ``[3, 1, 1]`` per
            channel means, ``[3, H, W]``, ``[N, 3, H, W]`` or a number), in model-input space.
        steps: number of steps ``S`` (cells per step ``P / S``, rounded); default ``P``.
        output: ``"prob"`` for the softmax probability, ``"logit"`` for the raw score.
        batch_size: target number of masked images per model call.

    Returns:
        ``(insertion [N], deletion [N])`` float64 on the images' device.
    """
    if images.dim() != 4 or attributions.dim() != 3:
        raise ValueError("expected images [N, 3, H, W] and attributions [N, gh, gw]")
    n, gh, gw = attributions.shape
    if grid is not None and tuple(grid) != (gh, gw):
        raise ValueError(f"grid {tuple(grid)} does not match attributions {(gh, gw)}")
    if images.shape[0] != n or classes.shape[0] != n:
        raise ValueError("images, attributions and classes must have the same length")
    if output not in ("prob", "logit"):
        raise ValueError(f"output must be 'prob' or 'logit', got {output!r}")
    device = images.device
    height, width = images.shape[-2:]
    num_cells = gh * gw
    counts = _step_counts(num_cells, steps, device)
    num_points = counts.numel()
    x = counts.double() / num_cells
    base = torch.as_tensor(baseline, dtype=images.dtype, device=device)
    base = torch.broadcast_to(base, images.shape)

    # rank_of_cell[i, c] = position of cell c in image i's order; cell c is changed at step j
    # when its position is below counts[j].
    order = torch.sort(attributions.reshape(n, -1).to(device), dim=1, descending=True, stable=True)
    rank_of_cell = torch.empty_like(order.indices).scatter_(
        1, order.indices, torch.arange(num_cells, device=device).expand(n, -1).contiguous()
    )
    # Two curves (insertion, deletion) per image, each with num_points masked inputs.
    images_per_group = max(1, batch_size // (2 * num_points))
    curves = torch.empty(n, 2, num_points, dtype=torch.float64, device=device)
    for start in range(0, n, images_per_group):
        stop = min(start + images_per_group, n)
        changed = rank_of_cell[start:stop, None, :] < counts[None, :, None]
        changed = changed.reshape(stop - start, num_points, gh, gw)
        m = cell_masks_to_pixels(changed, (height, width)).unsqueeze(2).to(images.dtype)
        img = images[start:stop, None]
        bas = base[start:stop, None]
        inserted = img * m + bas * (1 - m)
        deleted = bas * m + img * (1 - m)
        batch = torch.stack([inserted, deleted], dim=1).reshape(-1, *images.shape[1:])
        scores = []
        for chunk in batch.split(max(batch_size, 1)):
            logits = model_fn(chunk)
            if output == "prob":
                logits = logits.softmax(dim=-1)
            scores.append(logits.double())
        scores = torch.cat(scores).reshape(stop - start, 2 * num_points, -1)
        cls = classes[start:stop].to(device).long()
        picked = scores.gather(2, cls[:, None, None].expand(-1, 2 * num_points, 1)).squeeze(2)
        curves[start:stop] = picked.reshape(stop - start, 2, num_points)
    return _trapezoid_unit(curves[:, 0], x), _trapezoid_unit(curves[:, 1], x)


def cells_touching_mask(masks: Tensor, grid: tuple[int, int], tolerance: int = 0) -> Tensor:
    """Which grid cells contain at least one mask pixel.

    Args:
        masks: ``[N, H, W]`` boolean object masks.
        grid: ``(gh, gw)``.
        tolerance: dilate the mask by this many pixels (a square neighbourhood) first.

    Returns:
        ``[N, gh, gw]`` bool.
    """
    gh, gw = grid
    height, width = masks.shape[-2:]
    m = masks.float()
    if tolerance > 0:
        m = F.max_pool2d(m[:, None], 2 * tolerance + 1, stride=1, padding=tolerance)[:, 0]
    # One-hot maps pixel row -> cell row with the nearest-neighbour convention of this module.
    row_cell = torch.arange(height, device=m.device) * gh // height
    col_cell = torch.arange(width, device=m.device) * gw // width
    rows = F.one_hot(row_cell, gh).T.to(m.dtype)
    cols = F.one_hot(col_cell, gw).to(m.dtype)
    return (rows @ m @ cols) > 0


def pointing_game(attributions: Tensor, masks: Tensor, *, tolerance: int = 0) -> Tensor:
    """Pointing game (Zhang et al., 2016) at cell resolution.

    The cell with the highest attribution (the first in row-major order on ties) is a hit when
    any pixel of its block lies on the object mask, after dilating the mask by ``tolerance``
    pixels. The cell block itself is the tolerance of the default: at a 7x7 grid on 224 px a hit
    means the object is within the 32x32 block the map points at (the original uses a 15 px
    radius around a pixel).

    Args:
        attributions: ``[N, gh, gw]``.
        masks: ``[N, H, W]`` bool object masks (any non-zero value counts as object).
        tolerance: extra pixels around the object that still count.

    Returns:
        ``[N]`` bool.
    """
    n, gh, gw = attributions.shape
    if masks.dim() != 3 or masks.shape[0] != n:
        raise ValueError(f"expected masks [{n}, H, W], got {tuple(masks.shape)}")
    touched = cells_touching_mask(masks.to(attributions.device) != 0, (gh, gw), tolerance)
    best = attributions.reshape(n, -1).argmax(dim=1)
    return touched.reshape(n, -1).gather(1, best[:, None]).squeeze(1)


def cell_coverage(masks: Tensor, grid: tuple[int, int]) -> Tensor:
    """The fraction of each grid cell's pixels on the mask: ``[N, gh, gw]`` in [0, 1].

    Uses the pixel-to-cell convention of :func:`cells_touching_mask`.
    """
    gh, gw = grid
    height, width = masks.shape[-2:]
    m = (masks != 0).float()
    rows = F.one_hot(torch.arange(height, device=m.device) * gh // height, gh).T.to(m.dtype)
    cols = F.one_hot(torch.arange(width, device=m.device) * gw // width, gw).to(m.dtype)
    area = rows.sum(dim=1)[:, None] * cols.sum(dim=0)[None, :]
    return (rows @ m @ cols) / area


def pointing_chance(masks: Tensor, grid: tuple[int, int], *, tolerance: int = 0) -> Tensor:
    """Per image, the pointing-game hit probability of a uniformly random top cell.

    The chance level against which :func:`pointing_game` must be read: on a domain whose
    evidence covers most cells (the background of ``scenes``) a random map already scores high.

    Returns:
        ``[N]`` fraction of cells that touch the (dilated) mask.
    """
    touched = cells_touching_mask(masks != 0, grid, tolerance)
    return touched.flatten(1).float().mean(dim=1)


def energy_pointing(attributions: Tensor, masks: Tensor) -> Tensor:
    """Share of the positive attribution that falls on the evidence mask (energy-based pointing).

    Each cell's positive attribution is split by the fraction of its pixels on the mask. Unlike
    the pointing game it uses the whole map, not only its arg-max; its chance level is the mask's
    share of the image (a flat map scores exactly that).

    Returns:
        ``[N]`` in [0, 1]; NaN for a map with no positive cell.
    """
    n, gh, gw = attributions.shape
    coverage = cell_coverage(masks.to(attributions.device), (gh, gw)).to(attributions.dtype)
    positive = attributions.clamp(min=0).reshape(n, -1)
    total = positive.sum(dim=1)
    inside = (positive * coverage.reshape(n, -1)).sum(dim=1)
    return torch.where(total > 0, inside / total.clamp(min=1e-12), torch.nan)


def topk_off_evidence(attributions: Tensor, masks: Tensor, k: int = 5) -> Tensor:
    """Share of the ``k`` top cells lying mostly (over half their pixels) off the evidence mask.

    On ``scenes`` the evidence is the background, so this is the share of top cells on the
    distractor object: the signal of a vector that moves attention onto the object there.

    Returns:
        ``[N]`` in [0, 1].
    """
    n, gh, gw = attributions.shape
    coverage = cell_coverage(masks.to(attributions.device), (gh, gw)).reshape(n, -1)
    k = min(k, gh * gw)
    top = attributions.reshape(n, -1).topk(k, dim=1).indices
    return (coverage.gather(1, top) < 0.5).float().mean(dim=1)


def explanation_quality(
    attributions: Tensor,
    *,
    reference: Tensor | None = None,
    k: int = 5,
    model_fn: ModelFn | None = None,
    images: Tensor | None = None,
    classes: Tensor | None = None,
    baseline: Tensor | float | None = None,
    steps: int | None = None,
    output: Literal["prob", "logit"] = "prob",
    batch_size: int = 256,
    masks: Tensor | None = None,
    tolerance: int = 0,
    logits: Tensor | None = None,
    labels: Tensor | None = None,
    reduce: bool = True,
) -> dict[str, float] | dict[str, Tensor]:
    """Every metric the inputs allow, for one batch, named as in the sweep table.

    - ``pearson``, ``spearman``, ``topk``: when a ``reference`` (Kernel SHAP) is given;
    - ``insertion_auc``, ``deletion_auc``: when ``model_fn``, ``images``, ``classes`` and
      ``baseline`` are given;
    - ``pointing``, ``pointing_chance``, ``energy_pointing``, ``topk_off_evidence``: when
      evidence ``masks`` are given;
    - ``deletion_normalised``: deletion AUC over the full image's probability (``prob`` only;
      NaN where that probability is below chance, ``1 / classes``);
    - ``accuracy``: when ``logits`` and ``labels`` are given.

    Args:
        attributions: ``[N, gh, gw]`` maps to evaluate.
        reference: ``[N, gh, gw]`` reference maps.
        k: cells for ``topk``.
        model_fn: see :func:`insertion_deletion_auc`.
        images: see :func:`insertion_deletion_auc`.
        classes: see :func:`insertion_deletion_auc`.
        baseline: see :func:`insertion_deletion_auc`.
        steps: see :func:`insertion_deletion_auc`.
        output: see :func:`insertion_deletion_auc`.
        batch_size: see :func:`insertion_deletion_auc`.
        masks: ``[N, H, W]`` object masks for the pointing game.
        tolerance: pointing-game tolerance in pixels.
        logits: ``[N, C]`` predictions for accuracy.
        labels: ``[N]`` true classes for accuracy.
        reduce: return batch means (NaN-ignoring; pointing as a hit rate) instead of per-image
            tensors.

    Returns:
        ``{name: mean}`` (floats) with ``n`` the batch size, or ``{name: [N] tensor}`` when
        ``reduce`` is false (``accuracy`` then as per-image correctness).
    """
    per_image: dict[str, Tensor] = {}
    if reference is not None:
        per_image["pearson"] = pearson(attributions, reference)
        per_image["spearman"] = spearman(attributions, reference)
        per_image["topk"] = topk_overlap(attributions, reference, k)
    faithfulness_inputs = (model_fn, images, classes, baseline)
    if all(v is not None for v in faithfulness_inputs):
        ins, dele = insertion_deletion_auc(
            model_fn,
            images,
            attributions,
            classes,
            baseline=baseline,
            steps=steps,
            output=output,
            batch_size=batch_size,
        )
        per_image["insertion_auc"], per_image["deletion_auc"] = ins, dele
        if output == "prob":
            # Deletion relative to where it starts: a confident model's curve has further to fall.
            # An image whose class the model already gives less than chance has no confidence to
            # lose, and the ratio would explode (one image at p = 4e-4 put a target's mean at 28):
            # it is not measurable (NaN), and the sweep's paired differences drop it.
            with torch.no_grad():
                probs = model_fn(images).softmax(dim=-1)
            full = probs.gather(1, classes.to(probs.device).long()[:, None]).squeeze(1)
            full = full.to(dele.device, dele.dtype)
            chance = 1.0 / probs.shape[-1]
            per_image["deletion_normalised"] = torch.where(
                full >= chance, dele / full, torch.full_like(dele, math.nan)
            )
    elif any(v is not None for v in faithfulness_inputs):
        raise ValueError("insertion/deletion needs model_fn, images, classes and baseline")
    if masks is not None:
        per_image["pointing"] = pointing_game(attributions, masks, tolerance=tolerance)
        per_image["pointing_chance"] = pointing_chance(
            masks.to(attributions.device), attributions.shape[1:], tolerance=tolerance
        )
        per_image["energy_pointing"] = energy_pointing(attributions, masks)
        per_image["topk_off_evidence"] = topk_off_evidence(attributions, masks, k)
    if logits is not None and labels is not None:
        per_image["accuracy"] = logits.argmax(dim=-1) == labels.to(logits.device)
    if not reduce:
        return per_image
    means = {name: float(values.double().nanmean()) for name, values in per_image.items()}
    means["n"] = float(attributions.shape[0])
    return means

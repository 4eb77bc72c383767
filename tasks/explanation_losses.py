"""The explanation losses of theta_X's fine-tuning, and the Pearson they are read by.

- :func:`explanation_loss`: the paper's regression of each label-class map on its Kernel SHAP
  label, per-image standardised (``2 (1 - r)``);
- :func:`game_loss`: the FastSHAP / ViT-Shapley objective on the coalitions the label was solved
  from (``game.npz``), on the same scale;
- :func:`consistency_loss` with :class:`LabelledGame`: keeps the trained model's values on
  those coalitions at the labelled model's, so the labels stay true of it;
- :func:`explanation_term`: which of the first two a batch trains on.

:mod:`tasks.finetune` runs them; docs/method.md derives them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from storage import open_storage
from tasks.algorithms.kernel_shap import coalition_values
from tasks.data.stream import GameBatch
from tasks.model import SelfExplainingCLIP, standardize_per_image


def explanation_loss(
    attributions: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Mean squared difference of per-image standardised label-class maps and SHAP targets.

    Standardising both sides makes the loss invariant to a positive affine map of either, which
    is why the SEM needs no attribution scale and offset parameters (docs/method.md).

    Args:
        attributions: ``[B, C, gh, gw]`` SEM attributions.
        labels: ``[B]`` label ids.
        targets: ``[B, gh, gw]`` SHAP maps of the label class.
    """
    label_maps = attributions[torch.arange(labels.shape[0], device=labels.device), labels]
    return F.mse_loss(standardize_per_image(label_maps.float()), standardize_per_image(targets))


def game_loss(
    attributions: torch.Tensor, labels: torch.Tensor, games: GameBatch, eps: float = 1e-12
) -> torch.Tensor:
    """The Shapley regression objective on each label-class map's own game (FastSHAP, ViT-Shapley).

    The map ``m`` of an image is read as the attributions ``phi = a (m - mean m) + D / P``, where
    ``D = v(full) - v(empty)`` is shared out evenly (efficiency holds for every ``a``) and the
    scale ``a >= 0`` is fitted to the image's game in closed form. The weighted least-squares
    residual of the coalitions, ``sum_S w_S (v(empty) + sum_{i in S} phi_i - v(S))^2``, then
    depends on ``m`` only through the weighted cosine of ``x_S = sum_{i in S} (m_i - mean m)``
    with ``y_S = v(S) - v(empty) - |S| D / P``; the loss is ``2 (1 - cosine)`` per image, on the
    scale of :func:`explanation_loss` (which is ``2 (1 - r)``), and like it invariant to a
    positive affine map of ``m``. Over all coalitions with the Shapley kernel's weights it is
    ``2 (1 - c r)``, with ``r`` the Pearson of ``m`` with the exact Shapley values and ``c <= 1``
    a constant of the game (1 when the game is additive): the same optimum as the label loss,
    reached from the sampled coalitions instead of their solution.

    Args:
        attributions: ``[B, C, gh, gw]`` SEM attributions.
        labels: ``[B]`` label ids.
        games: the label class's games of the batch.
        eps: keeps a constant map or game finite.
    """
    label_maps = attributions[torch.arange(labels.shape[0], device=labels.device), labels]
    dtype = torch.promote_types(label_maps.dtype, torch.float32)
    maps = label_maps.to(dtype).flatten(1)
    coalitions, w, values, v_empty, v_full = (t.to(dtype) for t in games)
    centred = maps - maps.mean(dim=1, keepdim=True)
    share = (v_full - v_empty) / maps.shape[1]
    x = torch.einsum("blp,bp->bl", coalitions, centred)
    y = values - v_empty[:, None] - coalitions.sum(dim=2) * share[:, None]
    cosine = (w * x * y).sum(1) / torch.sqrt((w * x * x).sum(1) * (w * y * y).sum(1) + eps)
    return (2 * (1 - cosine)).mean()


@dataclass(frozen=True)
class LabelledGame:
    """How the labels of an X-dataset valued their coalitions (for :func:`consistency_loss`).

    Attributes:
        baseline: the labeller's baseline (its dataset mean as a tensor, or a name).
        output: ``"logit"`` or ``"prob"``.
        grid: ``(gh, gw)`` cells.
    """

    baseline: str | torch.Tensor
    output: str
    grid: tuple[int, int]

    @classmethod
    def of_dataset(cls, uri: str) -> LabelledGame:
        """The labelling settings recorded in an X-dataset version's ``config.json``."""
        meta = open_storage(uri).read_json("config.json")
        label = meta["config"]["label"]
        baseline: str | torch.Tensor = label["baseline"]
        if baseline == "mean":
            baseline = torch.tensor(meta["baseline_mean"], dtype=torch.float32)
        return cls(baseline, label["output"], (int(label["grid_h"]), int(label["grid_w"])))


def consistency_loss(
    model: SelfExplainingCLIP,
    images: torch.Tensor,
    labels: torch.Tensor,
    games: GameBatch,
    labelled: LabelledGame,
    coalitions: int,
    generator: torch.Generator,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Keeps the model's game where its labels were measured: ``mean ((v(S) - v_label(S)) / sd)^2``.

    The labels are Kernel SHAP of the labelled model (theta_P by default); they are true of the
    model being trained only while its values on the same coalitions stay the labelled model's.
    For ``coalitions`` of each image's kept coalitions, drawn afresh each step from
    ``generator``, the model's value of the label class is compared with the recorded one,
    in units of the standard deviation of the image's recorded values (so that every image
    weighs the same whatever its logit scale). At the labelled model the term is zero.

    Args:
        model: the SEM being trained.
        images: ``[B, 3, H, W]`` the batch (in ``[0, 1]``).
        labels: ``[B]`` label ids (each game's class).
        games: the label class's games of the batch.
        labelled: the labeller's baseline, output and grid.
        coalitions: coalitions drawn per image.
        generator: the draw's generator (CPU).
        eps: keeps a constant game finite.
    """
    real = games.weights > 0
    scores = torch.rand(real.shape, generator=generator).to(real.device)
    scores = scores.masked_fill(~real, -1.0)
    take = scores.topk(min(coalitions, real.shape[1]), dim=1).indices
    masks = games.coalitions.gather(1, take.unsqueeze(-1).expand(-1, -1, games.coalitions.shape[2]))
    recorded = games.values.gather(1, take)
    valid = real.gather(1, take)
    baseline = labelled.baseline
    if isinstance(baseline, torch.Tensor):
        baseline = baseline.to(images.device)
    values = coalition_values(
        model.as_classifier(),
        images,
        labels,
        masks,
        baseline=baseline,
        grid=labelled.grid,
        output=labelled.output,
    )
    spread = torch.where(real, games.values, 0.0)
    count = real.sum(dim=1).clamp(min=2)
    mean = spread.sum(dim=1) / count
    sd = torch.sqrt(((torch.where(real, games.values - mean[:, None], 0.0)) ** 2).sum(1) / count)
    error = ((values - recorded) / (sd[:, None] + eps)) ** 2
    return (error * valid).sum() / valid.sum().clamp(min=1)


def pearson_per_image(maps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each ``[gh, gw]`` map with its target: ``[B]``."""
    a = standardize_per_image(maps.float()).flatten(1)
    b = standardize_per_image(targets.float()).flatten(1)
    return (a * b).mean(dim=1)


def explanation_term(
    maps: torch.Tensor,
    labels: torch.Tensor,
    batch: Any,
    device: torch.device,
    x_loss: str = "labels",
    common_map: float = 0.0,
) -> torch.Tensor | None:
    """The batch's explanation loss (None without targets: P mode).

    With ``common_map`` > 0 the same loss also asks the map along the head's common direction,
    the mean over classes of the class maps (each a cosine with a unit class embedding, so
    their mean reads the patches along the classes' mean embedding), to match the label; its
    weight is ``common_map``. That direction is the part of the head other domains share.
    """
    if x_loss == "game" and batch.games is not None:
        games = batch.games.to(device)
        loss = game_loss(maps, labels, games)
        if common_map > 0:
            loss = loss + common_map * game_loss(_common(maps), _zeros(labels), games)
        return loss
    if batch.targets is None:
        return None
    targets = batch.targets.to(device)
    loss = explanation_loss(maps, labels, targets)
    if common_map > 0:
        loss = loss + common_map * explanation_loss(_common(maps), _zeros(labels), targets)
    return loss


def _common(maps: torch.Tensor) -> torch.Tensor:
    """``[B, 1, gh, gw]``: the mean of the class maps, the map along the common direction."""
    return maps.mean(dim=1, keepdim=True)


def _zeros(labels: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(labels)

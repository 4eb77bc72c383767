"""Batched Kernel SHAP over a grid of image cells (stage 1 of the pipeline, DESIGN.md).

(Over 500 lines: sampling, the constrained solve and the batched masking engine are one
algorithm whose parts share the coalition layout; they are tested together against shap. The
schedule that overlaps them across batches is a module of its own, kernel_shap_stream.)

The players are the cells of a ``gh x gw`` grid over the image. A coalition keeps its cells and
replaces the others by a baseline; its value is the explained model's logit (or probability) of a
class. By default (``sampler="leverage"``) coalitions follow Leverage SHAP (sizes uniform,
stratified complementary pairs without replacement, exact reweighting) and the attributions
solve the projected regression shrunk towards its known population Gram matrix, which stays
stable near ``2P`` evaluations (tasks/algorithms/leverage_shap.py). With ``sampler="kernel"`` coalitions are
drawn exactly as ``shap.KernelExplainer`` draws them (whole subset sizes enumerated while the
budget covers them, the rest sampled from the Shapley kernel in complementary pairs) and the
attributions solve the same weighted least squares with the efficiency constraint, so on the
same coalitions the result equals shap's.

What differs from shap is the execution: the coalitions of every image of a batch go through the
model together in large forward batches on the model's device, and all regressions are solved at
once with batched ``torch.linalg`` in float64. When the model implements :class:`TokenMaskable`
and the grid cells are whole blocks of ViT patches, masking happens on the patch embeddings
instead of the pixels; because the patch embedding is a convolution with stride = kernel = patch,
this gives the same values without materialising one image per coalition.

A batch is explained in three steps that need different resources: :func:`plan_coalitions`
(the coalitions of every image from its seed, and the layout of the forward rows: CPU only),
:func:`evaluate_coalitions` (the forwards on the model's device, the values copied back by one
non-blocking copy) and :func:`solve_coalitions` (the regressions, CPU, float64).
:func:`kernel_shap_explain` runs them in turn; :mod:`tasks.algorithms.kernel_shap_stream`
overlaps them across batches, so that the model never waits for sampling or solving.

Any model can be explained; :class:`TokenMaskable` is the protocol a ViT classifier implements
to get token masking (:mod:`tasks.model.vit` and :mod:`tasks.model.sem` do).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasks.algorithms.games import CoalitionGame
from tasks.algorithms.leverage_shap import (
    BOOTSTRAP_REPLICATES,
    default_shrinkage,
    front_loaded,
    sample_leverage_coalitions_batch,
    solve_leverage_shap,
)

log = logging.getLogger(__name__)

BASELINES = ("mean", "zero", "blur")
OUTPUTS = ("logit", "prob")
MASKINGS = ("auto", "pixel", "token")
#: ``"leverage"``: Leverage SHAP with the shrunk solve (tasks/algorithms/leverage_shap.py), the default;
#: ``"kernel"``: shap.KernelExplainer's sampling and solve, identical to shap.
SAMPLERS = ("leverage", "kernel")
#: Precision of the masked forwards: ``"fp32"``; ``"bf16"`` or ``"fp16"``: the model under
#: autocast in that type (the models of tasks/model keep their logit head in float32 even
#: then); ``"auto"``: ``"fp32"`` on every device. Measured on CPU autocast (the same rounding as
#: CUDA's), on a random tiny-vit-56 at budget 150 whose game is nearly additive (estimator
#: error 0.2% against a budget-2000 reference): fp16 moves the labels by 5.7% of their norm and
#: bf16 by 50%, far more than the 2% of the estimator's own error a default may add, so neither
#: is the default (docs/benchmarks.md, "Label precision").
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_BATCH_ROWS = 1024
# eigenvalues of the normal equations below this fraction of the largest count as zero
RCOND = 1e-10


@runtime_checkable
class TokenMaskable(Protocol):
    """A classifier whose input can be masked in ViT patch-token space.

    Attributes:
        patch_grid: the ViT token grid ``(rows, cols)``, e.g. ``(7, 7)``.
    """

    patch_grid: tuple[int, int]

    def embed_patches(self, images: Tensor) -> Tensor:
        """Patch embeddings ``[B, rows * cols, D]`` (row-major, before class and position tokens)."""
        ...

    def forward_from_patches(self, patch_tokens: Tensor) -> Tensor:
        """Logits ``[B, C]`` computed from patch embeddings as returned by :meth:`embed_patches`."""
        ...


@dataclass
class KernelShapResult:
    """Kernel SHAP attributions of a batch of images and what is needed to reproduce them.

    Attributes:
        phi: float32 ``[N, k, gh, gw]`` (``[N, gh, gw]`` when ``classes`` was 1-D), on the CPU.
        v_empty: float64 ``[N, k]`` (or ``[N]``): value of the all-baseline image.
        v_full: float64 ``[N, k]`` (or ``[N]``): value of the unmasked image.
        classes: ``[N, k]`` (or ``[N]``) explained classes.
        evaluations: ``[N]`` model evaluations per image, empty and full included (lower than
            the budget only when it exceeds ``2 ** players`` or sampling ran out of new
            coalitions, as in shap).
        seeds: the per-image seeds.
        budget: requested evaluations per image.
        grid: ``(gh, gw)``.
        baseline: name of the baseline (``"tensor"`` for a given tensor).
        output: ``"logit"`` or ``"prob"``.
        masking: ``"pixel"`` or ``"token"``: how coalitions were applied.
        sampler: ``"leverage"`` or ``"kernel"``.
        phi_err: bootstrap standard error of ``phi`` (same shape), when it was asked for.
        precision: the precision the model's values were computed in (``"fp32"``, ``"bf16"``,
            ``"fp16"``: :data:`PRECISIONS` resolved for the model's device).
        games: each image's evaluated coalitions (:class:`~tasks.algorithms.games.CoalitionGame`),
            from which :func:`solve_games` gives ``phi`` again without the model.
    """

    phi: Tensor
    v_empty: Tensor
    v_full: Tensor
    classes: Tensor
    evaluations: Tensor
    seeds: list[int]
    budget: int
    grid: tuple[int, int]
    baseline: str
    output: str
    masking: str
    sampler: str = "kernel"
    phi_err: Tensor | None = None
    precision: str = "fp32"
    games: list[CoalitionGame] | None = None

    def relative_error(self) -> Tensor | None:
        """``[N, k]`` (or ``[N]``): estimated ``||phi - exact|| / ||phi||`` per image and class."""
        if self.phi_err is None:
            return None
        err = self.phi_err.flatten(-2).norm(dim=-1)
        return err / self.phi.flatten(-2).norm(dim=-1).clamp_min(1e-12)

    def image_metadata(self, index: int) -> dict[str, Any]:
        """JSON-able labelling metadata of one image (the ``json`` field of an X-dataset)."""
        classes = self.classes[index].reshape(-1)
        meta = {
            "classes": [int(c) for c in classes],
            "v_empty": [float(v) for v in self.v_empty[index].reshape(-1)],
            "v_full": [float(v) for v in self.v_full[index].reshape(-1)],
            "budget": self.budget,
            "evaluations": int(self.evaluations[index]),
            "seed": self.seeds[index],
            "grid": list(self.grid),
            "baseline": self.baseline,
            "output": self.output,
            "sampler": self.sampler,
        }
        if self.precision != "fp32":  # float32 labels keep the metadata they always had
            meta["precision"] = self.precision
        return meta


def derive_seed(key: str, seed: int) -> int:
    """A stable per-image seed from a sample key and a global seed (63 bits)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def shapley_kernel_weights(num_players: int) -> np.ndarray:
    """shap's normalised weight of each subset size ``1..ceil((P-1)/2)`` (paired sizes doubled)."""
    m = num_players
    sizes = np.arange(1, math.ceil((m - 1) / 2) + 1)
    weights = (m - 1.0) / (sizes * (m - sizes))
    weights[: (m - 1) // 2] *= 2
    return weights / weights.sum()


def sample_coalitions(
    num_players: int, num_samples: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Coalitions and kernel weights exactly as ``shap.KernelExplainer`` draws them.

    Subset sizes are visited from the outside in (``s`` with ``P - s``); a size is enumerated
    whole while the remaining budget times its remaining kernel weight covers every subset of
    it, then the other sizes are drawn from the kernel distribution in complementary pairs,
    repeated draws adding weight to the coalition already drawn instead of a new evaluation.
    The sampled weights are scaled to the kernel weight left after the enumerated sizes.

    Args:
        num_players: ``P`` >= 2.
        num_samples: coalitions wanted, empty and full excluded (shap's ``nsamples``); capped
            at ``2 ** P - 2``.
        generator: CPU generator; the coalitions depend on it only.

    Returns:
        ``(masks bool [K, P], weights float64 [K])`` with ``K <= num_samples``.
    """
    m = num_players
    if m < 2:
        raise ValueError("Kernel SHAP needs at least 2 players")
    if m <= 30:
        num_samples = min(num_samples, 2**m - 2)
    num_subset_sizes = math.ceil((m - 1) / 2)
    num_paired = (m - 1) // 2
    weight_vector = shapley_kernel_weights(m)

    masks: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    num_full = 0
    left = float(num_samples)
    remaining = weight_vector.copy()
    for size in range(1, num_subset_sizes + 1):
        paired = size <= num_paired
        count = math.comb(m, size)
        nsubsets = count * (2 if paired else 1)
        if left * remaining[size - 1] / nsubsets < 1.0 - 1e-8:
            break
        num_full += 1
        left -= nsubsets
        if remaining[size - 1] < 1.0:
            remaining /= 1 - remaining[size - 1]
        combos = np.array(list(itertools.combinations(range(m), size)), dtype=np.int64)
        block = np.zeros((count, m), dtype=bool)
        np.put_along_axis(block, combos, True, axis=1)
        if paired:
            # shap adds each subset immediately followed by its complement
            block = np.stack([block, ~block], axis=1).reshape(-1, m)
        masks.append(block)
        weights.append(np.full(len(block), weight_vector[size - 1] / count / (2 if paired else 1)))

    fixed = sum(len(b) for b in masks)
    samples_left = num_samples - fixed
    if num_full != num_subset_sizes and samples_left > 0:
        size_probs = weight_vector.copy()
        size_probs[:num_paired] /= 2  # a paired draw yields two coalitions
        size_probs = size_probs[num_full:]
        size_probs /= size_probs.sum()
        size_probs = torch.from_numpy(size_probs)
        max_draws = 4 * samples_left  # shap's cap: repeated draws only add weight
        total_draws = 0
        drawn: list[np.ndarray] = []
        counts: list[float] = []
        seen: dict[bytes, int] = {}
        while samples_left > 0 and total_draws < max_draws:
            # draw in chunks: one chunk of samples_left is nearly always enough
            chunk = min(samples_left, max_draws - total_draws)
            total_draws += chunk
            sizes = torch.multinomial(size_probs, chunk, replacement=True, generator=generator)
            sizes = (sizes + num_full + 1).numpy()
            order = torch.rand(chunk, m, generator=generator).numpy().argsort(axis=1)
            candidates = np.zeros((chunk, m), dtype=bool)
            members = np.arange(m)[None, :] < sizes[:, None]
            np.put_along_axis(candidates, order, members, axis=1)
            paired = sizes <= num_paired
            for i in range(chunk):
                if samples_left <= 0:
                    break
                mask = candidates[i]
                key = mask.tobytes()
                j = seen.get(key)
                if j is None:
                    seen[key] = len(drawn)
                    drawn.append(mask)
                    counts.append(1.0)
                    samples_left -= 1
                    if samples_left > 0 and paired[i]:
                        drawn.append(~mask)
                        counts.append(1.0)
                        samples_left -= 1
                else:
                    counts[j] += 1.0
                    if paired[i]:
                        counts[j + 1] += 1.0
        if drawn:
            sampled = np.asarray(counts)
            sampled *= weight_vector[num_full:].sum() / sampled.sum()
            masks.append(np.stack(drawn))
            weights.append(sampled)

    if not masks:
        return torch.zeros(0, m, dtype=torch.bool), torch.zeros(0, dtype=torch.float64)
    return torch.from_numpy(np.concatenate(masks)), torch.from_numpy(np.concatenate(weights))


def solve_kernel_shap(
    masks: Tensor, weights: Tensor, values: Tensor, v_empty: Tensor, v_full: Tensor
) -> Tensor:
    """Constrained weighted least squares of Kernel SHAP, batched over images, in float64.

    As shap does, the last player is eliminated with the efficiency constraint
    ``sum(phi) = v_full - v_empty`` and the normal equations of the other ``P - 1`` are solved.
    One system per image serves all its explained classes. An image whose system is rank
    deficient by its eigenvalues (fewer than about ``2 * P`` coalitions: a coalition and its
    complement give the same row up to sign) gets the minimum-norm least-squares solution,
    shap's fallback for singular systems, instead of noise.

    Args:
        masks: ``[N, K, P]`` coalitions (bool or 0/1); padding rows must have weight 0.
        weights: ``[N, K]`` kernel weights.
        values: ``[N, K, k]`` coalition values.
        v_empty: ``[N, k]`` value of the empty coalition.
        v_full: ``[N, k]`` value of the full coalition.

    Returns:
        ``phi`` float64 ``[N, P, k]``.
    """
    z = masks.to(torch.float64)
    w = weights.to(torch.float64)
    v_empty = v_empty.to(torch.float64)
    delta = v_full.to(torch.float64) - v_empty
    players = z.shape[-1]
    if players == 1:
        return delta.unsqueeze(1)
    last = z[:, :, -1:]
    y = values.to(torch.float64) - v_empty.unsqueeze(1) - last * delta.unsqueeze(1)
    x = z[:, :, :-1] - last
    wx = w.unsqueeze(-1) * x
    gram = wx.transpose(1, 2) @ x
    rhs = wx.transpose(1, 2) @ y
    coef, info = torch.linalg.solve_ex(gram, rhs)
    # Complementary coalitions give the same regression row up to sign, so a budget below about
    # 2 * P leaves the system rank deficient, which an LU solve does not notice in floating point.
    eigenvalues = torch.linalg.eigvalsh(gram)
    tolerance = RCOND * eigenvalues[:, -1:].clamp_min(torch.finfo(torch.float64).tiny)
    deficient = ((eigenvalues > tolerance).sum(dim=1) < players - 1) | (info != 0)
    if bool(deficient.any()):
        log.warning(
            "%d of %d Kernel SHAP systems are rank deficient (budget too small for %d players); "
            "using the minimum-norm least-squares solution",
            int(deficient.sum()),
            len(deficient),
            players,
        )
        pinv = torch.linalg.pinv(gram[deficient], rtol=RCOND, hermitian=True)
        coef[deficient] = pinv @ rhs[deficient]
    phi_last = delta.unsqueeze(1) - coef.sum(dim=1, keepdim=True)
    return torch.cat([coef, phi_last], dim=1)


def model_device(model: Callable[[Tensor], Tensor], fallback: torch.device) -> torch.device:
    """The device of a module's first parameter or buffer, else ``fallback``."""
    if isinstance(model, nn.Module):
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            return tensor.device
    return fallback


def _cell_index(size: int, cells: int, device: torch.device) -> Tensor:
    """Cell of each of ``size`` positions split into ``cells`` near-equal bands."""
    return torch.arange(size, device=device) * cells // size


def _cell_map(rows: int, cols: int, grid: tuple[int, int], device: torch.device) -> Tensor:
    """Cell of each position of a ``rows x cols`` grid (row-major, flat) in the ``grid`` cells."""
    row_cell = _cell_index(rows, grid[0], device)
    col_cell = _cell_index(cols, grid[1], device)
    return (row_cell.unsqueeze(1) * grid[1] + col_cell.unsqueeze(0)).reshape(-1)


def blur_baseline(images: Tensor, grid: tuple[int, int]) -> Tensor:
    """The ``"blur"`` baseline: a gaussian blur with sigma = half a cell (reflect padding).

    A cell replaced by its blurred version keeps little of its own content but the image's
    colours, which is the point of this baseline.

    Args:
        images: ``[N, C, H, W]``.
        grid: ``(gh, gw)`` cells, which set the blur width.
    """
    height, width = images.shape[-2:]
    sigma = max(height / grid[0], width / grid[1]) / 2
    radius = min(math.ceil(3 * sigma), min(height, width) - 1)
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    x = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


_gaussian_blur = blur_baseline


def _baseline_images(
    images: Tensor, baseline: str | Tensor, grid: tuple[int, int]
) -> tuple[Tensor, str, bool]:
    """Baseline images ``[N or 1, 3, H, W]``, their name, and whether one is shared by all."""
    n, channels, height, width = images.shape
    if isinstance(baseline, Tensor):
        b = baseline.to(device=images.device, dtype=images.dtype)
        if b.shape == (channels,):
            b = b.view(1, channels, 1, 1).expand(1, channels, height, width)
        elif b.shape == (channels, height, width):
            b = b.unsqueeze(0)
        elif b.shape != (n, channels, height, width):
            raise ValueError(
                f"baseline tensor must be [{channels}], [{channels},H,W] or [N,{channels},H,W],"
                f" got {tuple(b.shape)}"
            )
        return b, "tensor", b.shape[0] == 1
    if baseline == "mean":
        mean = images.mean(dim=(0, 2, 3)).view(1, channels, 1, 1)
        return mean.expand(1, channels, height, width), "mean", True
    if baseline == "zero":
        return images.new_zeros(1, channels, height, width), "zero", True
    if baseline == "blur":
        return blur_baseline(images, grid), "blur", False
    raise ValueError(f"baseline must be one of {BASELINES} or a tensor, got {baseline!r}")


def _seeds(seed: int | Sequence[int] | Tensor, n: int) -> list[int]:
    if isinstance(seed, Tensor):
        seed = seed.reshape(-1).tolist()
    if isinstance(seed, int):
        return [seed] * n
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} images")
    return seeds


def _token_cells(model: Any, images: Tensor, grid: tuple[int, int], masking: str) -> Tensor | None:
    """Cell index of each ViT token when token masking applies, else ``None``."""
    if masking == "pixel":
        return None
    height, width = images.shape[-2:]
    aligned = False
    if isinstance(model, TokenMaskable):
        rows, cols = model.patch_grid
        aligned = (
            rows % grid[0] == 0 and cols % grid[1] == 0 and height % rows == 0 and width % cols == 0
        )
    if not aligned:
        if masking == "token":
            raise ValueError(
                "token masking needs a TokenMaskable model whose patch grid is an integer "
                f"multiple of the cell grid {grid} and divides the image size"
            )
        return None
    return _cell_map(rows, cols, grid, images.device)


def coalition_values(
    model: Any,
    images: Tensor,
    classes: Tensor,
    coalitions: Tensor,
    *,
    baseline: str | Tensor = "mean",
    grid: tuple[int, int] = (7, 7),
    output: str = "logit",
    masking: str = "auto",
) -> Tensor:
    """The values ``v(S)`` of given coalitions, differentiable in the model's parameters.

    The same masking as the labeller's (token masking when the model's patch grid is a multiple
    of the cell grid, else pixels), without its batching engine: every masked input goes through
    the model in one call, with autograd on, which is what training on a model's own game needs.

    Args:
        model: a classifier of images in ``[0, 1]`` (token masking when it is TokenMaskable).
        images: ``[N, 3, H, W]``.
        classes: ``[N]`` the class whose value each image's coalitions take.
        coalitions: ``[N, k, P]`` 0/1 (or bool) coalitions over the ``grid`` cells.
        baseline: ``"mean"`` (of ``images``), ``"zero"``, ``"blur"`` or a tensor, as
            :func:`kernel_shap`.
        grid: ``(gh, gw)`` cells, ``P = gh * gw``.
        output: ``"logit"`` or ``"prob"``.
        masking: ``"auto"``, ``"pixel"`` or ``"token"``.

    Returns:
        ``[N, k]`` values in the model's output dtype promoted to float32.
    """
    n, k, players = coalitions.shape
    if players != grid[0] * grid[1]:
        raise ValueError(f"coalitions have {players} players, grid {grid} has {grid[0] * grid[1]}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    keep_cells = coalitions.to(images.device) > 0.5
    owner = torch.arange(n, device=images.device).repeat_interleave(k)
    base, _, shared = _baseline_images(images, baseline, grid)
    base_owner = torch.zeros_like(owner) if shared else owner
    token_cells = _token_cells(model, images, grid, masking)
    if token_cells is not None:
        tokens = model.embed_patches(images)
        base_tokens = model.embed_patches(base)
        keep = keep_cells.flatten(0, 1)[:, token_cells].unsqueeze(-1)
        logits = model.forward_from_patches(
            torch.where(keep, tokens[owner], base_tokens[base_owner])
        )
    else:
        height, width = images.shape[-2:]
        cells = _cell_map(height, width, grid, images.device)
        keep = keep_cells.flatten(0, 1)[:, cells].view(n * k, 1, height, width)
        logits = model(torch.where(keep, images[owner], base[base_owner]))
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if output == "prob":
        logits = logits.softmax(dim=-1)
    return logits.gather(1, classes.to(images.device)[owner].unsqueeze(1)).view(n, k)


@dataclass(frozen=True)
class KernelShapConfig:
    """How a batch is explained: the players, the budget and the rest, checked once.

    The arguments of :func:`kernel_shap_explain` that do not depend on the batch; see there.
    """

    grid: tuple[int, int] = (7, 7)
    budget: int = 150
    baseline: str | Tensor = "mean"
    output: str = "logit"
    batch_size: int = DEFAULT_BATCH_ROWS
    masking: str = "auto"
    sampler: str = "leverage"
    error_estimate: bool = False
    precision: str = "auto"
    shrinkage: float | None = None
    front_load: bool = False

    def __post_init__(self) -> None:
        grid = (int(self.grid[0]), int(self.grid[1]))
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "batch_size", int(self.batch_size or DEFAULT_BATCH_ROWS))
        if grid[0] * grid[1] < 2:
            raise ValueError(f"grid {grid} has fewer than 2 cells")
        if self.budget < 2:
            raise ValueError("budget counts the empty and full coalitions and must be >= 2")
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {self.output!r}")
        if self.masking not in MASKINGS:
            raise ValueError(f"masking must be one of {MASKINGS}, got {self.masking!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.error_estimate and self.sampler != "leverage":
            raise ValueError(
                "error_estimate needs the leverage sampler (its pairs are bootstrapped)"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.shrinkage is not None and not 0 <= self.shrinkage <= 1:
            raise ValueError(f"shrinkage must be in [0, 1] or None, got {self.shrinkage}")
        if self.shrinkage is not None and self.sampler != "leverage":
            raise ValueError("shrinkage is a setting of the leverage sampler's solve")
        if self.front_load and self.sampler != "leverage":
            raise ValueError("front_load is a setting of the leverage sampler's design")
        if isinstance(self.baseline, str) and self.baseline not in BASELINES:
            raise ValueError(
                f"baseline must be one of {BASELINES} or a tensor, got {self.baseline!r}"
            )

    @property
    def players(self) -> int:
        return self.grid[0] * self.grid[1]

    def forward_precision(self, device: torch.device) -> str:
        """The precision of the masked forwards on ``device``: ``"auto"`` resolved."""
        return "fp32" if self.precision == "auto" else self.precision


def check_batch(images: Tensor, classes: Tensor) -> None:
    """Raise ``ValueError`` unless ``images`` is ``[N, 3, H, W]`` (N >= 1), ``classes`` ``[N(, k)]``."""
    if images.dim() != 4:
        raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
    n = images.shape[0]
    if n == 0:
        raise ValueError("images must hold at least one image")
    if classes.dim() not in (1, 2) or classes.shape[0] != n:
        raise ValueError(f"classes must be [N] or [N, k] with N={n}, got {tuple(classes.shape)}")


@dataclass
class CoalitionPlan:
    """The coalitions of a batch and their layout: everything that depends on the seeds only.

    Attributes:
        seeds: the per-image seeds.
        counts: ``[N]`` sampled coalitions per image (empty and full excluded).
        row_masks: ``[R, P]`` bool forward rows: per image its empty and full coalitions, then
            its sampled ones (pinned when made for a CUDA model).
        row_image: ``[R]`` image of each forward row.
        first_row: ``[N]`` each image's first row (its empty coalition; the full one follows).
        masks: ``[N, L, P]`` sampled coalitions padded to the longest image (padding: weight 0).
        weights: ``[N, L]`` their weights.
        strata: ``[N, L // 2]`` stratum of each pair (``"leverage"``), -1 for padding.
        slot_image, slot_index, slot_row: where each sampled coalition's value goes in the
            padded layout (image, index) and which forward row it comes from.
    """

    seeds: list[int]
    counts: Tensor
    row_masks: Tensor
    row_image: Tensor
    first_row: Tensor
    masks: Tensor
    weights: Tensor
    strata: Tensor | None
    slot_image: Tensor
    slot_index: Tensor
    slot_row: Tensor


def _padded_slots(counts: Tensor) -> tuple[Tensor, Tensor]:
    """``(image, index)`` of each of ``counts.sum()`` items laid out image after image."""
    image = torch.repeat_interleave(torch.arange(len(counts)), counts)
    starts = torch.cumsum(counts, 0) - counts
    return image, torch.arange(int(counts.sum())) - starts[image]


def plan_coalitions(
    config: KernelShapConfig, seeds: Sequence[int], *, pin_memory: bool = False
) -> CoalitionPlan:
    """Draw every image's coalitions (from its own seed) and lay out the forward rows.

    Pure CPU work that needs neither the model nor the images, so a labeller can run it for the
    next batch while the model evaluates this one. An image's coalitions depend only on its
    seed, the number of players, the budget and the sampler.

    Args:
        config: the labelling settings.
        seeds: one seed per image.
        pin_memory: put the forward rows in pinned memory (for a non-blocking copy to a GPU).
    """
    players = config.players
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    strata_all = None
    if config.sampler == "kernel":
        drawn = [sample_coalitions(players, config.budget - 2, g) for g in generators]
        masks_all = torch.cat([m for m, _ in drawn])
        weights_all = torch.cat([w for _, w in drawn])
        counts = torch.tensor([len(m) for m, _ in drawn], dtype=torch.long)
    else:
        masks_all, weights_all, strata_all, counts = sample_leverage_coalitions_batch(
            players, config.budget - 2, generators, front_load=config.front_load
        )
    return layout_coalitions(
        seeds, masks_all, weights_all, strata_all, counts, pin_memory=pin_memory
    )


def layout_coalitions(
    seeds: Sequence[int],
    masks_all: Tensor,
    weights_all: Tensor,
    strata_all: Tensor | None,
    counts: Tensor,
    *,
    pin_memory: bool = False,
) -> CoalitionPlan:
    """The :class:`CoalitionPlan` of given coalitions: image ``i`` has ``counts[i]`` of the rows
    of ``masks_all`` (and their ``weights_all``; ``strata_all`` per pair), one image after the
    other, with its empty and full coalitions added as its first forward rows."""
    players = masks_all.shape[1]
    n = len(seeds)
    longest = int(counts.max()) if n else 0
    slot_image, slot_index = _padded_slots(counts)
    first_row = torch.cumsum(counts + 2, 0) - (counts + 2)
    slot_row = first_row[slot_image] + 2 + slot_index
    masks = torch.zeros(n, longest, players, dtype=torch.bool)
    masks[slot_image, slot_index] = masks_all
    weights = torch.zeros(n, longest, dtype=torch.float64)
    weights[slot_image, slot_index] = weights_all
    strata = None
    if strata_all is not None:
        strata = torch.full((n, longest // 2), -1, dtype=torch.long)
        pair_image, pair_index = _padded_slots(counts // 2)
        strata[pair_image, pair_index] = strata_all
    rows = int((counts + 2).sum())
    row_masks = torch.zeros(rows, players, dtype=torch.bool, pin_memory=pin_memory)
    row_masks[first_row + 1] = True
    row_masks[slot_row] = masks_all
    row_image = torch.repeat_interleave(torch.arange(n), counts + 2)
    return CoalitionPlan(
        seeds=list(seeds),
        counts=counts,
        row_masks=row_masks,
        row_image=row_image.pin_memory() if pin_memory else row_image,
        first_row=first_row,
        masks=masks,
        weights=weights,
        strata=strata,
        slot_image=slot_image,
        slot_index=slot_index,
        slot_row=slot_row,
    )


@dataclass
class CoalitionValues:
    """The model's values of a batch's forward rows, on the host (or on their way there).

    Attributes:
        plan: the batch's :class:`CoalitionPlan`.
        values: float64 ``[R, k]`` value of each forward row for each explained class.
        classes: the explained classes as given (``[N]`` or ``[N, k]``), on the host.
        baseline: name of the baseline used.
        masking: ``"pixel"`` or ``"token"``.
        ready: on CUDA, the event after the device-to-host copies (wait for it before reading
            ``values``); ``None`` on the CPU.
        timing: on CUDA, events around the model's work (for :attr:`device_seconds`).
        host_seconds: time the evaluation took in its thread (on CUDA: to queue the work).
        precision: the precision of the forwards (:meth:`KernelShapConfig.forward_precision`).
    """

    plan: CoalitionPlan
    values: Tensor
    classes: Tensor
    baseline: str
    masking: str
    ready: Any = None
    timing: tuple[Any, Any] | None = None
    host_seconds: float = 0.0
    precision: str = "fp32"
    # the device values, kept alive until their copy to the host is done
    _device_values: Tensor | None = None

    def wait(self) -> None:
        """Block until ``values`` and ``classes`` are on the host (a no-op on the CPU).

        Raises:
            FloatingPointError: a value computed in reduced precision is not finite (an fp16
                overflow), which would otherwise make the batch's labels NaN without a word.
        """
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None
        if self.precision != "fp32" and not bool(torch.isfinite(self.values).all()):
            raise FloatingPointError(
                f"the model gave non-finite values under {self.precision} autocast; label with "
                "precision 'fp32' (or 'bf16', whose range is float32's)"
            )

    @property
    def device_seconds(self) -> float | None:
        """Seconds the device spent on the model's work (CUDA events; after :meth:`wait`)."""
        if self.timing is None:
            return None
        start, end = self.timing
        return start.elapsed_time(end) / 1000.0


def _to_host(tensor: Tensor) -> Tensor:
    """A non-blocking copy of a CUDA tensor into pinned host memory (others as they are)."""
    if tensor.device.type != "cuda":
        return tensor.cpu()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


def evaluate_coalitions(
    model: Callable[[Tensor], Tensor],
    config: KernelShapConfig,
    plan: CoalitionPlan,
    images: Tensor,
    classes: Tensor,
) -> CoalitionValues:
    """Run a batch's forward rows through the model and start copying the values to the host.

    The masked inputs of all the batch's images go through the model ``config.batch_size``
    rows at a time, in token space when the model and grid allow it. On CUDA nothing here
    waits for the device: the values are copied into pinned memory by one non-blocking copy per
    batch, and :meth:`CoalitionValues.wait` waits for it.

    Args:
        model: see :func:`kernel_shap_explain`.
        config: the labelling settings.
        plan: the batch's coalitions from :func:`plan_coalitions`.
        images: ``[N, 3, H, W]`` model inputs.
        classes: ``[N]`` or ``[N, k]`` classes to explain.
    """
    started = time.perf_counter()
    check_batch(images, classes)
    n = images.shape[0]
    if n != len(plan.seeds):
        raise ValueError(f"got {len(plan.seeds)} seeds for {n} images")
    grid, batch_size, output = config.grid, config.batch_size, config.output
    if isinstance(model, nn.Module) and model.training:
        log.warning("explaining a model in training mode (dropout etc. make values random)")
    device = model_device(model, images.device)
    cuda = device.type == "cuda"
    timing = None
    if cuda:
        timing = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        timing[0].record()
    images = images.to(device, non_blocking=cuda and images.is_pinned())
    class_rows = (classes.unsqueeze(1) if classes.dim() == 1 else classes).to(device)
    base, baseline_name, shared_base = _baseline_images(images, config.baseline, grid)
    row_masks = plan.row_masks.to(device, non_blocking=cuda and plan.row_masks.is_pinned())
    row_image = plan.row_image.to(device, non_blocking=cuda and plan.row_image.is_pinned())

    token_cells = _token_cells(model, images, grid, config.masking)
    values = torch.empty(len(row_masks), class_rows.shape[1], dtype=torch.float64, device=device)
    precision = config.forward_precision(device)
    # CPU autocast runs the same reduced-precision kernels' arithmetic as CUDA's, which is how
    # the label-precision benchmark measures the GPU's policy without a GPU.
    autocast = torch.autocast(
        device.type,
        dtype=_AUTOCAST_DTYPES.get(precision, torch.bfloat16),
        enabled=precision != "fp32",
    )
    with torch.inference_mode(), autocast:
        if token_cells is not None:
            image_tokens = torch.cat(
                [model.embed_patches(images[i : i + batch_size]) for i in range(0, n, batch_size)]
            )
            base_tokens = torch.cat(
                [
                    model.embed_patches(base[i : i + batch_size])
                    for i in range(0, len(base), batch_size)
                ]
            )
        else:
            height, width = images.shape[-2:]
            pixel_cells = _cell_map(height, width, grid, device)
        for start in range(0, len(row_masks), batch_size):
            rows = row_masks[start : start + batch_size]
            owner = row_image[start : start + batch_size]
            base_owner = owner.new_zeros(owner.shape) if shared_base else owner
            if token_cells is not None:
                keep = rows[:, token_cells].unsqueeze(-1)
                logits = model.forward_from_patches(
                    torch.where(keep, image_tokens[owner], base_tokens[base_owner])
                )
            else:
                keep = rows[:, pixel_cells].view(len(rows), 1, height, width)
                logits = model(torch.where(keep, images[owner], base[base_owner]))
            if logits.dim() != 2:
                raise ValueError(f"model must return logits [B, C], got {tuple(logits.shape)}")
            logits = logits.float()
            if output == "prob":
                logits = logits.softmax(dim=-1)
            values[start : start + len(rows)] = logits.gather(1, class_rows[owner]).double()

    ready = None
    if cuda:
        timing[1].record()
        # one copy per batch into pinned memory; the solve waits for the event, not the model
        host_values, host_classes = _to_host(values), _to_host(classes)
        ready = torch.cuda.Event()
        ready.record()
    else:
        host_values, host_classes = values, classes.cpu()
    return CoalitionValues(
        plan=plan,
        values=host_values,
        classes=host_classes,
        baseline=baseline_name,
        masking="pixel" if token_cells is None else "token",
        ready=ready,
        timing=timing,
        host_seconds=time.perf_counter() - started,
        precision=precision,
        _device_values=values if cuda else None,
    )


def solve_coalitions(config: KernelShapConfig, evaluated: CoalitionValues) -> KernelShapResult:
    """The attributions of an evaluated batch: the regressions of all its images at once.

    Waits for the values' copy to the host, places them in the padded layout of the plan
    (vectorised, no per-image loop) and solves in float64 on the CPU.
    """
    evaluated.wait()
    plan, values = evaluated.plan, evaluated.values
    n, longest = plan.weights.shape
    k = values.shape[1]
    v_empty = values[plan.first_row]
    v_full = values[plan.first_row + 1]
    sampled = torch.zeros(n, longest, k, dtype=torch.float64)
    sampled[plan.slot_image, plan.slot_index] = values[plan.slot_row]
    phi, phi_err = _solve_layout(
        config, plan.masks, plan.weights, plan.strata, sampled, v_empty, v_full, plan.seeds
    )
    classes = evaluated.classes
    single = classes.dim() == 1
    log.debug("explained %d images with %d forward rows", n, len(values))
    games = [
        CoalitionGame(
            masks=plan.masks[i, : plan.counts[i]].numpy(),
            weights=plan.weights[i, : plan.counts[i]].numpy(),
            strata=None if plan.strata is None else plan.strata[i, : plan.counts[i] // 2].numpy(),
            values=sampled[i, : plan.counts[i]].numpy(),
            v_empty=v_empty[i].numpy(),
            v_full=v_full[i].numpy(),
            classes=tuple(int(c) for c in classes[i].reshape(-1)),
            grid=config.grid,
            budget=config.budget,
            seed=plan.seeds[i],
            sampler=config.sampler,
            front_load=config.front_load,
        )
        for i in range(n)
    ]
    return KernelShapResult(
        phi=phi[:, 0] if single else phi,
        v_empty=v_empty[:, 0] if single else v_empty,
        v_full=v_full[:, 0] if single else v_full,
        classes=classes,
        evaluations=plan.counts + 2,
        seeds=plan.seeds,
        budget=config.budget,
        grid=config.grid,
        baseline=evaluated.baseline,
        output=config.output,
        masking=evaluated.masking,
        sampler=config.sampler,
        phi_err=None if phi_err is None else (phi_err[:, 0] if single else phi_err),
        precision=evaluated.precision,
        games=games,
    )


def solve_games(
    games: Sequence[CoalitionGame],
    *,
    error_estimate: bool = False,
    shrinkage: float | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The attributions of stored games, solved again without the model.

    With the settings they were labelled with, the solve is the labeller's own
    (:func:`solve_coalitions` calls the same code on the same layout): the labels come back
    bit for bit when the games are solved in the batches they were labelled in, and to float
    rounding in other batches (a batched solve's sums may group in another order).

    Args:
        games: games of one grid, budget and sampler, each with the same classes count.
        error_estimate: also the bootstrap standard errors (leverage games only).
        shrinkage: the shrunk solve's largest weight of the population Gram matrix (leverage;
            None: the labeller's default for the budget, 0: the plain least-squares solve).

    Returns:
        ``(phi, phi_err)``: float32 ``[N, k, gh, gw]`` and the same or None.

    Raises:
        ValueError: the games differ in grid, budget, sampler or number of classes.
    """
    if not games:
        raise ValueError("no games to solve")
    first = games[0]
    kinds = {(g.grid, g.budget, g.sampler, g.front_load, g.values.shape[1]) for g in games}
    if len(kinds) > 1:
        raise ValueError(f"games of one grid, budget, sampler and class count only, got {kinds}")
    config = KernelShapConfig(
        grid=first.grid,
        budget=first.budget,
        sampler=first.sampler,
        error_estimate=error_estimate,
        shrinkage=shrinkage,
        front_load=first.front_load,
    )
    n, k = len(games), first.values.shape[1]
    counts = [len(g.masks) for g in games]
    longest = max(counts)
    masks = torch.zeros(n, longest, first.players, dtype=torch.bool)
    weights = torch.zeros(n, longest, dtype=torch.float64)
    sampled = torch.zeros(n, longest, k, dtype=torch.float64)
    strata = (
        torch.full((n, longest // 2), -1, dtype=torch.long) if first.strata is not None else None
    )
    for i, game in enumerate(games):
        masks[i, : counts[i]] = torch.from_numpy(game.masks)
        weights[i, : counts[i]] = torch.from_numpy(game.weights)
        sampled[i, : counts[i]] = torch.from_numpy(game.values)
        if strata is not None and game.strata is not None:
            strata[i, : counts[i] // 2] = torch.from_numpy(game.strata)
    v_empty = torch.from_numpy(np.stack([g.v_empty for g in games]))
    v_full = torch.from_numpy(np.stack([g.v_full for g in games]))
    return _solve_layout(
        config,
        masks,
        weights,
        strata,
        sampled,
        v_empty,
        v_full,
        [g.seed for g in games],
    )


def _solve_layout(
    config: KernelShapConfig,
    masks: Tensor,
    weights: Tensor,
    strata: Tensor | None,
    sampled: Tensor,
    v_empty: Tensor,
    v_full: Tensor,
    seeds: Sequence[int],
) -> tuple[Tensor, Tensor | None]:
    """The regressions of padded games: ``(phi, phi_err)`` float32 ``[N, k, gh, gw]``."""
    n, k, grid = masks.shape[0], sampled.shape[-1], config.grid
    phi_err = None
    if (
        config.error_estimate
        and config.front_load
        and front_loaded(config.players, config.budget - 2)
    ):
        log.warning(
            "budget %d is below 4P + 2 for %d players: the design fills the outer strata "
            "first and the bootstrap sees none of its bias, so the error estimate is too low",
            config.budget,
            config.players,
        )
    if config.sampler == "kernel":
        phi = solve_kernel_shap(masks, weights, sampled, v_empty, v_full)
    else:
        phi, phi_err, _ = solve_leverage_shap(
            masks,
            weights,
            sampled,
            v_empty,
            v_full,
            strata=strata,
            bootstrap=BOOTSTRAP_REPLICATES if config.error_estimate else 0,
            # the bootstrap's own stream, so the estimate is as reproducible as the labels
            generators=[torch.Generator().manual_seed(s ^ 0x5EED) for s in seeds],
            shrinkage=(
                default_shrinkage(config.players, config.budget - 2, config.front_load)
                if config.shrinkage is None
                else config.shrinkage
            ),
        )
    phi = phi.transpose(1, 2).reshape(n, k, *grid).float()
    if phi_err is not None:
        phi_err = phi_err.transpose(1, 2).reshape(n, k, *grid).float()
    return phi, phi_err


def kernel_shap_explain(
    model: Callable[[Tensor], Tensor],
    images: Tensor,
    classes: Tensor,
    *,
    grid: tuple[int, int] = (7, 7),
    budget: int = 150,
    baseline: str | Tensor = "mean",
    output: str = "logit",
    seed: int | Sequence[int] | Tensor = 0,
    batch_size: int | None = None,
    masking: str = "auto",
    sampler: str = "leverage",
    error_estimate: bool = False,
    precision: str = "auto",
    shrinkage: float | None = None,
    front_load: bool = False,
) -> KernelShapResult:
    """Kernel SHAP attributions of grid cells for a batch of images, with v(empty) and v(full).

    The three steps (:func:`plan_coalitions`, :func:`evaluate_coalitions`,
    :func:`solve_coalitions`) run one after the other; to overlap them across batches, use
    :func:`tasks.algorithms.kernel_shap_stream.kernel_shap_stream`, which gives the same results.

    Args:
        model: callable mapping float ``[B, 3, H, W]`` to logits ``[B, C]``; should be in eval
            mode. If it implements :class:`TokenMaskable` and the grid aligns with its patches,
            masking happens on patch embeddings.
        images: ``[N, 3, H, W]`` model inputs.
        classes: ``[N]`` or ``[N, k]`` class indices; several classes per image share the
            same model evaluations.
        grid: ``(gh, gw)`` cells; the players.
        budget: model evaluations per image, the empty and full coalitions included (>= 2;
            about ``2 * P + 2`` are needed to determine ``P`` attributions, because
            sampled coalitions come with their complements).
        baseline: replacement of absent cells: ``"mean"`` (per-channel mean of ``images``;
            pass the dataset mean as a tensor to make results independent of the batch),
            ``"zero"``, ``"blur"`` (the image blurred with sigma = half a cell), or a tensor
            ``[3]``, ``[3, H, W]`` or ``[N, 3, H, W]``.
        output: ``"logit"`` or ``"prob"`` (softmax probability of the class).
        seed: one seed for every image, or one per image (sequence or tensor). Coalitions of an
            image depend only on its seed and the number of players, never on the batch.
        batch_size: forward rows per model call (masked inputs of several images mixed);
            default 1024.
        masking: ``"auto"`` (token space when possible), ``"pixel"`` or ``"token"``.
        sampler: ``"leverage"`` (default): coalition sizes uniform, stratified complementary
            pairs without replacement, exact reweighting, and a solve shrunk towards the known
            population Gram matrix (tasks/algorithms/leverage_shap.py); exact when the budget covers all
            coalitions. ``"kernel"``: shap.KernelExplainer's scheme and solve, for comparisons.
        error_estimate: also estimate each attribution's standard error by a stratified
            bootstrap over the coalition pairs (no extra model evaluation; ``"leverage"`` only).
        precision: of the masked forwards, one of :data:`PRECISIONS` (default ``"auto"``:
            float32 on every device; :data:`PRECISIONS`).
        shrinkage: the leverage solve's largest weight of the population Gram matrix (None:
            :func:`~tasks.algorithms.leverage_shap.default_shrinkage` for the budget; 0: plain
            least squares).
        front_load: below ``2P`` pairs, the leverage design's outer strata first and a plain
            least-squares solve (:mod:`~tasks.algorithms.leverage_shap`; off by default).

    Returns:
        A :class:`KernelShapResult`.
    """
    config = KernelShapConfig(
        grid=grid,
        budget=budget,
        baseline=baseline,
        output=output,
        batch_size=batch_size or DEFAULT_BATCH_ROWS,
        masking=masking,
        sampler=sampler,
        error_estimate=error_estimate,
        precision=precision,
        shrinkage=shrinkage,
        front_load=front_load,
    )
    check_batch(images, classes)
    seeds = _seeds(seed, images.shape[0])
    cuda = model_device(model, images.device).type == "cuda"
    plan = plan_coalitions(config, seeds, pin_memory=cuda)
    return solve_coalitions(config, evaluate_coalitions(model, config, plan, images, classes))


def kernel_shap(
    model: Callable[[Tensor], Tensor],
    images: Tensor,
    classes: Tensor,
    *,
    grid: tuple[int, int] = (7, 7),
    budget: int = 150,
    baseline: str | Tensor = "mean",
    output: str = "logit",
    seed: int | Sequence[int] | Tensor = 0,
    batch_size: int | None = None,
    masking: str = "auto",
    sampler: str = "leverage",
) -> Tensor:
    """Kernel SHAP attributions of grid cells (see :func:`kernel_shap_explain`).

    Returns:
        float32 CPU tensor ``[N, gh, gw]`` (``[N, k, gh, gw]`` for ``classes`` ``[N, k]``).
    """
    return kernel_shap_explain(
        model,
        images,
        classes,
        grid=grid,
        budget=budget,
        baseline=baseline,
        output=output,
        seed=seed,
        batch_size=batch_size,
        masking=masking,
        sampler=sampler,
    ).phi

"""PNG figures of a transfer sweep and of attribution maps, drawn headless.

Figures are built as plain :class:`matplotlib.figure.Figure` objects on an Agg canvas, never
through ``pyplot``: no display is needed, no global backend is switched and nothing is left open.

The sweep table is the one written by the sweep (one Parquet table per sweep), with columns
``target``, ``method`` (``"sem"`` or ``"kernel_shap"``), ``lambda`` (NaN for Kernel SHAP),
``inferences``, ``split`` (``"val"`` or ``"test"``), ``accuracy``, ``pearson``, ``spearman``,
``topk``, ``insertion_auc``, ``deletion_auc`` and ``pointing``.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pyarrow as pa
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

logger = logging.getLogger(__name__)

Rows = Iterable[Mapping[str, Any]]


def _rows(table: pa.Table | Rows) -> list[dict[str, Any]]:
    if isinstance(table, pa.Table):
        return table.to_pylist()
    return [dict(row) for row in table]


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(float(value))


def _figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _to_png(fig: Figure, path: str | Path | None) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    data = buffer.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def _pick_split(rows: list[dict[str, Any]], split: str) -> str:
    splits = {r["split"] for r in rows}
    if split in splits or not splits:
        return split
    fallback = sorted(splits)[0]
    logger.info("no %r rows in the sweep table; plotting the %r split", split, fallback)
    return fallback


def _best_lambda(sem_rows: list[dict[str, Any]]) -> float | None:
    scored = [r for r in sem_rows if _finite(r.get("pearson")) and _finite(r.get("lambda"))]
    if not scored:
        return None
    return float(max(scored, key=lambda r: r["pearson"])["lambda"])


def plot_sweep(
    table: pa.Table | Rows,
    path: str | Path | None = None,
    *,
    split: str = "test",
    chosen_lambdas: Mapping[str, float] | None = None,
) -> bytes:
    """One PNG with two panels summarising a sweep.

    Left: for each target (one colour), the SEM's Pearson agreement with Kernel SHAP (solid),
    insertion minus deletion AUC (dashed) and accuracy (dotted) against lambda. Right: Pearson
    agreement against the number of model inferences per image (log scale): Kernel SHAP at its
    budgets as a line, and the single SEM pass (one inference) at lambda 0 (hollow marker) and
    at the chosen lambda (filled star).

    Args:
        table: the sweep table, as a pyarrow Table or a list of row dicts.
        path: also write the PNG there when given.
        split: which split's rows to draw (falls back to the split present if absent).
        chosen_lambdas: target -> the lambda selected on validation; targets not in it are shown
            at their best-Pearson lambda of the drawn split, labelled as such.

    Returns:
        The PNG bytes.
    """
    rows = _rows(table)
    split = _pick_split(rows, split)
    rows = [r for r in rows if r.get("split") == split]
    targets = sorted({r["target"] for r in rows})
    colors = matplotlib.colormaps["tab10"]
    fig = _figure(figsize=(13, 5))
    ax_lambda, ax_cost = fig.subplots(1, 2)

    for i, target in enumerate(targets):
        color = colors(i % 10)
        sem = sorted(
            (r for r in rows if r["target"] == target and r["method"] == "sem"),
            key=lambda r: r["lambda"],
        )
        if sem:
            lambdas = [r["lambda"] for r in sem]
            pearson = [r.get("pearson", math.nan) for r in sem]
            gap = [
                r["insertion_auc"] - r["deletion_auc"]
                if _finite(r.get("insertion_auc")) and _finite(r.get("deletion_auc"))
                else math.nan
                for r in sem
            ]
            acc = [r.get("accuracy", math.nan) for r in sem]
            ax_lambda.plot(lambdas, pearson, "-o", color=color, ms=3, label=f"{target}")
            ax_lambda.plot(lambdas, gap, "--", color=color)
            ax_lambda.plot(lambdas, acc, ":", color=color)

        shap = sorted(
            (r for r in rows if r["target"] == target and r["method"] == "kernel_shap"),
            key=lambda r: r["inferences"],
        )
        if shap:
            ax_cost.plot(
                [r["inferences"] for r in shap],
                [r.get("pearson", math.nan) for r in shap],
                "-s",
                color=color,
                ms=4,
                label=f"{target}: Kernel SHAP",
            )
        at_zero = [r for r in sem if r["lambda"] == 0 and _finite(r.get("pearson"))]
        if at_zero:
            ax_cost.scatter(
                [at_zero[0]["inferences"]],
                [at_zero[0]["pearson"]],
                facecolors="none",
                edgecolors=[color],
                s=60,
                label=f"{target}: SEM λ=0",
            )
        if chosen_lambdas is not None and target in chosen_lambdas:
            chosen, how = chosen_lambdas[target], "chosen"
        else:
            chosen, how = _best_lambda(sem), "best"
        picked = [r for r in sem if chosen is not None and r["lambda"] == chosen]
        if picked and _finite(picked[0].get("pearson")):
            ax_cost.scatter(
                [picked[0]["inferences"]],
                [picked[0]["pearson"]],
                marker="*",
                color=color,
                s=140,
                label=f"{target}: SEM {how} λ={chosen:g}",
            )

    # Line styles are shared by every target, so they get their own legend entries.
    for style, name in (("-", "Pearson vs Kernel SHAP"), ("--", "insertion − deletion AUC")):
        ax_lambda.plot([], [], style, color="grey", label=name)
    ax_lambda.plot([], [], ":", color="grey", label="accuracy")
    ax_lambda.set_xlabel("λ (scale of the explainability vector)")
    ax_lambda.set_ylabel("score")
    ax_lambda.set_title(f"Transfer sweep ({split})")
    ax_lambda.grid(alpha=0.3)
    ax_lambda.legend(fontsize=7, loc="best")

    ax_cost.set_xscale("log")
    ax_cost.set_xlabel("model inferences per image")
    ax_cost.set_ylabel("Pearson vs Kernel SHAP reference")
    ax_cost.set_title("Quality per inference")
    ax_cost.grid(alpha=0.3, which="both")
    if ax_cost.has_data():
        ax_cost.legend(fontsize=7, loc="best")
    return _to_png(fig, path)


def heatmap_overlay(
    images: Tensor,
    attributions: Tensor,
    titles: Sequence[str] | None = None,
    path: str | Path | None = None,
    *,
    cmap: str = "jet",
    alpha: float = 0.5,
    ncols: int | None = None,
    mode: str = "nearest",
) -> bytes:
    """A grid of images with their attribution maps overlaid.

    Each map is upsampled to the image size (nearest by default, so cells stay visible) and
    scaled to [0, 1] per image before colouring.

    Args:
        images: ``[N, 3, H, W]`` in [0, 1] (values outside are clipped).
        attributions: ``[N, gh, gw]``.
        titles: one title per image.
        path: also write the PNG there when given.
        cmap: matplotlib colour map of the overlay.
        alpha: opacity of the overlay.
        ncols: images per row (default: up to 8).
        mode: ``F.interpolate`` mode for upsampling (``"nearest"`` or ``"bilinear"``).

    Returns:
        The PNG bytes.
    """
    if images.dim() != 4 or attributions.dim() != 3 or images.shape[0] != attributions.shape[0]:
        raise ValueError("expected images [N, 3, H, W] and attributions [N, gh, gw]")
    n = images.shape[0]
    if titles is not None and len(titles) != n:
        raise ValueError(f"{len(titles)} titles for {n} images")
    maps = attributions.detach().float().cpu()[:, None]
    maps = F.interpolate(maps, size=tuple(images.shape[-2:]), mode=mode)[:, 0]
    low = maps.amin(dim=(1, 2), keepdim=True)
    span = (maps.amax(dim=(1, 2), keepdim=True) - low).clamp_min(1e-12)
    maps = ((maps - low) / span).numpy()
    pictures = images.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy()

    ncols = ncols or min(n, 8) or 1
    nrows = max(1, math.ceil(n / ncols))
    fig = _figure(figsize=(2.2 * ncols, 2.4 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for index, ax in enumerate(np.ravel(axes)):
        ax.axis("off")
        if index >= n:
            continue
        ax.imshow(pictures[index])
        ax.imshow(maps[index], cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0)
        if titles is not None:
            ax.set_title(str(titles[index]), fontsize=8)
    return _to_png(fig, path)

"""Sweep and heatmap figures come out as valid PNG images."""

from __future__ import annotations

import io
import math

import pyarrow as pa
import pytest
import torch
from PIL import Image

from tasks.sweep.plots import heatmap_overlay, plot_sweep

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _sweep_rows() -> list[dict]:
    rows = []
    for t, target in enumerate(["shapes", "textures"]):
        for split in ("val", "test"):
            for i in range(9):
                lam = i * 0.25
                rows.append(
                    {
                        "target": target,
                        "method": "sem",
                        "lambda": lam,
                        "inferences": 1,
                        "split": split,
                        "accuracy": 0.9 - 0.01 * i,
                        "pearson": 0.2 + 0.5 * math.sin(lam) - 0.1 * t,
                        "spearman": 0.2 + 0.4 * math.sin(lam),
                        "topk": 0.3,
                        "insertion_auc": 0.6 + 0.05 * lam,
                        "deletion_auc": 0.3 - 0.05 * lam,
                        "pointing": 0.5,
                    }
                )
            for budget in (25, 50, 100, 150, 300):
                rows.append(
                    {
                        "target": target,
                        "method": "kernel_shap",
                        "lambda": math.nan,
                        "inferences": budget,
                        "split": split,
                        "accuracy": 0.9,
                        "pearson": 1 - 5 / budget**0.5,
                        "spearman": 1 - 5 / budget**0.5,
                        "topk": 0.5,
                        "insertion_auc": 0.7,
                        "deletion_auc": 0.2,
                        "pointing": math.nan,
                    }
                )
    return rows


def _decode(png: bytes) -> Image.Image:
    assert png[:8] == PNG_SIGNATURE
    image = Image.open(io.BytesIO(png))
    image.load()
    assert image.format == "PNG"
    return image


def test_plot_sweep_from_table_and_rows(tmp_path):
    rows = _sweep_rows()
    from_table = plot_sweep(pa.Table.from_pylist(rows), tmp_path / "sweep.png")
    image = _decode(from_table)
    assert image.width > 600 and image.height > 200
    assert (tmp_path / "sweep.png").read_bytes() == from_table

    only_val = [r for r in rows if r["split"] == "val"]
    png = plot_sweep(only_val, chosen_lambdas={"shapes": 1.0})
    assert _decode(png).width > 600


def test_heatmap_overlay(tmp_path):
    images = torch.rand(5, 1, 32, 32).expand(-1, 3, -1, -1)  # grey
    attributions = torch.randn(5, 4, 4)
    png = heatmap_overlay(images, attributions, [f"img {i}" for i in range(5)], ncols=3)
    image = _decode(png)
    # Three columns and two rows of panels: wider than tall.
    assert image.width > image.height > 100
    # The overlay (jet) colours the grey inputs.
    rgb = torch.tensor(list(image.convert("RGB").getdata()), dtype=torch.float32)
    assert (rgb.max(dim=1).values - rgb.min(dim=1).values).max() > 100

    heatmap_overlay(images[:1], torch.zeros(1, 4, 4), path=tmp_path / "one.png")
    _decode((tmp_path / "one.png").read_bytes())
    with pytest.raises(ValueError):
        heatmap_overlay(images, attributions, ["only one title"])

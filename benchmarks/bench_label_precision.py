"""How much reduced precision of the masked forwards adds to the error of Kernel SHAP labels.

The labeller's forwards can run under autocast (``precision`` of :class:`KernelShapConfig`);
this measures what that costs in label accuracy, on the CPU as well as on a GPU (CPU autocast
runs the same reduced-precision arithmetic: bf16 or fp16 matrix products, float32 norms).
For each model, at budget 150:

- the **estimator's own error**: ``||phi_fp32 - ref|| / ||ref||``, with ``ref`` the exact
  Shapley values (``vit16``: all 65,536 coalitions enumerated in float32), a high-budget
  float32 estimate (``tiny-vit-56``), or, where neither is affordable (``ViT-B-32`` on a
  CPU), the difference of two independent float32 estimates over ``sqrt(2)``;
- the **error precision adds**: ``||phi_p - phi_fp32|| / ||ref||`` (same coalitions, only the
  precision differs), reported relative to the estimator's own error (goal: <= 2%), and the
  change of the total error ``||phi_p - ref||`` against float32's.

Precisions: float32; bf16 and fp16 autocast with the logit head (normalise, class embeddings,
scale) in float32, which is what the models of tasks/model do; and bf16 and fp16 with the head
under autocast too (what the labeller did on CUDA before it had the setting).

Run from the repository root (CPU, about 15 minutes on 2 cores; fp16 is emulated there)::

    python -m benchmarks.bench_label_precision --out label-precision.md

On a GPU: ``--device cuda`` (benchmarks/gpu_check.sh does).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

from benchmarks.bench_shapley_accuracy import all_coalitions, table_game
from tasks.algorithms.kernel_shap import kernel_shap_explain
from tasks.model import load_clip
from tasks.model.vit import OpenCLIPClassifier, vit_forward_from_patches

BUDGET = 150
#: ``(name, precision, head under autocast too)``; the first is the float32 reference.
ROWS: tuple[tuple[str, str, bool], ...] = (
    ("fp32", "fp32", False),
    ("bf16, fp32 head", "bf16", False),
    ("bf16, bf16 head", "bf16", True),
    ("fp16, fp32 head", "fp16", False),
    ("fp16, fp16 head", "fp16", True),
)

log = logging.getLogger(__name__)


class AutocastHead(nn.Module):
    """A CLIP classifier whose logit head runs under the ambient autocast, as it used to.

    The models of tasks/model compute their head in float32 whatever the autocast; this wraps
    one with the head of before (``scale * normalise(pooled) @ class_embeddings.T`` in the
    autocast type), to measure what keeping the head in float32 is worth.
    """

    def __init__(
        self,
        visual: nn.Module,
        class_embeddings: Tensor,
        scale: float,
        embed: Callable[[Tensor], Tensor],
    ) -> None:
        super().__init__()
        self.visual = visual
        self.register_buffer("class_embeddings", class_embeddings)
        self.scale = scale
        self._embed = embed

    @property
    def patch_grid(self) -> tuple[int, int]:
        return tuple(self.visual.grid_size)

    def embed_patches(self, images: Tensor) -> Tensor:
        return self._embed(images)

    def forward_from_patches(self, patch_tokens: Tensor) -> Tensor:
        pooled = vit_forward_from_patches(self.visual, patch_tokens)
        z = F.normalize(pooled, dim=-1)
        return self.scale * z @ self.class_embeddings.to(z.dtype).T

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_from_patches(self.embed_patches(images))


def autocast_head(model: nn.Module) -> AutocastHead:
    """The :class:`AutocastHead` twin of an :class:`OpenCLIPClassifier` or SEM classifier."""
    sem = getattr(model, "sem", None)
    if sem is not None:
        scale = float(sem.clip.logit_scale.exp())
        return AutocastHead(sem.clip.visual, sem.class_embeddings, scale, sem.embed_patches).eval()
    return AutocastHead(
        model.visual, model.class_embeddings, model.logit_scale, model.embed_patches
    ).eval()


@dataclass
class Suite:
    """One model's images and what its labels are compared with.

    Attributes:
        name: shown in the table.
        model: the explained classifier (token-maskable).
        images, classes: what is explained.
        grid: the cells.
        reference: ``[N, gh, gw]`` exact or high-budget values; None: two float32 seeds.
        reference_kind: how ``reference`` was made (for the table).
    """

    name: str
    model: nn.Module
    images: Tensor
    classes: Tensor
    grid: tuple[int, int]
    reference: Tensor | None
    reference_kind: str


@dataclass
class Row:
    """One precision on one suite (errors are means over images, relative to ``||ref||``)."""

    suite: str
    precision: str
    images: int
    players: int
    reference: str
    estimator_error: float
    added_error: float
    total_error: float
    seconds: float

    @property
    def added_share(self) -> float:
        """The added error relative to the estimator's own error."""
        return self.added_error / self.estimator_error

    @property
    def total_change(self) -> float:
        """Relative change of the total error against float32's."""
        return self.total_error / self.estimator_error - 1.0


def explain(
    suite: Suite, precision: str, autocast_logits: bool, *, budget: int, seed: int
) -> Tensor:
    """``[N, gh, gw]`` float64 labels of a suite at one precision."""
    model = autocast_head(suite.model) if autocast_logits else suite.model
    base = suite.images.mean(dim=(0, 2, 3))
    result = kernel_shap_explain(
        model,
        suite.images,
        suite.classes,
        grid=suite.grid,
        budget=budget,
        baseline=base,
        seed=[seed + i for i in range(len(suite.images))],
        precision=precision,
        batch_size=256,
    )
    return result.phi.double()


def _relative(a: Tensor, b: Tensor, scale: Tensor) -> float:
    return float(((a - b).flatten(1).norm(dim=1) / scale).mean())


def measure(suite: Suite, rows=ROWS, *, budget: int = BUDGET, seed: int = 0) -> list[Row]:
    """Every precision of ``rows`` on one suite, on the same coalitions."""
    started = time.perf_counter()
    fp32 = explain(suite, "fp32", False, budget=budget, seed=seed)
    fp32_seconds = time.perf_counter() - started
    if suite.reference is not None:
        reference = suite.reference.to(torch.float64)
        scale = reference.flatten(1).norm(dim=1)
        estimator = _relative(fp32, reference, scale)
    else:
        # two independent float32 estimates differ by sqrt(2) times the error of one
        other = explain(suite, "fp32", False, budget=budget, seed=seed + 10_000)
        reference = None
        scale = (fp32 + other).flatten(1).norm(dim=1) / 2
        estimator = _relative(fp32, other, scale) / math.sqrt(2)
    players = suite.grid[0] * suite.grid[1]
    out = []
    for name, precision, autocast_logits in rows:
        started = time.perf_counter()
        if precision == "fp32" and not autocast_logits:
            phi, seconds = fp32, fp32_seconds
        else:
            phi = explain(suite, precision, autocast_logits, budget=budget, seed=seed)
            seconds = time.perf_counter() - started
        added = _relative(phi, fp32, scale)
        total = (
            _relative(phi, reference, scale)
            if reference is not None
            else math.sqrt(estimator**2 + added**2)
        )
        out.append(
            Row(
                suite=suite.name,
                precision=name,
                images=len(suite.images),
                players=players,
                reference=suite.reference_kind,
                estimator_error=estimator,
                added_error=added,
                total_error=total,
                seconds=seconds,
            )
        )
        log.info(
            "%s %s: added %.2f%% of the estimator's error (%.1f s)",
            suite.name,
            name,
            100 * out[-1].added_share,
            seconds,
        )
    return out


def vit16_suite(images: int = 8, seed: int = 0, device: str = "cpu") -> Suite:
    """``vit16`` of bench_shapley_accuracy: a tiny random ViT, 16 players, exact values.

    The same model (32 px, 8 px patches, weights doubled so that cells interact, 5 classes,
    logit scale 10) explains its top class with the batch's mean as the baseline; the exact
    Shapley values enumerate all coalitions through the float32 model.
    """
    torch.manual_seed(seed)
    visual = VisionTransformer(
        image_size=32, patch_size=8, width=64, layers=3, heads=4, mlp_ratio=2.0, output_dim=32
    ).eval()
    with torch.no_grad():
        for p in visual.parameters():
            if p.dim() > 1:
                p.mul_(2.0)
    model = OpenCLIPClassifier(visual, torch.randn(5, 32), logit_scale=10.0).eval().to(device)
    x = torch.randn(images, 3, 32, 32, device=device)
    masks = all_coalitions(16).to(device)
    exact = []
    with torch.inference_mode():
        classes = model(x).argmax(dim=1)
        tokens = model.embed_patches(x)
        base = model.embed_patches(x.mean(dim=(0, 2, 3)).view(1, 3, 1, 1).expand(1, 3, 32, 32))
        for i in range(images):
            values = torch.cat(
                [
                    model.forward_from_patches(torch.where(m.unsqueeze(-1), tokens[i], base[0]))[
                        :, classes[i]
                    ]
                    for m in masks.split(8192)
                ]
            )
            exact.append(torch.from_numpy(table_game(values.double().cpu().numpy(), 16)[1]))
    reference = torch.stack(exact).view(images, 4, 4)
    return Suite("vit16 (tiny random ViT)", model, x, classes.cpu(), (4, 4), reference, "exact")


def tiny_suite(images: int = 8, reference_budget: int = 2000, device: str = "cpu") -> Suite:
    """The embedded default's base model (tiny-vit-56, shipped weights, the shapes head) on
    test images of the shapes domain, 7x7 cells, its predicted class; reference: float32 at
    ``reference_budget``."""
    from tasks.data.synthetic import render_sample
    from tasks.model.loading import load_sem
    from tasks.pretrain import SHIPPED_BASE_FILE

    sem = load_sem(str(SHIPPED_BASE_FILE), domain="shapes", device=device).sem
    model = sem.as_classifier().eval()
    pixels = [render_sample("shapes", "test", i, image_size=56).image for i in range(images)]
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float().div(255).to(device)
    with torch.inference_mode():
        classes = model(x).argmax(dim=1).cpu()
    suite = Suite("tiny-vit-56 (shipped base)", model, x, classes, (7, 7), None, "")
    reference = explain(suite, "fp32", False, budget=reference_budget, seed=7_000_000)
    suite.reference, suite.reference_kind = reference, f"fp32 budget {reference_budget}"
    return suite


def vit_b_32_suite(images: int = 2, device: str = "cpu") -> Suite:
    """open_clip ViT-B-32, random weights, 224 px, a random 1000-class head (as bench_gpu),
    7x7 cells (one patch each); reference: two float32 seeds."""
    torch.manual_seed(0)
    clip_model = load_clip("ViT-B-32")
    head = F.normalize(torch.randn(1000, clip_model.visual.output_dim), dim=-1)
    model = OpenCLIPClassifier(clip_model, head).eval().to(device)
    x = torch.randn(images, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.inference_mode():
        classes = model(x).argmax(dim=1).cpu()
    return Suite("ViT-B-32 (random init, 224 px)", model, x, classes, (7, 7), None, "2 fp32 seeds")


def markdown(rows: list[Row], device: str) -> str:
    lines = [
        f"Budget {BUDGET}, leverage sampler, device {device}; errors relative to the reference "
        "norm, mean over images.",
        "",
        "| model | images | reference | precision | estimator error (fp32) | "
        "added error / estimator error | total error vs fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.suite} | {r.images} | {r.reference} | {r.precision} | "
            f"{r.estimator_error:.3f} | {100 * r.added_share:.2f}% | "
            f"{100 * r.total_change:+.2f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vit16-images", type=int, default=8)
    parser.add_argument("--tiny-images", type=int, default=8)
    parser.add_argument("--reference-budget", type=int, default=2000)
    parser.add_argument("--b32-images", type=int, default=2, help="0: leave ViT-B-32 out")
    parser.add_argument(
        "--b32-rows",
        nargs="+",
        default=None,
        help="precisions for ViT-B-32 (default: all on CUDA; on a CPU all but 'fp16, fp16 "
        "head', whose emulated fp16 takes minutes per image)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--json", type=Path, default=None, help="and the rows as JSON")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("tasks").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        # float32 means float32: no TF32 matrix products or convolutions in the reference
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    started = time.perf_counter()
    rows: list[Row] = []
    rows += measure(vit16_suite(args.vit16_images, device=args.device))
    if args.tiny_images:
        rows += measure(tiny_suite(args.tiny_images, args.reference_budget, args.device))
    if args.b32_images:
        chosen = args.b32_rows or [
            name
            for name, _, _ in ROWS
            if args.device.startswith("cuda") or name != "fp16, fp16 head"
        ]
        b32_rows = tuple(r for r in ROWS if r[0] in chosen or r[0] == "fp32")
        rows += measure(vit_b_32_suite(args.b32_images, args.device), b32_rows)
    text = markdown(rows, args.device)
    log.info("%s\n\ntotal %.0f s", text, time.perf_counter() - started)
    if args.out is not None:
        args.out.write_text(text + "\n")
    if args.json is not None:
        payload = [
            {**asdict(r), "added_share": r.added_share, "total_change": r.total_change}
            for r in rows
        ]
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()

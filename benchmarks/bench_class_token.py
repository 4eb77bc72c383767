"""Masked forwards per second: the class-token last block against the full open_clip tower.

Kernel SHAP, insertion/deletion and accuracy read only the logits, which with class-token pooling
depend on the last block's output at the class token alone. ``vit_forward_from_patches`` runs
that block for the class token only (:func:`tasks.model.vit._vit_class_token`); the peer is the
same patch embeddings through the whole open_clip transformer (``visual.transformer`` then
``ln_post`` and ``proj``, what ``visual(images)`` does after ``conv1``). Same weights (random
init), same inputs, same thread count; the two are timed alternately, best of ``--repeats``, and
their outputs compared.

Run from the repository root: ``python -m benchmarks.bench_class_token``.
"""

from __future__ import annotations

import argparse
import time

import torch

import tasks  # noqa: F401  (registers the tiny model configs)
from tasks.model import load_clip
from tasks.model.vit import _global_pool, _vit_trunk, vit_embed_patches, vit_forward_from_patches


def full_tower(visual: torch.nn.Module, patches: torch.Tensor) -> torch.Tensor:
    """Pooled embedding through every token of every block (the peer)."""
    x = _vit_trunk(visual, patches)
    pooled = visual.ln_post(_global_pool(visual, x)[0])
    return pooled @ visual.proj if visual.proj is not None else pooled


def rate(fn, visual: torch.nn.Module, patches: torch.Tensor, repeats: int) -> float:
    """Best forwards per second over ``repeats`` timed calls."""
    best = float("inf")
    with torch.inference_mode():
        fn(visual, patches)
        for _ in range(repeats):
            started = time.perf_counter()
            fn(visual, patches)
            best = min(best, time.perf_counter() - started)
    return len(patches) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-vit-56", "ViT-B-32"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        "| model | batch | threads | full tower fwd/s | class-token block fwd/s | ratio | max abs diff |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        torch.manual_seed(0)
        visual = load_clip(name).visual.eval()
        size = visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size
        batch = args.batch if size <= 64 else max(8, args.batch // 8)
        images = torch.randn(batch, 3, size, size)
        with torch.inference_mode():
            patches = vit_embed_patches(visual, images)
            diff = (full_tower(visual, patches) - vit_forward_from_patches(visual, patches)).abs()
        full = rate(full_tower, visual, patches, args.repeats)
        short = rate(vit_forward_from_patches, visual, patches, args.repeats)
        print(
            f"| {name} | {batch} | {args.threads} | {full:.0f} | {short:.0f} "
            f"| {short / full:.2f} | {float(diff.max()):.1e} |"
        )


if __name__ == "__main__":
    main()

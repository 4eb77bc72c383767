"""Does the labeller's model wait on sampling and solving? The overlapped stream against the old schedule.

Runs :func:`tasks.algorithms.kernel_shap_stream.kernel_shap_stream` over the same batches twice,
with ``overlap=False`` (every batch sampled, evaluated and solved one step after the other in
one thread: the labeller's schedule before the stream) and ``overlap=True`` (coalitions of the
next batch drawn and the previous batch solved while the model runs), and reports images/s and
the model-wait share: the fraction of the wall time in which the model ran no forward.

The models are stand-ins of known cost, token-maskable, whose values are cheap:

- ``sleep``: a GPU stand-in. Each model call is busy for ``--row-us`` microseconds per forward
  row without using the CPU (``time.sleep`` releases the GIL, as a GPU kernel leaves the host
  free), so what the overlap hides shows even on a loaded 2-core machine. The default 11 us per
  row is about ViT-B/32 at 224 px in bf16 on one H100/H200 class GPU (4.4 GFLOP a row at some
  400 TFLOP/s): 53 ms for a batch of 32 images at budget 150.
- ``trivial``: no model time at all (mean colour per cell, linear): what is left is the
  labeller's own CPU work, the rate its sampling and solving allow.

Also measured: the coalition sampling of a batch, per-image calls against the batched sampler
(same coalitions). Schedules alternate and the best of ``--repeats`` is kept, with the load
average beside the table.

Run from the repository root: ``python -m benchmarks.bench_labeller_overlap``.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from tasks.algorithms.kernel_shap import derive_seed
from tasks.algorithms.kernel_shap_stream import ExplainRequest, LabellerStats, kernel_shap_stream
from tasks.algorithms.leverage_shap import (
    sample_leverage_coalitions,
    sample_leverage_coalitions_batch,
)

GRID = (7, 7)
SIZE = 56
CLASSES = 10


class CellModel(nn.Module):
    """Mean colour per grid cell as the patch tokens, a linear head; optionally busy per row."""

    def __init__(self, row_seconds: float = 0.0) -> None:
        super().__init__()
        self.patch_grid = GRID
        self.row_seconds = row_seconds
        generator = torch.Generator().manual_seed(0)
        self.head = nn.Linear(3 * GRID[0] * GRID[1], CLASSES)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(CLASSES, 3 * GRID[0] * GRID[1], generator=generator))

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images, self.patch_grid).flatten(2).transpose(1, 2)

    def forward_from_patches(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.row_seconds:
            time.sleep(self.row_seconds * len(tokens))  # the "device" is busy, the CPU is not
        return self.head(tokens.flatten(1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_from_patches(self.embed_patches(images))


def make_requests(batches: int, images: int) -> list[ExplainRequest]:
    """Random 56-px images, the label and one other class to explain, seeds from keys."""
    generator = torch.Generator().manual_seed(1)
    requests = []
    for b in range(batches):
        keys = [f"img-{b:04d}-{i:03d}" for i in range(images)]
        labels = torch.randint(0, CLASSES, (images, 1), generator=generator)
        classes = torch.cat([labels, (labels + 1) % CLASSES], dim=1)
        requests.append(
            ExplainRequest(
                images=torch.rand(images, 3, SIZE, SIZE, generator=generator),
                classes=classes,
                seeds=[derive_seed(key, 0) for key in keys],
            )
        )
    return requests


def run(
    model: nn.Module, requests: list[ExplainRequest], overlap: bool, budget: int, rows: int
) -> tuple[LabellerStats, list[torch.Tensor]]:
    with kernel_shap_stream(
        model, iter(requests), budget=budget, batch_size=rows, overlap=overlap
    ) as stream:
        phis = [result.phi for _, result in stream]
    return stream.stats, phis


def sampling_ms(images: int, budget: int, repeats: int) -> tuple[float, float]:
    """Best ms to sample one batch's coalitions: per-image calls, and the batched sampler."""
    seeds = [derive_seed(f"img-{i}", 0) for i in range(images)]
    players = GRID[0] * GRID[1]

    def per_image() -> None:
        for s in seeds:
            sample_leverage_coalitions(players, budget - 2, torch.Generator().manual_seed(s))

    def batched() -> None:
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        sample_leverage_coalitions_batch(players, budget - 2, gens)

    best = []
    for fn in (per_image, batched):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        best.append(1000 * min(times))
    return best[0], best[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--images", type=int, default=32, help="images per batch")
    parser.add_argument("--budget", type=int, default=150)
    parser.add_argument("--rows", type=int, default=2048, help="forward rows per model call")
    parser.add_argument(
        "--row-us", type=float, nargs="+", default=[11.0], help="sleep model: us per row"
    )
    parser.add_argument("--no-trivial", action="store_true", help="skip the trivial model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (0: leave torch's)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    requests = make_requests(args.batches, args.images)
    models = [(f"sleep {us:g} us/row", CellModel(us * 1e-6).eval()) for us in args.row_us]
    if not args.no_trivial:
        models.append(("trivial", CellModel().eval()))
    loads = [os.getloadavg()[0]]
    rows = []
    for name, model in models:
        run(model, requests[:2], True, args.budget, args.rows)  # warm-up
        best: dict[bool, LabellerStats] = {}
        outputs: dict[bool, list[torch.Tensor]] = {}
        for _ in range(args.repeats):
            for overlap in (False, True):
                stats, phis = run(model, requests, overlap, args.budget, args.rows)
                outputs[overlap] = phis
                if overlap not in best or stats.wall_seconds < best[overlap].wall_seconds:
                    best[overlap] = stats
            loads.append(os.getloadavg()[0])
        same = all(torch.equal(a, b) for a, b in zip(outputs[False], outputs[True], strict=True))
        if not same:
            raise SystemExit(f"{name}: the two schedules gave different attributions")
        rows.append((name, best))
    per_image, batched = sampling_ms(args.images, args.budget, 2 * args.repeats)

    print(
        f"{args.batches} batches of {args.images} images, {GRID[0]}x{GRID[1]} cells, budget "
        f"{args.budget}, {args.rows} rows per model call, torch threads "
        f"{torch.get_num_threads()}, 1-min load {min(loads):.1f} to {max(loads):.1f}; "
        "attributions identical between schedules"
    )
    print()
    print(
        "| model | schedule | images/s | vs sequential | model waits | model ms/batch "
        "| sample ms/batch | solve ms/batch | model thread waiting for coalitions "
        "| model thread blocked handing over |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, best in rows:
        base = best[False].images / best[False].wall_seconds
        for overlap in (False, True):
            s = best[overlap]
            rate = s.images / s.wall_seconds
            print(
                f"| {name} | {'overlapped' if overlap else 'sequential'} | {rate:.1f} "
                f"| {rate / base:.2f}x | {100 * s.model_wait_share:.1f}% "
                f"| {1000 * s.forward_seconds / s.batches:.1f} "
                f"| {1000 * s.sample_seconds / s.batches:.1f} "
                f"| {1000 * s.solve_seconds / s.batches:.1f} "
                f"| {100 * s.sample_wait_seconds / s.wall_seconds:.1f}% "
                f"| {100 * s.handoff_wait_seconds / s.wall_seconds:.1f}% |"
            )
    print()
    print(
        f"Sampling one batch's coalitions ({args.images} images): per-image calls "
        f"{per_image:.1f} ms, batched {batched:.1f} ms ({per_image / batched:.1f}x)"
    )


if __name__ == "__main__":
    main()

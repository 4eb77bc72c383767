"""Training and explanation cost of the self-explaining model.

Measures, on the same batch and model:
- the step time of P mode (cross-entropy) against X mode (plus the explanation loss); goal: the
  explanation loss adds at most 15 %;
- the SEM's single-pass explanation time against Kernel SHAP with 150 model evaluations per
  image (token masking, the fastest Kernel SHAP path); goal: at least 100x cheaper.

Run: ``python -m benchmarks.bench_training [--batch-size 32] [--repeats 10]``. Prints a markdown
table.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tasks.algorithms.kernel_shap import kernel_shap
from tasks.data.images import sample_to_tensor
from tasks.data.synthetic import SYNTHETIC_DOMAINS, make_split
from tasks.explanation_losses import explanation_loss
from tasks.finetune import FinetuneConfig, build_optimizer
from tasks.model import DEFAULT_MODEL, SelfExplainingCLIP, load_clip, zero_shot_head

DOMAIN = "shapes"


def _batch(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images, labels, targets = [], [], []
    for sample in make_split(DOMAIN, "train", seed=0, per_class=-(-size // 5)):
        images.append(sample_to_tensor(sample, 56))
        labels.append(int(sample["cls"]))
        mask = np.asarray(Image.open(io.BytesIO(sample["mask.png"])), dtype=np.float32) / 255.0
        targets.append(F.adaptive_avg_pool2d(torch.from_numpy(mask)[None], (7, 7))[0])
    return torch.stack(images[:size]), torch.tensor(labels[:size]), torch.stack(targets[:size])


def _median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    """Run the benchmark and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--explain-images", type=int, default=8)
    args = parser.parse_args()

    torch.manual_seed(0)
    clip_model = load_clip(DEFAULT_MODEL)
    head = zero_shot_head(
        clip_model, SYNTHETIC_DOMAINS[DOMAIN].class_names, model_name=DEFAULT_MODEL
    )
    model = SelfExplainingCLIP(clip_model, head).train()
    optimizer = build_optimizer(model, FinetuneConfig(domain=DOMAIN, mode="X", data="unused"))
    images, labels, targets = _batch(args.batch_size)

    def step(mode: str) -> None:
        logits, maps = model(images)
        loss = F.cross_entropy(logits, labels)
        if mode == "X":
            loss = loss + explanation_loss(maps, labels, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    # Interleave the two modes so machine-load drift hits both alike.
    p_times, x_times = [], []
    for _ in range(args.repeats):
        p_times.append(_median_seconds(lambda: step("P"), 1, warmup=1))
        x_times.append(_median_seconds(lambda: step("X"), 1, warmup=1))
    p_step, x_step = statistics.median(p_times), statistics.median(x_times)

    model.eval()
    few = images[: args.explain_images]
    few_labels = labels[: args.explain_images]
    with torch.no_grad():
        sem_time = _median_seconds(lambda: model(few), args.repeats)
        shap_time = _median_seconds(
            lambda: kernel_shap(model, few, few_labels, grid=(7, 7), budget=150, seed=0),
            max(1, args.repeats // 5),
            warmup=1,
        )

    per_image = args.explain_images
    rows = [
        ("train step, P mode", f"{p_step * 1e3:.1f} ms / batch of {args.batch_size}", ""),
        (
            "train step, X mode",
            f"{x_step * 1e3:.1f} ms / batch of {args.batch_size}",
            f"{(x_step / p_step - 1) * 100:+.1f} % vs P (goal <= 15 %)",
        ),
        ("SEM explanation (1 pass)", f"{sem_time / per_image * 1e3:.2f} ms / image", ""),
        (
            "Kernel SHAP, 150 evaluations",
            f"{shap_time / per_image * 1e3:.2f} ms / image",
            f"{shap_time / sem_time:.0f}x the SEM (goal >= 100x)",
        ),
    ]
    print(f"device: cpu, {torch.get_num_threads()} threads, model {DEFAULT_MODEL}\n")
    print("| measurement | time | comparison |")
    print("|---|---|---|")
    for name, value, note in rows:
        print(f"| {name} | {value} | {note} |")


if __name__ == "__main__":
    main()

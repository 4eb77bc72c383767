"""Accuracy of the demo's models on freshly rendered test images (forward passes only).

The demo's test splits are kept small because every image there is labelled by Kernel SHAP; the
accuracy of a model needs no labels, so this measures it on ``--per-class`` (default 100) test
images per class of each model's domain, with a Wilson 95% interval.

Run: ``python -m benchmarks.model_accuracy --out demo-out [--per-class 100]``. Prints a markdown
table of every fine-tuned model under ``{out}/models/`` and of the shipped base (zero-shot).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from tasks.data.synthetic import SYNTHETIC_DOMAINS, render_sample
from tasks.model import load_sem


def wilson(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    if total == 0:
        return math.nan, math.nan
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return centre - half, centre + half


@torch.no_grad()
def accuracy(uri: str, domain: str, per_class: int, seed: int = 0) -> tuple[int, int]:
    """Correct predictions of the model at ``uri`` on ``per_class`` test images per class."""
    sem = load_sem(uri, domain=domain).sem
    count = per_class * SYNTHETIC_DOMAINS[domain].num_classes
    correct = 0
    for start in range(0, count, 100):
        samples = [
            render_sample(domain, "test", i, seed=seed)
            for i in range(start, min(count, start + 100))
        ]
        images = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1) for s in samples])
        labels = torch.tensor([s.cls for s in samples])
        correct += int((sem.predict(images.float() / 255.0).argmax(1) == labels).sum())
    return correct, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the demo's output folder")
    parser.add_argument("--per-class", type=int, default=100)
    args = parser.parse_args()
    from tasks.pretrain import SHIPPED_BASE_FILE

    runs = [("base (zero-shot)", str(SHIPPED_BASE_FILE), d) for d in sorted(SYNTHETIC_DOMAINS)]
    for model in sorted(Path(args.out, "models").glob("*/model.safetensors")):
        import json

        config = json.loads(model.with_suffix(".json").read_text()).get("config", {})
        domain, mode = config.get("domain"), config.get("mode")
        if domain in SYNTHETIC_DOMAINS:
            runs.append((f"{domain} {mode}", str(model), domain))
    print("| model | domain | test images | accuracy [95% Wilson] |\n|---|---|---|---|")
    for name, uri, domain in runs:
        correct, total = accuracy(uri, domain, args.per_class)
        low, high = wilson(correct, total)
        print(f"| {name} | {domain} | {total} | {correct / total:.3f} [{low:.3f}, {high:.3f}] |")


if __name__ == "__main__":
    main()

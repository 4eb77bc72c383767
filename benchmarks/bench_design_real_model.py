"""The leverage design at small budgets on the demo's real model games: uniform (the default)
against outer strata first (``front_load``), both against a budget-4000 reference.

The synthetic 49-player games of bench_shapley_accuracy.py favour filling the outer strata first
below 2P pairs; this measures the same choice on what the pipeline labels: the demo's theta_P
and theta_X of ``shapes`` on 12 test images (the label class, the dataset-mean baseline), 3
seeds per budget. Errors per image, averaged: relative L2 ``||phi - ref|| / ||ref||`` and
Pearson with the reference (the score the sweep reports).

    PYTHONPATH=. python -m benchmarks.bench_design_real_model --out demo-out
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from tasks.algorithms.kernel_shap import kernel_shap_explain
from tasks.data.images import sample_to_tensor
from tasks.data.synthetic import make_split
from tasks.model.loading import load_sem

BUDGETS = (60, 100, 150, 196)
REFERENCE_BUDGET = 4000
IMAGES = 12
SEEDS = 3


def _errors(classifier, images, labels, mean, reference, budget, front_load):
    rel, pearson = [], []
    for rep in range(SEEDS):
        seeds = [1000 * rep + i for i in range(len(images))]
        phi = kernel_shap_explain(
            classifier,
            images,
            labels,
            budget=budget,
            baseline=mean,
            seed=seeds,
            front_load=front_load,
        ).phi
        rel.append(
            ((phi - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1))
            .mean()
            .item()
        )
        pearson.append(
            np.mean(
                [
                    np.corrcoef(p.flatten(), q.flatten())[0, 1]
                    for p, q in zip(phi, reference, strict=True)
                ]
            )
        )
    return float(np.mean(rel)), float(np.mean(pearson))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="a finished demo's output folder")
    args = parser.parse_args()
    torch.set_num_threads(2)
    samples = list(make_split("shapes", "test", per_class=3, image_size=56))[:IMAGES]
    images = torch.stack([sample_to_tensor(s, 56) for s in samples])
    labels = torch.tensor([int(s["cls"]) for s in samples])
    mean = images.mean(dim=(0, 2, 3))
    print(
        "| model | budget | uniform rel. L2 | outer-first rel. L2 | uniform Pearson | outer-first Pearson |"
    )
    print("|---|---|---|---|---|---|")
    for mode in ("P", "X"):
        [weights] = sorted(Path(args.out, "models").glob(f"shapes-{mode}-*/model.safetensors"))
        classifier = load_sem(str(weights), domain="shapes").sem.as_classifier().eval()
        reference = kernel_shap_explain(
            classifier,
            images,
            labels,
            budget=REFERENCE_BUDGET,
            baseline=mean,
            seed=list(range(100, 100 + IMAGES)),
        ).phi
        for budget in BUDGETS:
            uniform = _errors(classifier, images, labels, mean, reference, budget, False)
            outer = _errors(classifier, images, labels, mean, reference, budget, True)
            print(
                f"| theta_{mode} | {budget} | {uniform[0]:.3f} | {outer[0]:.3f} | "
                f"{uniform[1]:.3f} | {outer[1]:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()

"""Does a part of tau transfer better than the whole? Parts of the vector, swept like the sweep.

theta_X's in-domain claim is about theta_X; the transfer is about theta_T + lambda tau. So what
is added to the targets can be shaped without touching the in-domain result: a subset of the
image tower's tensors (the transformer blocks only, without the projection, ...) or the
largest entries of each tensor (the "trim" step of TIES-merging, Yadav et al., NeurIPS 2023).
For each shape of the vector and each related target of a finished sweep this evaluates the SEM
pass at every lambda on val and test exactly as the sweep does (:func:`evaluate_target`,
without the Kernel SHAP rows), chooses lambda on val by the sweep's rule, and prints the test
Pearson gain at lambda* with the accuracy change in points. The ``whole`` row reproduces the
sweep's own figures.

Run: ``python -m benchmarks.vector_shaping --out demo-out [--sweep embedded-default]``.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path

import torch

from tasks.algorithms.vectors import ExplainabilityVector
from tasks.sweep.config import SweepConfig
from tasks.sweep.evaluation import evaluate_target
from tasks.sweep.inputs import load_target, load_vector
from tasks.sweep.selection import mark_chosen
from tasks.sweep.stage import load_target_data

Shape = Callable[[str, torch.Tensor], torch.Tensor]


def keep_keys(pattern: str) -> Shape:
    """Keep the deltas whose key matches ``pattern``; zero the others."""
    regex = re.compile(pattern)
    return lambda key, delta: delta if regex.search(key) else torch.zeros_like(delta)


def drop_keys(pattern: str) -> Shape:
    """Zero the deltas whose key matches ``pattern``."""
    regex = re.compile(pattern)
    return lambda key, delta: torch.zeros_like(delta) if regex.search(key) else delta


def trim(fraction: float) -> Shape:
    """Keep each tensor's ``fraction`` largest-magnitude entries (TIES' trim), zero the rest."""

    def shape(key: str, delta: torch.Tensor) -> torch.Tensor:
        k = max(1, round(fraction * delta.numel()))
        threshold = delta.abs().flatten().kthvalue(delta.numel() - k + 1).values
        return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))

    return shape


SHAPES: dict[str, Shape | None] = {
    "whole": None,
    "no projection": drop_keys(r"^visual\.proj$"),
    "blocks only": keep_keys(r"^visual\.transformer\.resblocks\."),
    "matrices only": lambda key, delta: delta if delta.dim() >= 2 else torch.zeros_like(delta),
    "no last block": drop_keys(r"^visual\.transformer\.resblocks\.2\.|^visual\.(ln_post|proj)"),
    "attention only": keep_keys(r"\.attn\."),
    "mlp only": keep_keys(r"\.mlp\."),
    "trim 20%": trim(0.2),
    "trim 50%": trim(0.5),
}


def shaped(vector: ExplainabilityVector, shape: Shape | None) -> ExplainabilityVector:
    if shape is None:
        return vector
    deltas = {key: shape(key, delta) for key, delta in vector.deltas.items()}
    return ExplainabilityVector(deltas, vector.meta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the pipeline's output folder")
    parser.add_argument("--sweep", default="embedded-default", help="the sweep's name")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--lambdas", type=float, nargs="*", help="default: the sweep's grid")
    args = parser.parse_args()
    summary = json.loads((Path(args.out) / "sweeps" / args.sweep / "summary.json").read_text())
    config = SweepConfig.model_validate(summary["config"])
    config = config.model_copy(
        update={
            "kernel_shap_budgets": (),
            "lambdas": tuple(args.lambdas) if args.lambdas else config.lambdas,
        }
    )
    vector = load_vector(config.vector)
    targets = [t for t in config.targets if t.role == "target"]
    inputs = {}
    for spec in targets:
        model = load_target(spec, config.grid, config.device)
        inputs[spec.domain] = (model, *load_target_data(config, spec, model))
    print("| vector | norm | " + " | ".join(t.domain for t in targets) + " |")
    print("|---|---|" + "---|" * len(targets))
    for name in args.shapes:
        part = shaped(vector, SHAPES[name])
        cells = []
        for spec in targets:
            model, data, accuracy = inputs[spec.domain]
            rows, _ = evaluate_target(config, spec, model, part, data, accuracy_data=accuracy)
            chosen = mark_chosen(
                rows, metric=config.selection_metric, tolerance=config.accuracy_tolerance
            )
            test = {r["lambda"]: r for r in rows if r["split"] == "test"}
            gain = test[chosen]["pearson"] - test[0.0]["pearson"]
            points = 100 * (test[chosen]["accuracy"] - test[0.0]["accuracy"])
            cells.append(f"{gain:+.3f} ({chosen:g}, {points:+.1f})")
        print(f"| {name} | {part.norm():.3f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

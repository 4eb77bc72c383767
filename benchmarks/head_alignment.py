"""Why the vector transfers to some targets and inverts on others: the heads' geometry.

The SEM's map for class ``y`` is the cosine between each patch token and the class embedding
``t_y``. Write ``t_y = alpha_y * s + r_y`` with ``s`` the normalised mean of the source's class
embeddings: what theta_X learned to do to object tokens in terms of ``s`` (the only direction the
source's head gives it) reaches a target's map scaled by ``alpha_y``
(:func:`tasks.sweep.inputs.head_alignment`, also in every sweep report). A real CLIP's prompts
share a large common component (``alpha`` well above 0 for every domain). A tiny text tower
trained contrastively on the few prompts of the synthetic domains spreads their clusters apart,
so ``alpha`` can be negative (the first shipped base: -0.32 to +0.25); the shipped base locks its
text tower at initialisation and keeps ``alpha`` near 0.9.

For the source (theta_X in its own domain, against the reference of theta_X) and each target
of a finished sweep this prints, on the target's test reference images, alpha and
the Pearson of the reference with the SEM map read along the target's own head (what the sweep
reports) and along ``s`` alone, at lambda 0 and at ``--lam``. The sweep's own configuration
(its ``summary.json``) names the models, references and vector.

Run: ``python -m benchmarks.head_alignment --out demo-out [--sweep embedded-default] [--lam 2]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tasks.model.sem import standardize_per_image
from tasks.sweep.config import SweepConfig
from tasks.sweep.inputs import (
    head_alignment,
    load_reference,
    load_target,
    load_vector,
    source_direction,
)


def pearson(maps: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over images of the Pearson correlation of two ``[N, gh, gw]`` map stacks."""
    a = standardize_per_image(maps.float()).flatten(1)
    b = standardize_per_image(targets.float()).flatten(1)
    return float((a * b).mean(dim=1).mean())


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the pipeline's output folder")
    parser.add_argument("--sweep", default="embedded-default", help="the sweep's name")
    parser.add_argument("--lam", type=float, default=2.0, help="the lambda compared with 0")
    args = parser.parse_args()
    summary = json.loads((Path(args.out) / "sweeps" / args.sweep / "summary.json").read_text())
    config = SweepConfig.model_validate(summary["config"])
    s = source_direction(config)
    if s is None:
        raise SystemExit(f"sweep {args.sweep} has no source to read s from")
    alignment = head_alignment(config)
    vector = load_vector(config.vector)
    print(
        f"| target | alpha | own head, lambda 0 | own head, lambda {args.lam:g} "
        f"| along s, lambda 0 | along s, lambda {args.lam:g} |\n|---|---|---|---|---|---|"
    )
    # The source first (theta_X, no vector: alpha is 1 by definition), then the targets.
    order = {"source": 0, "target": 1}
    specs = sorted(
        (t for t in config.targets if t.role in order), key=lambda t: (order[t.role], t.domain)
    )
    for spec in specs:
        model = load_target(spec, config.grid)
        head = model.sem.class_embeddings
        batch = next(iter(load_reference(spec.test_reference).batches(10_000)))
        index = torch.arange(len(batch.labels))
        own, along = [], []
        for coef in (0.0, args.lam) if spec.role == "target" else (0.0,):
            model.load_lambda(vector, coef, allow_different_base=config.allow_different_base)
            model.sem.set_head(head)
            _, maps = model.sem(batch.images)
            own.append(pearson(maps[index, batch.labels], batch.targets))
            model.sem.set_head(s[None])
            _, maps = model.sem(batch.images)
            along.append(pearson(maps[:, 0], batch.targets))
        if spec.role == "source":
            print(f"| {spec.domain} (theta_X) | +1 | {own[0]:+.3f} | | {along[0]:+.3f} | |")
            continue
        print(
            f"| {spec.domain} | {alignment[spec.domain]:+.3f} | {own[0]:+.3f} | {own[1]:+.3f} "
            f"| {along[0]:+.3f} | {along[1]:+.3f} |"
        )


if __name__ == "__main__":
    main()

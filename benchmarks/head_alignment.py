"""Why the vector transfers to some targets and inverts on others: the heads' geometry.

The SEM's map for class ``y`` is the cosine between each patch token and the class embedding
``t_y``. Write ``t_y = alpha_y * s + r_y`` with ``s`` the normalised mean of the source's class
embeddings: what theta_X learned to do to object tokens in terms of ``s`` (the only direction the
source's head gives it) reaches a target's map scaled by ``alpha_y``. A real CLIP's prompts share
a large common component (``alpha`` well above 0 for every domain); the embedded tiny base was
trained contrastively on the 25 prompts of the five synthetic domains alone, which spreads the
domains' text clusters apart, so ``alpha`` can be negative.

For each target of a demo's output this prints, on the target's test reference images:

* ``alpha``: the mean over the target's classes of ``s . t_c`` (the text towers of all models
  are the base's: fine-tuning trains the image encoder only);
* Pearson of the reference with the SEM map read along the target's own head (what the sweep
  reports) and along ``s`` alone, at lambda 0 and at ``--lam``.

Run: ``python -m benchmarks.head_alignment --out demo-out [--lam 2]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from tasks.model.sem import standardize_per_image, zero_shot_head
from tasks.sweep.config import TargetSpec
from tasks.sweep.inputs import load_reference, load_target, load_vector


def pearson(maps: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over images of the Pearson correlation of two ``[N, gh, gw]`` map stacks."""
    a = standardize_per_image(maps.float()).flatten(1)
    b = standardize_per_image(targets.float()).flatten(1)
    return float((a * b).mean(dim=1).mean())


def _config(path: Path) -> dict:
    return json.loads(path.read_text()).get("config", {})


def _runs(out: Path) -> dict[tuple[str, str], Path]:
    """(domain, mode) -> the fine-tuned model file under ``out/models``."""
    runs = {}
    for model in sorted(out.glob("models/*/model.safetensors")):
        config = _config(model.with_suffix(".json"))
        runs[config.get("domain"), config.get("mode")] = model
    return runs


def _test_reference(out: Path, name: str) -> str:
    for version in sorted(out.glob(f"xdata/{name}/v-*")):
        if json.loads((version / "config.json").read_text())["config"]["split"] == "test":
            return str(version)
    raise SystemExit(f"no test reference under {out}/xdata/{name}")


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the demo's output folder")
    parser.add_argument("--lam", type=float, default=2.0, help="the lambda compared with 0")
    args = parser.parse_args()
    out = Path(args.out)
    [vector_file] = sorted(out.glob("vectors/*.safetensors"))
    vector = load_vector(str(vector_file))
    source = vector.meta.source_domain
    runs = _runs(out)
    source_model = load_target(
        TargetSpec(
            domain=source,
            model=str(runs[source, "X"]),
            test_reference=_test_reference(out, f"{source}-xref"),
            role="source",
        ),
        grid=7,
    )
    s = F.normalize(source_model.sem.class_embeddings.mean(dim=0), dim=0)
    targets = sorted(domain for domain, mode in runs if mode == "P" and domain != source)
    print(
        f"| target | alpha | own head, lambda 0 | own head, lambda {args.lam:g} "
        f"| along s, lambda 0 | along s, lambda {args.lam:g} |\n|---|---|---|---|---|---|"
    )
    for domain in targets:
        reference = _test_reference(out, f"{domain}-ref")
        model = load_target(
            TargetSpec(
                domain=domain,
                model=str(runs[domain, "P"]),
                val_reference=reference,
                test_reference=reference,
            ),
            grid=7,
        )
        head = zero_shot_head(model.sem.clip, model.class_names)
        alpha = float((head @ s).mean())
        batch = next(iter(load_reference(reference).batches(10_000)))
        index = torch.arange(len(batch.labels))
        own, along = [], []
        for coef in (0.0, args.lam):
            model.load_lambda(vector, coef, allow_different_base=True)
            model.sem.set_head(head)
            _, maps = model.sem(batch.images)
            own.append(pearson(maps[index, batch.labels], batch.targets))
            model.sem.set_head(s[None])
            _, maps = model.sem(batch.images)
            along.append(pearson(maps[:, 0], batch.targets))
        print(
            f"| {domain} | {alpha:+.3f} | {own[0]:+.3f} | {own[1]:+.3f} "
            f"| {along[0]:+.3f} | {along[1]:+.3f} |"
        )


if __name__ == "__main__":
    main()

"""How well can theta_X explain itself? Fine-tuning recipes scored on the paper's in-domain claim.

The claim: theta_X's single pass agrees with a Kernel SHAP reference of theta_X at least as well
as Kernel SHAP at 150 evaluations of theta_X does. Every recipe here fine-tunes theta_X from the
finished run's base on an X-dataset labelled by the run's theta_P, then scores it on the first
``--images`` source test images of the run's in-domain reference (the images, not the maps: the
reference is recomputed for each candidate, since fine-tuning moves the model it explains):

- ``sem``: Pearson of the single pass with a Kernel SHAP reference of the candidate at
  ``--reference-budget`` evaluations;
- ``ks150``: the same for Kernel SHAP of the candidate at 150 evaluations (another seed);
- ``diff``: their paired difference, with its standard error over the images;
- ``sem_vs_run``: the single pass against the run's own reference (of the run's theta_X), a fixed
  yardstick across candidates.

A recipe is a JSON object of ``FinetuneConfig`` fields (``lr``, ``epochs``, ``beta``, ...) over
the run's theta_X config, plus optionally ``"x_data": [images_per_class, budget]``: an X-dataset
of that many synthetic source images per class (rendered with seed 0) labelled at that budget
(the run's source must be a built-in synthetic domain), e.g. twice the images at half the budget
(the same labelling cost).

Run: ``python -m benchmarks.theta_x_recipes --out demo-out`` (the first round's recipes: about
25 min on 2 CPU cores), ``--set game``, ``--set consistency`` or ``--set amortized`` (the later
rounds'), or ``--recipes '[{"epochs": 36}]'``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from storage import open_storage
from tasks.algorithms.kernel_shap import kernel_shap
from tasks.build_dataset.config import BuildConfig
from tasks.build_dataset.stage import finalize_build, label_shard, plan_build
from tasks.explanation_losses import pearson_per_image
from tasks.finetune import FinetuneConfig, finetune
from tasks.model.loading import load_sem, read_sidecar, weights_uri
from tasks.sweep.config import SweepConfig
from tasks.sweep.inputs import load_reference
from tasks.sweep.statistics import standard_error

DEFAULT_RECIPES: tuple[dict[str, Any], ...] = (
    {},
    {"lr": 3e-4},
    {"lr": 1e-3},
    {"epochs": 24},
    {"epochs": 36},
    {"epochs": 72},
    {"beta": 3.0},
    {"beta": 10.0},
    {"lr": 3e-4, "beta": 3.0},
    {"lr": 3e-4, "epochs": 36},
    {"epochs": 36, "beta": 3.0},
    {"x_data": [128, 75], "epochs": 18},
    {"x_data": [128, 75], "epochs": 36},
)
#: The rounds after the first, as docs/results.md's table shows them (``--set NAME``).
RECIPE_SETS: dict[str, tuple[dict[str, Any], ...]] = {
    "first": DEFAULT_RECIPES,
    # issue 24: the game loss and many images at a low budget
    "game": (
        {"x_loss": "game"},
        {"x_loss": "game", "epochs": 36},
        {"x_data": [256, 50]},
        {"x_data": [256, 50], "x_loss": "game"},
        {"x_data": [256, 50], "x_loss": "game", "epochs": 6},
        {"x_data": [128, 75], "x_loss": "game", "epochs": 18},
        {"x_data": [512, 50], "x_loss": "game"},
    ),
    # issue 24: theta_X's game kept at theta_P's on the labels' coalitions
    "consistency": (
        {"game_consistency": 1.0},
        {"game_consistency": 3.0, "lr": 3e-4},
        {"game_consistency": 1.0, "lr": 3e-4},
        {"game_consistency": 1.0, "lr": 3e-4, "x_loss": "game"},
        {"game_consistency": 1.0, "lr": 3e-4, "consistency_coalitions": 8},
        {"game_consistency": 1.0, "lr": 3e-4, "x_data": [128, 75], "epochs": 6},
        {"game_consistency": 1.0, "lr": 5e-4},
        {"game_consistency": 0.3, "lr": 1e-3},
        {"game_consistency": 1.0, "lr": 1e-3},
        {"game_consistency": 1.0, "lr": 1e-3, "consistency_coalitions": 2},
        {"game_consistency": 1.0, "lr": 2e-3},
        {"game_consistency": 1.0, "x_loss": "game", "epochs": 36},
    ),
    # issue 24: many images at a low budget, with the game-consistency term
    "amortized": (
        {"game_consistency": 1.0, "lr": 5e-4, "x_data": [256, 50]},
        {"game_consistency": 1.0, "lr": 5e-4, "x_data": [128, 75]},
        {"game_consistency": 1.0, "lr": 5e-4, "x_data": [256, 50], "x_loss": "game"},
    ),
}


def recipe_name(recipe: dict[str, Any]) -> str:
    """A folder name for ``recipe`` (``default`` for the run's own)."""
    parts = []
    for key, value in sorted(recipe.items()):
        if isinstance(value, list):
            text = "x".join(map(str, value))
        else:
            text = f"{value:g}" if isinstance(value, (int, float)) else str(value)
        parts.append(f"{key.replace('_', '')}{text}")
    return "-".join(parts) or "default"


def build_x_data(x_config: dict[str, Any], per_class: int, budget: int, work: str) -> str:
    """Label ``per_class`` synthetic source images per class at ``budget`` with the run's theta_P."""
    run = BuildConfig.model_validate(x_config)
    label = run.label.model_copy(update={"budget": budget})
    config = BuildConfig(
        name=f"{run.name}{per_class}b{budget}",
        split=run.split,
        input_kind="synthetic",
        input_uri=run.input_name or run.input_uri,
        synthetic_per_class=per_class,
        image_size=run.image_size,
        model_name=run.model_name,
        checkpoint=run.checkpoint,
        label=label,
        num_shards=run.num_shards,
        output_uri=work,
        device=run.device,
    )
    plan = plan_build(config)
    for shard in range(config.num_shards):
        label_shard(plan, shard)
    summary = finalize_build(plan)
    if summary["missing"]:
        raise RuntimeError(f"X-dataset {config.name}: shards failed: {summary['missing']}")
    return summary["dataset_uri"]


@torch.no_grad()
def score(uri: str, batch: Any, mean: torch.Tensor, reference_budget: int) -> dict[str, float]:
    """The candidate's single pass and Kernel SHAP-150 against its own reference."""
    sem = load_sem(uri).sem
    logits, maps = sem(batch.images)
    labels = batch.labels
    label_maps = maps[torch.arange(len(labels)), labels]
    classifier = sem.as_classifier().eval()
    n = len(labels)

    def explain(budget: int, first_seed: int) -> torch.Tensor:
        seeds = [first_seed + i for i in range(n)]
        return kernel_shap(
            classifier, batch.images, labels, budget=budget, baseline=mean, seed=seeds
        )

    reference = explain(reference_budget, 1000)
    ks150 = explain(150, 5000)
    sem_r = pearson_per_image(label_maps, reference)
    ks_r = pearson_per_image(ks150, reference)
    diff = (sem_r - ks_r).double().numpy()
    return {
        "accuracy": float((logits.argmax(1) == labels).float().mean()),
        "sem": float(sem_r.mean()),
        "ks150": float(ks_r.mean()),
        "diff": float(diff.mean()),
        "diff_se": standard_error(diff),
        "sem_vs_run": float(pearson_per_image(label_maps, batch.targets).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the pipeline's output folder")
    parser.add_argument("--sweep", default="embedded-default", help="the sweep's name")
    parser.add_argument("--recipes", help="JSON list of recipes (default: the --set)")
    parser.add_argument(
        "--set", default="first", choices=sorted(RECIPE_SETS), help="a named list of recipes"
    )
    parser.add_argument("--images", type=int, default=100, help="source test images scored")
    parser.add_argument("--reference-budget", type=int, default=400)
    parser.add_argument("--work", help="scratch folder (default: OUT/benchmarks/theta-x)")
    args = parser.parse_args()
    summary = json.loads((Path(args.out) / "sweeps" / args.sweep / "summary.json").read_text())
    config = SweepConfig.model_validate(summary["config"])
    source = next((t for t in config.targets if t.role == "source"), None)
    if source is None:
        raise SystemExit(f"sweep {args.sweep} scored no source in domain")
    x_run = read_sidecar(weights_uri(source.model))["config"]
    x_data_config = open_storage(x_run["data"]).read_json("config.json")["config"]
    work = args.work or str(Path(args.out).resolve() / "benchmarks" / "theta-x")
    Path(work).mkdir(parents=True, exist_ok=True)
    reference = load_reference(source.test_reference)
    batch = reference.head(args.images)
    mean = torch.tensor(reference.baseline_mean)
    recipes = json.loads(args.recipes) if args.recipes else list(RECIPE_SETS[args.set])
    print(
        "| recipe | train expl loss | val accuracy | SEM | Kernel SHAP-150 | SEM - KS-150 (se) "
        "| SEM vs the run's reference |\n|---|---|---|---|---|---|---|"
    )
    for recipe in recipes:
        name = recipe_name(recipe)
        fields = {k: v for k, v in recipe.items() if k != "x_data"}
        if "x_data" in recipe:
            fields["data"] = build_x_data(x_data_config, *recipe["x_data"], f"{work}/data")
        run = FinetuneConfig.model_validate({**x_run, **fields})
        started = time.perf_counter()
        finetune(run, open_storage(f"{work}/models"), name)
        seconds = time.perf_counter() - started
        last = open_storage(f"{work}/models/{name}").read_json("model.json")["metrics"][-1]
        result = score(
            f"{work}/models/{name}/model.safetensors", batch, mean, args.reference_budget
        )
        print(
            f"| {name} | {last['train_expl']:.3f} | {last['val_accuracy']:.3f} "
            f"| {result['sem']:.3f} | {result['ks150']:.3f} "
            f"| {result['diff']:+.3f} ({result['diff_se']:.3f}) | {result['sem_vs_run']:.3f} |",
            flush=True,
        )
        with open(f"{work}/results.jsonl", "a") as log:
            log.write(json.dumps({"recipe": recipe, "train_s": seconds, **result}) + "\n")


if __name__ == "__main__":
    main()

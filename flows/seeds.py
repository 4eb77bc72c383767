"""The whole study repeated over seeds: one pipeline run per seed, one report over them."""

from __future__ import annotations

from typing import Any

from flows.pipeline import PipelineConfig, explain_transfer_pipeline
from storage import open_file, open_storage
from tasks.sweep.markdown import (
    in_domain_claims,
    is_source,
    mean_of,
    render_seeds_report,
    target_claims,
)

SEEDS_REPORT = "seeds-report.md"


def seed_claims(rows: list[dict[str, Any]], chosen: dict[str, float]) -> dict[str, Any]:
    """One seed's point estimates: chosen lambda minus lambda 0 on test, per target."""
    out = {}
    for target, coef in chosen.items():
        if is_source(rows, target):
            out[target] = {"role": "source", **in_domain_claims(rows, target)}
            continue
        claims = target_claims(rows, target, coef, None)
        out[target] = {
            "chosen": coef,
            **{
                f"d_{metric}": mean_of(claims["chosen"], metric)
                - mean_of(claims["lambda_0"], metric)
                for metric in ("accuracy", "pearson", "deletion_auc")
            },
            # What the vector does at the grid's largest lambda, whichever was chosen.
            "max_d_pearson": mean_of(claims["at_max"], "pearson")
            - mean_of(claims["lambda_0"], "pearson"),
        }
    return out


def run_seeds(config: PipelineConfig, seeds: int) -> str:
    """Run the pipeline with seeds ``0 .. seeds - 1`` (training, labelling and data) and report.

    The first seed is the configured run (its sweep name unchanged, so a finished run of the same
    config is reused); each further seed gets its own sweep name (``{sweep_name}-seed{s}``) and
    data folders under the same output root;
    ``seeds-report.md`` there holds the mean and t-interval over seeds of each claimed difference.

    Returns:
        The markdown report.
    """
    per_seed: dict[int, dict[str, Any]] = {}
    for seed in range(seeds):
        run = config.model_copy(
            update={
                "seed": config.seed + seed,
                "data_seed": config.data_seed + seed,
                # The first seed is the configured run itself (a demo already run is reused).
                "sweep_name": config.sweep_name
                if seed == 0
                else f"{config.sweep_name}-seed{config.seed + seed}",
            }
        )
        sweep = explain_transfer_pipeline(run)["sweep"]
        storage, key = open_file(sweep["table_uri"])
        per_seed[seed] = seed_claims(storage.read_parquet(key).to_pylist(), sweep["chosen"])
    report = render_seeds_report(per_seed)
    open_storage(config.out_uri).write_bytes(SEEDS_REPORT, report.encode())
    return report

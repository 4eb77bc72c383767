"""Stage 4 flow: the transfer sweep, one Prefect task per target domain."""

from __future__ import annotations

import math
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows.artifacts import (
    Progress,
    artifact_key,
    markdown_table,
    publish_markdown,
    publish_png,
    publish_table,
)
from flows.assets import materializing, stage_asset, upstream_assets
from storage import layout
from tasks.sweep import (
    SweepConfig,
    SweepResult,
    TargetOutcome,
    assemble_sweep,
    load_sweep,
    read_output,
    sweep_storage,
    sweep_target,
    validate_sweep,
)


@task(name="validate-sweep", cache_policy=NO_CACHE)
def validate_sweep_task(config: SweepConfig) -> dict[str, Any]:
    """Refuse a vector that does not fit some target before any evaluation."""
    return validate_sweep(config)


@task(name="sweep-target", task_run_name="sweep-{target}", cache_policy=NO_CACHE, tags=["gpu"])
def sweep_target_task(config: SweepConfig, target: str, overwrite: bool = False) -> dict[str, Any]:
    """Evaluate one target at every lambda and Kernel SHAP budget (skipped when complete)."""
    outcome = sweep_target(config, target, overwrite=overwrite)
    get_run_logger().info(
        "%s: chose lambda %g in %.1f s%s",
        target,
        outcome.chosen_lambda,
        outcome.seconds,
        " (already complete)" if outcome.skipped else "",
    )
    return outcome.to_dict()


@task(name="assemble-sweep", cache_policy=NO_CACHE)
def assemble_sweep_task(config: SweepConfig, outcomes: list[dict[str, Any]]) -> SweepResult:
    """Write the table, the plot and the summary of the sweep."""
    return assemble_sweep(config, [TargetOutcome.from_dict(o) for o in outcomes])


def _assemble(config: SweepConfig, outcomes: list[dict[str, Any]]) -> SweepResult:
    """Assemble the sweep as the materialization of its table: an asset made from the vector,
    every target's model, its Kernel SHAP references and the data its accuracy is measured on."""
    table = sweep_storage(config).url(layout.SWEEP_RESULTS_FILE)
    inputs: list[str | None] = [config.vector]
    for target in config.targets:
        inputs += [target.model, target.val_reference, target.test_reference, target.accuracy_data]

    def metadata(result: SweepResult) -> dict[str, Any]:
        return {
            "rows": len(result.rows),
            "targets": len(config.targets),
            "lambdas": list(config.lambdas),
            "chosen_lambda": dict(result.chosen),
        }

    asset = stage_asset(table, "sweep", f"sweep {config.name}")
    return materializing(assemble_sweep_task, asset, upstream_assets(inputs), metadata)(
        config, outcomes
    )


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def summary_markdown(result: SweepResult) -> str:
    """The sweep's summary as markdown: chosen lambdas, lambda 0 vs chosen, SEM vs Kernel SHAP."""
    summary = result.summary
    selection = summary["selection"]
    lines = [
        f"# Transfer sweep `{summary['name']}`",
        "",
        f"- vector: `{summary['vector']}`",
        f"- lambda selected on {selection['split']} by {selection['metric']}, accuracy drop "
        f"at most {selection['accuracy_tolerance_points']:g} points",
        f"- table: `{result.uris['table']}`",
        f"- plot: `{result.uris['plot']}`",
        f"- summary: `{result.uris['summary']}`",
        "",
        "## Test split: lambda 0 vs chosen lambda",
        "",
    ]
    rows = []
    for target, info in summary["targets"].items():
        for label, key in (("0", "lambda_0"), (f"{info['chosen_lambda']:g} (chosen)", "chosen")):
            scores = info["test"][key] or {}
            rows.append(
                {
                    "target": target,
                    "related": info["related"],
                    "lambda": label,
                    **{name: _fmt(scores.get(name)) for name in scores},
                }
            )
    lines += [markdown_table(rows), "", "## SEM (1 inference) vs Kernel SHAP (test)", ""]
    rows = []
    for target, info in summary["targets"].items():
        chosen = info["test"]["chosen"] or {}
        rows.append(
            {
                "target": target,
                "method": "SEM",
                "inferences": 1,
                "pearson": _fmt(chosen.get("pearson")),
            }
        )
        for budget, scores in sorted(
            info["kernel_shap"].get("test", {}).items(), key=lambda kv: int(kv[0])
        ):
            rows.append(
                {
                    "target": target,
                    "method": "Kernel SHAP",
                    "inferences": budget,
                    "pearson": _fmt(scores.get("pearson")),
                }
            )
        matched = info["sem_matches_kernel_shap_budget"]
        rows.append(
            {
                "target": target,
                "method": "SEM matches Kernel SHAP at",
                "inferences": matched if matched is not None else "none of the budgets",
                "pearson": "",
            }
        )
    lines.append(markdown_table(rows))
    heatmaps = result.uris.get("heatmaps", {})
    if heatmaps:
        lines += ["", "## Heatmaps", ""]
        lines += [f"- {target}: `{uri}`" for target, uri in heatmaps.items()]
    return "\n".join(lines) + "\n"


def publish_sweep(config: SweepConfig, result: SweepResult) -> None:
    """The sweep's table, summary, plot and heatmaps as Prefect artifacts."""
    name = config.name
    publish_table(result.rows, artifact_key("sweep", name, "table"), f"transfer sweep {name}")
    publish_markdown(
        summary_markdown(result), artifact_key("sweep", name, "summary"), f"transfer sweep {name}"
    )
    publish_png(
        read_output(result.uris["plot"]),
        artifact_key("sweep", name, "plot"),
        f"transfer sweep {name}: quality and accuracy against lambda and inferences",
    )
    for target, uri in result.uris.get("heatmaps", {}).items():
        publish_png(
            read_output(uri),
            artifact_key("sweep", name, "heatmaps", target),
            f"{target}: SEM label-class maps at lambda 0 and the chosen lambda (test images)",
        )


def _result_dict(result: SweepResult) -> dict[str, Any]:
    return {
        "name": result.summary["name"],
        "chosen": result.chosen,
        "table_uri": result.uris["table"],
        "plot_uri": result.uris["plot"],
        "summary_uri": result.uris["summary"],
        "heatmap_uris": result.uris.get("heatmaps", {}),
        "rows": len(result.rows),
        "skipped": result.skipped,
    }


# One target at a time: each evaluation already keeps every core (or the GPU) busy, and
# concurrent targets only oversubscribe them. ``transfer_sweep.with_options(task_runner=...)``
# changes it.
@flow(
    name="transfer-sweep",
    flow_run_name="sweep-{config.name}",
    task_runner=ThreadPoolTaskRunner(max_workers=1),
)
def transfer_sweep(config: SweepConfig, overwrite: bool = False) -> dict[str, Any]:
    """Sweep lambda over the target domains and publish the table, summary and figures.

    The vector is checked against every target model first, so a mismatched vector fails before
    any evaluation. Each target then runs as its own task and stores its rows; a rerun after a
    crash skips the targets already done, and a complete sweep is only republished.

    Args:
        config: the sweep.
        overwrite: recompute complete targets and the complete sweep.

    Returns:
        ``name``, ``chosen`` (target -> lambda), ``table_uri``, ``plot_uri``, ``summary_uri``,
        ``heatmap_uris``, ``rows`` and ``skipped``.
    """
    logger = get_run_logger()
    result = None if overwrite else load_sweep(config)
    if result is not None:
        logger.info("sweep %s already complete: republishing its artifacts", config.name)
    else:
        validate_sweep_task(config)
        progress = Progress(len(config.targets), f"sweep {config.name}: targets evaluated")
        futures = {
            spec.domain: sweep_target_task.submit(config, spec.domain, overwrite)
            for spec in config.targets
        }
        outcomes, failed = [], []
        for target, future in futures.items():
            future.wait()
            progress.advance()
            if future.state.is_completed():
                outcomes.append(future.result())
            else:
                failed.append(f"{target}: {future.state.message}")
        if failed:
            raise RuntimeError(
                f"sweep {config.name}: targets failed: {failed} (rerun to redo only those)"
            )
        result = _assemble(config, outcomes)
    publish_sweep(config, result)
    for target, coef in result.chosen.items():
        logger.info("%s: chosen lambda %g", target, coef)
    return _result_dict(result)

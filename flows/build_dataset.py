"""Stage 1 flow: build an explanation dataset, one Prefect task per shard."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import dask
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from flows.artifacts import Progress, artifact_key, markdown_table, publish_markdown
from flows.runners import RunnerConfig, make_task_runner
from tasks.build_dataset import BuildConfig, BuildPlan, finalize_build, label_shard, plan_build

#: Retries of a failed shard before it is reported as failed (the other shards go on).
SHARD_RETRIES = 2


@task(name="plan-build", task_run_name="plan-{config.name}-{config.split}", cache_policy=NO_CACHE)
def plan_build_task(config: BuildConfig) -> dict[str, Any]:
    """Validate the config, list the input and fix the dataset version."""
    return plan_build(config).to_dict()


@task(
    name="label-shard",
    task_run_name="label-shard-{shard_index:05d}",
    retries=SHARD_RETRIES,
    retry_delay_seconds=[2, 10],
    tags=["gpu"],
    cache_policy=NO_CACHE,
)
def label_shard_task(plan: dict[str, Any], shard_index: int, overwrite: bool = False) -> dict:
    """Label and publish one shard (skipped when its completion marker exists)."""
    outcome = label_shard(BuildPlan.from_dict(plan), shard_index, overwrite=overwrite)
    get_run_logger().info(
        "%s: %d samples, %d quarantined, %.1f images/s%s",
        outcome.shard,
        outcome.samples,
        outcome.quarantined,
        outcome.images_per_second,
        " (already complete)" if outcome.skipped else "",
    )
    return {
        "shard": outcome.shard,
        "samples": outcome.samples,
        "quarantined": outcome.quarantined,
        "seconds": round(outcome.seconds, 3),
        "skipped": outcome.skipped,
    }


@task(name="finalize-build", task_run_name="finalize-build", cache_policy=NO_CACHE)
def finalize_build_task(plan: dict[str, Any]) -> dict[str, Any]:
    """Write the manifest and the quarantine report of the complete shards."""
    return finalize_build(BuildPlan.from_dict(plan))


def _submit_shards(plan: dict[str, Any], shards: list[int], overwrite: bool, gpu: bool) -> list:
    if gpu:
        # A Dask worker advertising GPU=1 runs one shard at a time on its GPU.
        with dask.annotate(resources={"GPU": 1}):
            return [label_shard_task.submit(plan, i, overwrite) for i in shards]
    return [label_shard_task.submit(plan, i, overwrite) for i in shards]


@flow(name="label-shards", flow_run_name="label-shards-{name}")
def label_shards_flow(
    plan: dict[str, Any],
    name: str,
    num_shards: int,
    overwrite: bool = False,
    gpu: bool = False,
    progress_id: UUID | None = None,
) -> dict[str, list]:
    """Fan the shards out on this flow's task runner (threads or Dask); failures are collected.

    A subflow because the task runner of a flow is fixed when it starts: the parent picks it
    from its ``runner`` parameter, so deployments choose threads or Dask by parameters alone.
    """
    progress = Progress(num_shards, f"{name}: shards labelled", artifact_id=progress_id)
    futures = _submit_shards(plan, list(range(num_shards)), overwrite, gpu=gpu)
    outcomes, failed = [], []
    for future in as_completed(futures):
        progress.advance()
        # future.state can still read "Running" just after completion (it is fetched, not
        # pushed); result() waits for the final state and raises only when the task failed.
        try:
            outcomes.append(future.result())
        except Exception as exc:
            failed.append(str(exc) or type(exc).__name__)
    return {"outcomes": outcomes, "failed": failed}


@flow(name="build-explanation-dataset", flow_run_name="build-{config.name}-{config.split}")
def build_explanation_dataset(
    config: BuildConfig,
    overwrite: bool = False,
    runner: RunnerConfig | None = None,
) -> dict[str, Any]:
    """Label every input image with Kernel SHAP and write the X-dataset's shards.

    Rerunning with the same config fills only the missing shards of the same version; a changed
    config, explained model or input writes a new version. A shard that still fails after its
    retries is listed in the result and the summary artifact; the other shards are kept.

    Args:
        config: the build (input, explained model, labelling config, shards, output URI).
        overwrite: relabel complete shards too.
        runner: where the shard tasks run: a thread pool (default, 2 threads), a local Dask
            cluster, or an existing Dask scheduler (see :class:`~flows.runners.RunnerConfig`).

    Returns:
        The build summary: dataset URI and version, complete and failed shards, counts.
    """
    logger = get_run_logger()
    runner = runner or RunnerConfig()
    plan = plan_build_task(config)
    # preserve_layout makes the plan's shard count follow the input's.
    n = plan["config"]["num_shards"]
    # The progress artifact belongs to this run; the subflow moves it along.
    progress = Progress(n, f"{config.name}-{config.split}: shards labelled")
    shards = label_shards_flow.with_options(task_runner=make_task_runner(runner))(
        plan,
        name=f"{config.name}-{config.split}",
        num_shards=n,
        overwrite=overwrite,
        gpu=runner.gpus_per_worker > 0,
        progress_id=progress.id,
    )
    outcomes, failed = shards["outcomes"], shards["failed"]
    summary = finalize_build_task(plan)
    labelled = [o for o in outcomes if not o["skipped"]]
    seconds = sum(o["seconds"] for o in labelled)
    images = sum(o["samples"] for o in labelled)
    summary["images_per_second"] = round(images / seconds, 2) if seconds else None
    summary["failed_errors"] = failed
    rows = sorted(outcomes, key=lambda o: o["shard"])
    publish_markdown(
        f"# Explanation dataset `{config.name}` ({config.split})\n\n"
        f"- version: `{summary['version']}`\n- location: `{summary['dataset_uri']}`\n"
        f"- shards complete: {len(summary['complete'])} / {n}; failed: "
        f"{', '.join(summary['missing']) or 'none'}\n"
        f"- samples: {summary['samples']} of {summary['inputs']} inputs; quarantined: "
        f"{summary['quarantined']}\n"
        f"- labelling throughput: {summary['images_per_second']} images/s\n\n"
        + markdown_table(rows),
        key=artifact_key("x-dataset", config.name, config.split),
        description=f"explanation dataset {config.name} {config.split}",
    )
    if summary["missing"]:
        logger.error("shards failed after %d retries: %s", SHARD_RETRIES, summary["missing"])
    return summary

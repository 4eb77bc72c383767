"""Stage 1 flows: build an explanation dataset, one Prefect task per shard; regenerate the
X-datasets of a newly published model or labelling config."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import dask
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from flows.artifacts import Progress, artifact_key, markdown_table, publish_markdown
from flows.assets import dataset_metadata, materializing, stage_asset, upstream_assets
from flows.runners import RunnerConfig, make_task_runner
from storage import ObjectNotFoundError, layout, open_storage
from storage.catalogue import DatasetVersion, list_versions
from storage.core import worth_retrying
from storage.uri import open_file
from tasks.build_dataset import BuildConfig, BuildPlan, LabelConfig, finalize_build, plan_build
from tasks.build_dataset.resolve import ResolvePlan, finalize_resolve, plan_resolve, resolve_shard
from tasks.build_dataset.stage import label_task
from tasks.model.loading import read_sidecar, weights_uri

#: Retries of a failed shard before it is reported as failed (the other shards go on).
SHARD_RETRIES = 2
#: Retries of planning and finalizing: both only read and rewrite the same small objects, so a
#: transient storage error there is retried like one in a shard.
STEP_RETRIES = 2


def retry_unless_lasting(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's ``retry_condition_fn``: no retry after a cause only a person removes.

    A full or read-only volume, a refused permission or an input that vanished gives the same
    error on every try: the run reports it at once instead of 12 s of retries later.
    """
    try:
        state.result()
    except Exception as exc:
        return worth_retrying(exc)
    return True


@task(
    name="plan-build",
    task_run_name="plan-{config.name}-{config.split}",
    retries=STEP_RETRIES,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_unless_lasting,
    cache_policy=NO_CACHE,
)
def plan_build_task(config: BuildConfig) -> dict[str, Any]:
    """Validate the config, list the input and fix the dataset version.

    Returns the plan as small task parameters (no listing: each shard's units are in storage).
    """
    return plan_build(config).to_dict()


@task(
    name="label-shard",
    task_run_name="label-shard-{task_index:05d}",
    retries=SHARD_RETRIES,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_unless_lasting,
    tags=["gpu"],
    cache_policy=NO_CACHE,
)
def label_shard_task(plan: dict[str, Any], task_index: int, overwrite: bool = False) -> list[dict]:
    """Label and publish the shards of one task (each skipped when its marker exists).

    One output shard per task, except under ``preserve_layout`` (a group of input shards).
    """
    logger = get_run_logger()
    rows = []
    for outcome in label_task(BuildPlan.from_dict(plan), task_index, overwrite=overwrite):
        logger.info(
            "%s: %d samples, %d quarantined, %.1f images/s%s",
            outcome.shard,
            outcome.samples,
            outcome.quarantined,
            outcome.images_per_second,
            " (already complete)" if outcome.skipped else "",
        )
        rows.append(
            {
                "shard": outcome.shard,
                "samples": outcome.samples,
                "quarantined": outcome.quarantined,
                "seconds": round(outcome.seconds, 3),
                "skipped": outcome.skipped,
            }
        )
    return rows


@task(
    name="finalize-build",
    task_run_name="finalize-build",
    retries=STEP_RETRIES,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_unless_lasting,
    cache_policy=NO_CACHE,
)
def finalize_build_task(plan: dict[str, Any]) -> dict[str, Any]:
    """Write the manifest and the quarantine report of the complete shards."""
    return finalize_build(BuildPlan.from_dict(plan))


def _submit_tasks(plan: dict[str, Any], tasks: list[int], overwrite: bool, gpu: bool) -> list:
    # `plan` is the small dict of BuildPlan.to_dict(): what each submit serialises is O(1) in
    # the size of the input, whatever the task runner.
    if gpu:
        # A Dask worker advertising GPU=1 runs one task at a time on its GPU.
        with dask.annotate(resources={"GPU": 1}):
            return [label_shard_task.submit(plan, i, overwrite) for i in tasks]
    return [label_shard_task.submit(plan, i, overwrite) for i in tasks]


@flow(name="label-shards", flow_run_name="label-shards-{name}")
def label_shards_flow(
    plan: dict[str, Any],
    name: str,
    num_tasks: int,
    overwrite: bool = False,
    gpu: bool = False,
    progress_id: UUID | None = None,
) -> dict[str, list]:
    """Fan the tasks out on this flow's task runner (threads or Dask); failures are collected.

    A subflow because the task runner of a flow is fixed when it starts: the parent picks it
    from its ``runner`` parameter, so deployments choose threads or Dask by parameters alone.
    """
    built = BuildPlan.from_dict(plan)
    progress = Progress(built.output_shards, f"{name}: shards labelled", artifact_id=progress_id)
    futures = _submit_tasks(plan, list(range(num_tasks)), overwrite, gpu=gpu)
    shards_of = {id(future): len(built.task_shards(i)) for i, future in enumerate(futures)}
    outcomes, failed = [], []
    for future in as_completed(futures):
        progress.advance(shards_of[id(future)])
        # future.state can still read "Running" just after completion (it is fetched, not
        # pushed); result() waits for the final state and raises only when the task failed.
        try:
            outcomes.extend(future.result())
        except Exception as exc:
            failed.append(str(exc) or type(exc).__name__)
    return {"outcomes": outcomes, "failed": failed}


def _finalize(built: BuildPlan, plan: dict[str, Any]) -> dict[str, Any]:
    """Finalize the build as the materialization of its X-dataset version (an asset made from
    the input shards and the explained model)."""
    config = built.config
    dataset = stage_asset(
        built.dataset_uri, "x-dataset", f"{config.name} {config.split} {built.version}"
    )
    # A synthetic input is a generator's name, not stored data: no upstream asset.
    inputs = [None if config.input_kind == "synthetic" else config.input_uri, config.checkpoint]
    finalize = materializing(
        finalize_build_task,
        dataset,
        upstream_assets(inputs),
        metadata=lambda summary: dataset_metadata(summary, built.model_fingerprint),
    )
    return finalize(plan)


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
    # Under preserve_layout the output has the input's shards, shared by num_shards tasks.
    built = BuildPlan.from_dict(plan)
    n, tasks = built.output_shards, built.num_tasks
    # The progress artifact belongs to this run; the subflow moves it along.
    progress = Progress(n, f"{config.name}-{config.split}: shards labelled")
    shards = label_shards_flow.with_options(task_runner=make_task_runner(runner))(
        plan,
        name=f"{config.name}-{config.split}",
        num_tasks=tasks,
        overwrite=overwrite,
        gpu=runner.gpus_per_worker > 0,
        progress_id=progress.id,
    )
    outcomes, failed = shards["outcomes"], shards["failed"]
    summary = _finalize(built, plan)
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


def _read_json(uri: str) -> dict[str, Any]:
    storage, key = open_file(uri)
    return storage.read_json(key)


def _model_slot(checkpoint: str) -> tuple[str, str] | None:
    """The (domain, mode) its sidecar gives a checkpoint; None when it has none (or is gone)."""
    try:
        sidecar = read_sidecar(checkpoint)
    except ObjectNotFoundError:
        return None
    domain, mode = sidecar.get("domain"), sidecar.get("mode")
    return (domain, mode) if domain and mode else None


def _latest_versions(root: str) -> list[DatasetVersion]:
    """The newest readable version of each X-dataset name and split under ``root``."""
    try:
        versions = list_versions(root)
    except ObjectNotFoundError:
        return []
    latest: dict[tuple[str, str], DatasetVersion] = {}
    for version in versions:  # newest first within each name and split
        if version.split is not None and version.status not in ("orphaned", "unreadable"):
            latest.setdefault((version.name, version.split), version)
    return [latest[key] for key in sorted(latest)]


def plan_regeneration(
    root: str,
    checkpoint: str | None = None,
    label_config: str | None = None,
    dataset: str | None = None,
) -> list[BuildConfig]:
    """The builds that relabel the X-datasets under ``root`` a new model or setting changes.

    A new ``checkpoint`` supersedes the models of its domain and mode (its sidecar's): every
    dataset whose latest version explains such a model, and not this one, is relabelled by it.
    A new ``label_config`` (a :class:`~tasks.build_dataset.LabelConfig` JSON file) relabels the
    latest version of each split of ``dataset``. Each build is the latest version's own config
    with that one change, so it writes a new version beside the old one.

    Raises:
        ValueError: the checkpoint's sidecar names no domain and mode, or a labelling config
            is given without the dataset it applies to.
    """
    slot = None
    if checkpoint is not None:
        slot = _model_slot(checkpoint)
        if slot is None:
            raise ValueError(f"{checkpoint}: no sidecar naming its domain and mode")
    label = None
    if label_config is not None:
        if dataset is None:
            raise ValueError("a labelling config applies to one dataset: give its name")
        label = LabelConfig.model_validate(_read_json(label_config))
    builds = []
    for version in _latest_versions(root):
        if dataset is not None and version.name != dataset:
            continue
        config = BuildConfig.model_validate(
            open_storage(version.uri).read_json(layout.DATASET_CONFIG_FILE)["config"]
        )
        changes: dict[str, Any] = {}
        if slot is not None:
            old = config.checkpoint
            if not old or _model_slot(old) != slot:
                continue
            if weights_uri(old) == weights_uri(checkpoint):
                continue  # already labelled by this model
            changes["checkpoint"] = checkpoint
        if label is not None and config.label != label:
            changes["label"] = label.to_dict()
        if changes:
            builds.append(BuildConfig.model_validate({**config.to_dict(), **changes}))
    return builds


@flow(name="regenerate-explanation-datasets", flow_run_name="regenerate-datasets")
def regenerate_explanation_datasets(
    root: str,
    checkpoint: str | None = None,
    label_config: str | None = None,
    dataset: str | None = None,
    runner: RunnerConfig | None = None,
) -> dict[str, Any]:
    """Relabel the X-datasets under ``root`` that a newly published model or labelling config
    supersedes; each rebuild is a :func:`build_explanation_dataset` run, a new version.

    The ``regenerate-on-publish`` deployment runs this flow when
    ``explain-transfer.checkpoint.published`` or ``explain-transfer.labelling-config.published``
    is emitted (:mod:`flows.events`), with the event's payload as parameters.

    Args:
        root: the output root holding ``xdata/`` (the event's ``root``).
        checkpoint: a new model: relabel what models of its domain and mode labelled.
        label_config: URI of new labelling settings for ``dataset``.
        dataset: only this X-dataset name (required with ``label_config``).
        runner: where the shard tasks run (see :class:`~flows.runners.RunnerConfig`).

    Returns:
        ``regenerated``: one row per build (name, split, version, dataset URI, failed shards).
    """
    logger = get_run_logger()
    builds = plan_regeneration(root, checkpoint, label_config, dataset)
    if not builds:
        logger.info("no X-dataset under %s is superseded: nothing to regenerate", root)
    rows = []
    for config in builds:
        summary = build_explanation_dataset(config=config, runner=runner)
        rows.append(
            {
                "name": config.name,
                "split": config.split,
                "version": summary["version"],
                "dataset_uri": summary["dataset_uri"],
                "missing": len(summary["missing"]),
            }
        )
    cause = f"checkpoint `{checkpoint}`" if checkpoint else f"labelling `{label_config}`"
    publish_markdown(
        f"# X-datasets regenerated for {cause}\n\n- root: `{root}`\n\n" + markdown_table(rows),
        key=artifact_key("regenerated", dataset or "x-datasets"),
        description=f"X-datasets regenerated under {root}",
    )
    return {"regenerated": rows}


@task(
    name="resolve-shard",
    task_run_name="resolve-{shard}",
    retries=SHARD_RETRIES,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_unless_lasting,
    cache_policy=NO_CACHE,
)
def resolve_shard_task(plan: ResolvePlan, shard: str) -> dict[str, Any]:
    """Solve one shard's games again into the new version (no model)."""
    return resolve_shard(plan, shard)


@task(
    name="finalize-resolve",
    task_run_name="finalize-resolve",
    retries=STEP_RETRIES,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_unless_lasting,
    cache_policy=NO_CACHE,
)
def finalize_resolve_task(plan: ResolvePlan) -> dict[str, Any]:
    """Write the manifest of the re-solved version's complete shards."""
    return finalize_resolve(plan)


@flow(name="resolve-explanation-dataset", flow_run_name="resolve-{source_uri}")
def resolve_explanation_dataset(
    source_uri: str,
    shrinkage: float | None = None,
    error_estimate: bool | None = None,
    budget: int | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Solve an X-dataset version again from its kept games, or extend it to a larger budget.

    A re-solve runs no model: each shard's ``game.npz`` files are solved again with the new
    solve settings. An extension (``budget`` larger than the source's) keeps every evaluated
    coalition and runs the version's model on the extra ones only. Either way one task per
    shard (a rerun skips the complete ones) writes a new version beside the source, whose
    ``config.json`` names the source in ``resolved_from`` or ``extended_from``
    (:mod:`tasks.build_dataset.resolve`). ``device`` is where an extension's model runs (None:
    the source build's setting).

    Returns:
        ``{"dataset_uri", "version", "resolved_from" or "extended_from", "complete",
        "missing", "samples", "failed"}``.
    """
    logger = get_run_logger()
    plan = plan_resolve(
        source_uri,
        shrinkage=shrinkage,
        error_estimate=error_estimate,
        budget=budget,
        device=device,
    )
    futures = [resolve_shard_task.submit(plan, shard) for shard in plan.shards]
    failed = []
    for future in as_completed(futures):
        try:
            future.result()
        except Exception as exc:
            failed.append(str(exc) or type(exc).__name__)
    # A re-solve is made from the source version alone; an extension ran its model too.
    upstream = [plan.source_uri, plan.build.get("checkpoint") if plan.extends else None]
    finalize = materializing(
        finalize_resolve_task,
        stage_asset(plan.dataset_uri, "x-dataset", f"{plan.name} {plan.split} {plan.version}"),
        upstream_assets(upstream),
        metadata=lambda summary: dataset_metadata(summary, plan.model_fingerprint),
    )
    summary = {**finalize(plan), "failed": failed}
    how = "Extended" if plan.extends else "Re-solved"
    logger.info("%s %s into %s: %s", how.lower(), source_uri, plan.dataset_uri, summary)
    what = (
        f"to budget {plan.label.budget}, evaluating only the extra coalitions"
        if plan.extends
        else "without the model"
    )
    publish_markdown(
        f"# {how} {plan.name} {plan.split}: {plan.version}\n\n"
        f"From `{plan.source_uri}` {what}, with shrinkage "
        f"{plan.label.shrinkage}, error_estimate {plan.label.error_estimate}: "
        f"{summary['samples']} samples in {len(summary['complete'])} shards, "
        f"{len(summary['missing'])} missing.",
        key=f"resolve-{plan.name}-{plan.split}",
        description=f"{how.lower()} version of {plan.name}-{plan.split}",
    )
    return summary

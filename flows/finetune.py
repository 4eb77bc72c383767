"""Flow of the fine-tuning stage: P (prediction only) or X (with explanation supervision)."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.artifacts import artifact_key, markdown_table, publish_markdown, publish_table
from flows.assets import materializing, model_metadata, stage_asset, upstream_assets
from flows.events import emit_checkpoint_published
from flows.progress import StepProgress
from storage import layout, open_storage
from storage.checkpoints import checkpoint_fingerprint
from storage.fingerprints import fingerprint_of
from tasks.finetune import FinetuneConfig, data_fingerprint, finetune


@task(
    name="finetune",
    task_run_name="finetune-{config.domain}-{config.mode}",
    cache_policy=NO_CACHE,
    retries=1,
)
def finetune_task(config: FinetuneConfig, out_uri: str, out_key: str) -> dict[str, Any]:
    """Train one model; resumes from its last checkpoint after a crash, skips when complete."""
    return finetune(
        config,
        open_storage(out_uri),
        out_key,
        progress=StepProgress(f"fine-tuning {config.domain} ({config.mode})"),
    )


def finetune_key(config: FinetuneConfig) -> str:
    """Where a fine-tuning run writes: one folder per (domain, mode, config, data content), so
    a domain re-exported with other images trains a model of its own beside the old one."""
    key = fingerprint_of(config.resume_fingerprint(), data_fingerprint(config))
    return layout.finetune_key(config.domain, config.mode, key)


def _model_asset(config: FinetuneConfig, out_uri: str, out_key: str):
    """The checkpoint's asset, made from the base, the training data and the val data."""
    uri = open_storage(out_uri).url(f"{out_key}/{layout.MODEL_FILE}")
    asset = stage_asset(uri, "checkpoint", f"theta_{config.mode} {config.domain}")
    return asset, upstream_assets([config.base, config.data, config.val_data])


@flow(name="finetune", flow_run_name="finetune-{config.domain}-{config.mode}")
def finetune_flow(
    config: FinetuneConfig,
    out_uri: str,
    out_key: str | None = None,
    announce: bool = True,
) -> dict:
    """Fine-tune the self-explaining model on one domain, prediction-only (P) or with X.

    Args:
        config: the run (domain, mode, base weights URI, training data URI, hyperparameters).
        out_uri: the output root.
        out_key: the run's folder under ``out_uri`` (default: derived from the config).
        announce: emit ``explain-transfer.checkpoint.published`` when a new model is written
            (the ``regenerate-on-publish`` deployment then relabels the X-datasets of the
            model it supersedes). The pipeline passes False: it labels its own X-datasets
            with the new model in the same run.

    Returns:
        ``uri`` of the final ``model.safetensors``, fingerprints, per-epoch metrics.
    """
    out_key = out_key or finetune_key(config)
    asset, upstream = _model_asset(config, out_uri, out_key)
    result = materializing(finetune_task, asset, upstream, metadata=model_metadata)(
        config, out_uri, out_key
    )
    if announce and not result["skipped"]:
        emit_checkpoint_published(
            result["uri"],
            open_storage(out_uri).uri,
            fingerprint=checkpoint_fingerprint(result["uri"]),
            domain=config.domain,
            mode=config.mode,
            published_by="finetune",
        )
    publish_table(
        result["metrics"],
        key=artifact_key("finetune", config.domain, config.mode),
        description=f"fine-tuning {config.domain} mode {config.mode}: metrics per epoch",
    )
    publish_markdown(
        f"# Fine-tuning `{config.domain}` mode {config.mode}\n\n- model: `{result['uri']}`\n"
        f"- fingerprint: `{result['fingerprint']}` (base `{result['base_fingerprint']}`)\n"
        f"- steps: {result['steps']}{' (already complete)' if result['skipped'] else ''}\n\n"
        + markdown_table(result["metrics"]),
        key=artifact_key("finetune-summary", config.domain, config.mode),
        description=f"fine-tuning {config.domain} {config.mode}",
    )
    return result

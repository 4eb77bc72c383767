"""Flow of the fine-tuning stage: P (prediction only) or X (with explanation supervision)."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.artifacts import artifact_key, markdown_table, publish_markdown, publish_table
from flows.progress import StepProgress
from storage import layout, open_storage
from tasks.finetune import FinetuneConfig, finetune


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
    """Where a fine-tuning run writes: one folder per (domain, mode, config)."""
    return layout.finetune_key(config.domain, config.mode, config.resume_fingerprint())


@flow(name="finetune", flow_run_name="finetune-{config.domain}-{config.mode}")
def finetune_flow(config: FinetuneConfig, out_uri: str, out_key: str | None = None) -> dict:
    """Fine-tune the self-explaining model on one domain, prediction-only (P) or with X.

    Args:
        config: the run (domain, mode, base weights URI, training data URI, hyperparameters).
        out_uri: the output root.
        out_key: the run's folder under ``out_uri`` (default: derived from the config).

    Returns:
        ``uri`` of the final ``model.safetensors``, fingerprints, per-epoch metrics.
    """
    out_key = out_key or finetune_key(config)
    result = finetune_task(config, out_uri, out_key)
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

"""Flows of the model stages: export the synthetic data, pretrain the base, fine-tune P and X."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.artifacts import Progress, artifact_key, markdown_table, publish_markdown, publish_table
from storage import layout, open_file, open_storage
from storage.checkpoints import load_sidecar
from tasks.data.sources import export_synthetic_domain
from tasks.finetune import FinetuneConfig, finetune
from tasks.pretrain import PretrainConfig, pretrain_base

_console_progress = False


def enable_console_progress(enabled: bool = True) -> None:
    """Also show training progress as tqdm bars (the command line turns this on)."""
    global _console_progress
    _console_progress = enabled


class _StepProgress:
    """Forwards ``progress(step, total)`` to a Prefect progress artifact in ~5% increments,
    and to a tqdm bar on the terminal when :func:`enable_console_progress` is on."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.artifact: Progress | None = None
        self.bar: Any = None
        self.reported = 0

    def __call__(self, step: int, total: int) -> None:
        if self.artifact is None:
            self.artifact = Progress(total, self.description)
            if _console_progress:
                import sys

                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=self.description, unit="step", file=sys.stderr)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if step == total:
                self.bar.close()
        if step == total or step - self.reported >= max(1, total // 20):
            self.artifact.advance(step - self.reported)
            self.reported = step


@task(name="export-split", task_run_name="export-{domain}", cache_policy=NO_CACHE, retries=1)
def export_domain_task(
    domain: str, out_uri: str, per_class: dict[str, int] | None, image_size: int, seed: int
) -> dict[str, list[str]]:
    """Write a synthetic domain's splits as WebDataset shards (complete shards are kept)."""
    return export_synthetic_domain(
        open_storage(out_uri),
        domain,
        seed=seed,
        per_class=per_class,
        image_size=image_size,
    )


@flow(name="export-synthetic-domain", flow_run_name="export-{domain}")
def export_domain_flow(
    domain: str,
    out_uri: str,
    per_class: dict[str, int] | None = None,
    image_size: int = 56,
    seed: int = 0,
) -> dict[str, list[str]]:
    """Export a built-in synthetic domain (train/val/test shards, classes.json, manifest).

    Args:
        domain: a built-in synthetic domain.
        out_uri: the dataset folder (local path or s3:// URI).
        per_class: samples per class for each split (None: the domain's defaults).
        image_size: image side in pixels.
        seed: generation seed.
    """
    shards = export_domain_task(domain, out_uri, per_class, image_size, seed)
    get_run_logger().info(
        "%s exported to %s: %s", domain, out_uri, {k: len(v) for k, v in shards.items()}
    )
    return shards


@task(name="pretrain", task_run_name="pretrain-base", cache_policy=NO_CACHE, retries=1)
def pretrain_task(config: PretrainConfig, out_uri: str) -> str:
    key = pretrain_base(config, open_storage(out_uri), progress=_StepProgress("base pretraining"))
    return open_storage(out_uri).url(key)


@flow(name="pretrain-base", flow_run_name="pretrain-base")
def pretrain_base_flow(config: PretrainConfig, out_uri: str) -> str:
    """Train (or reuse) the shared pretrained start of the embedded default.

    Real runs skip this flow and point the fine-tuning flows at real CLIP weights.

    Returns:
        URI of the base model's ``model.safetensors``.
    """
    uri = pretrain_task(config, out_uri)
    sidecar = load_sidecar(*open_file(uri))
    metrics = sidecar.get("metrics", {})
    publish_markdown(
        f"# Base model\n\n- weights: `{uri}`\n- fingerprint: `{sidecar.get('fingerprint')}`\n\n"
        f"```json\n{_json(metrics)}\n```",
        key=artifact_key("base-model"),
        description="base model pretraining",
    )
    return uri


def _json(value: Any) -> str:
    import json

    return json.dumps(value, indent=2, sort_keys=True, default=str)


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
        progress=_StepProgress(f"fine-tuning {config.domain} ({config.mode})"),
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

"""Flow of the base-model stage: pretrain the embedded default's shared start."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.artifacts import artifact_key, publish_markdown
from flows.progress import StepProgress
from storage import open_file, open_storage
from storage.checkpoints import load_sidecar
from tasks.pretrain import PretrainConfig, pretrain_base


@task(name="pretrain", task_run_name="pretrain-base", cache_policy=NO_CACHE, retries=1)
def pretrain_task(config: PretrainConfig, out_uri: str) -> str:
    key = pretrain_base(config, open_storage(out_uri), progress=StepProgress("base pretraining"))
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

"""Stage 3 flow: the explainability vector tau_X = theta_X - theta_P."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.artifacts import artifact_key, publish_markdown
from flows.assets import materializing, stage_asset, upstream_assets
from storage import layout, open_storage
from tasks.vector import compute_vector


@task(name="compute-vector", task_run_name="vector-{key}", cache_policy=NO_CACHE)
def compute_vector_task(theta_x_uri: str, theta_p_uri: str, out_uri: str, key: str) -> dict:
    return compute_vector(theta_x_uri, theta_p_uri, out_uri, key)


def _vector_metadata(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("source_domain", "base_fingerprint", "norm", "tensors", "skipped")
    return {k: result[k] for k in keys if k in result}


@flow(name="compute-vector", flow_run_name="vector-{source_domain}")
def compute_vector_flow(
    source_domain: str, theta_x_uri: str, theta_p_uri: str, out_uri: str, key: str | None = None
) -> dict[str, Any]:
    """Compute and store the explainability vector of a source domain.

    Args:
        source_domain: the domain theta_X and theta_P were fine-tuned on (checked).
        theta_x_uri: URI of the X-mode ``model.safetensors``.
        theta_p_uri: URI of the P-mode ``model.safetensors``.
        out_uri: the output root.
        key: the vector's key (default ``vectors/{source_domain}.safetensors``).
    """
    key = key or f"{layout.VECTORS_PREFIX}/{source_domain}.safetensors"
    asset = stage_asset(open_storage(out_uri).url(key), "vector", f"tau_X {source_domain}")
    vector_task = materializing(
        compute_vector_task,
        asset,
        upstream_assets([theta_x_uri, theta_p_uri]),
        metadata=_vector_metadata,
    )
    result = vector_task(theta_x_uri, theta_p_uri, out_uri, key)
    if result["source_domain"] != source_domain:
        raise ValueError(f"models are from {result['source_domain']!r}, not {source_domain!r}")
    publish_markdown(
        f"# Explainability vector `{source_domain}`\n\n- vector: `{result['uri']}`\n"
        f"- norm: {result['norm']:.4f} over {result['tensors']} tensors\n"
        f"- base: `{result['base_fingerprint']}`\n- theta_X: `{theta_x_uri}`\n"
        f"- theta_P: `{theta_p_uri}`",
        key=artifact_key("vector", source_domain),
        description=f"explainability vector of {source_domain}",
    )
    return result

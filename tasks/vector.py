"""Stage 3: compute and store the explainability vector of a source domain."""

from __future__ import annotations

import logging
from typing import Any

from storage import open_file, open_storage
from storage.checkpoints import (
    checkpoint_fingerprint,
    load_sidecar,
    load_state_dict,
    sidecar_key,
)
from storage.fingerprints import fingerprint_of
from tasks.algorithms.vectors import ExplainabilityVector

logger = logging.getLogger(__name__)


def compute_vector(theta_x_uri: str, theta_p_uri: str, out_uri: str, key: str) -> dict[str, Any]:
    """tau_X = theta_X - theta_P of two fine-tuned models, written as safetensors + sidecar.

    Both models must come from the same pretrained start (their sidecars' base fingerprints)
    and the same source domain. The vector is skipped only when ``key`` holds a vector computed
    from these two models (the completion contract, :meth:`storage.Storage.is_done`); a vector
    at ``key`` from other models is recomputed and replaced.

    Args:
        theta_x_uri: URI of the X-mode model's ``model.safetensors``.
        theta_p_uri: URI of the P-mode model's ``model.safetensors``.
        out_uri: the output root.
        key: where the vector goes under ``out_uri`` (``*.safetensors``).

    Returns:
        ``uri``, ``source_domain``, ``base_fingerprint``, ``norm`` and ``skipped``.

    Raises:
        ValueError: the two models have different bases, domains or architectures.
    """
    out = open_storage(out_uri)
    uris = {"X": theta_x_uri, "P": theta_p_uri}
    sides = {mode: load_sidecar(*open_file(uri)) for mode, uri in uris.items()}
    inputs = fingerprint_of({mode: checkpoint_fingerprint(uri) for mode, uri in uris.items()})
    unit = key
    if out.is_done(unit, inputs, key, sidecar_key(key)):
        vector = ExplainabilityVector.load(out, key)
        logger.info("vector %s exists for these models: reused", out.url(key))
        return _summary(out.url(key), vector, skipped=True)
    states = {mode: load_state_dict(*open_file(uri)) for mode, uri in uris.items()}
    x, p = sides["X"], sides["P"]
    if x["base_fingerprint"] != p["base_fingerprint"]:
        raise ValueError(
            f"theta_X and theta_P start from different bases ({x['base_fingerprint']} vs "
            f"{p['base_fingerprint']}): their difference is not an explainability vector"
        )
    if x["domain"] != p["domain"]:
        raise ValueError(f"theta_X is from {x['domain']!r} but theta_P from {p['domain']!r}")
    if (x.get("mode"), p.get("mode")) != ("X", "P"):
        raise ValueError(
            f"expected an X-mode and a P-mode model, got {x.get('mode')} and {p.get('mode')}"
        )
    vector = ExplainabilityVector.from_models(
        states["X"],
        states["P"],
        base_fingerprint=x["base_fingerprint"],
        source_domain=x["domain"],
        theta_x_fingerprint=x["fingerprint"],
        theta_p_fingerprint=p["fingerprint"],
        architecture=x["config"]["model_name"],
    )
    vector.save(out, key)
    out.publish_done(unit, inputs)
    logger.info("vector of %s written to %s (norm %.4f)", x["domain"], out.url(key), vector.norm())
    return _summary(out.url(key), vector, skipped=False)


def _summary(uri: str, vector: ExplainabilityVector, skipped: bool) -> dict[str, Any]:
    return {
        "uri": uri,
        "source_domain": vector.meta.source_domain,
        "base_fingerprint": vector.meta.base_fingerprint,
        "norm": vector.norm(),
        "tensors": len(vector.keys()),
        "skipped": skipped,
    }

"""Prefect events the pipeline emits when an input of its X-datasets changes.

Two things change what an X-dataset would hold: the model it explains and its labelling
settings. Publishing either emits a Prefect event (``prefect.events.emit_event``), and the
``regenerate-on-publish`` deployment of ``deployments/prefect.yaml`` has triggers on both that
relabel the X-datasets concerned (:func:`flows.build_dataset.regenerate_explanation_datasets`):

- ``explain-transfer.checkpoint.published``: resource id the checkpoint's asset key (its URI,
  ``file://`` for a local path); payload ``uri``, ``root`` (the output root it was published
  under), ``fingerprint`` (its content fingerprint, as
  :func:`storage.checkpoints.checkpoint_fingerprint` reads it), ``domain``, ``mode`` and
  ``published_by``. Emitted by the fine-tuning
  flow when it writes a model, and by :func:`publish_model` (``explain-transfer publish-model``).
- ``explain-transfer.labelling-config.published``: resource id the config file's asset key;
  payload ``uri``, ``root``, ``dataset`` (the X-dataset name it applies to) and ``fingerprint``.
  Emitted by :func:`publish_labelling_config`.

Without a Prefect API (``PREFECT_API_URL`` unset) nothing is sent: Prefect would otherwise
start a temporary server of its own, where no deployment listens.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from prefect.events import Event, emit_event
from prefect.settings import get_current_settings

from flows.assets import asset_key
from storage import layout, open_storage
from storage.checkpoints import load_sidecar, sidecar_key, state_fingerprint
from storage.uri import open_file
from tasks.build_dataset import LabelConfig

logger = logging.getLogger(__name__)

CHECKPOINT_PUBLISHED = "explain-transfer.checkpoint.published"
LABELLING_CONFIG_PUBLISHED = "explain-transfer.labelling-config.published"

#: Where published labelling configs go under an output root.
LABELLING_PREFIX = "labelling"


def _emit(event: str, resource: dict[str, str], payload: dict[str, Any]) -> Event | None:
    """``emit_event`` to the configured Prefect API; None (nothing sent) when there is none."""
    if not get_current_settings().api.url:
        logger.info("%s not sent: no Prefect API (PREFECT_API_URL is unset)", event)
        return None
    return emit_event(event=event, resource=resource, payload=payload)


def emit_checkpoint_published(
    uri: str,
    root: str,
    *,
    fingerprint: str,
    domain: str,
    mode: str,
    published_by: str,
) -> Event | None:
    """Announce a checkpoint written under ``root`` (the event a deployment trigger reacts to).

    Returns:
        The event sent, or None when no Prefect API is configured.
    """
    event = _emit(
        CHECKPOINT_PUBLISHED,
        {
            "prefect.resource.id": asset_key(uri),
            "prefect.resource.name": f"{domain}-{mode} {fingerprint}",
            "explain-transfer.domain": domain,
            "explain-transfer.mode": mode,
        },
        {
            "uri": uri,
            "root": root,
            "fingerprint": fingerprint,
            "domain": domain,
            "mode": mode,
            "published_by": published_by,
        },
    )
    if event is not None:
        logger.info("%s %s sent (%s)", CHECKPOINT_PUBLISHED, uri, event.id)
    return event


def publish_model(
    source: str, root: str, domain: str, mode: str = "P", *, emit: bool = True
) -> dict[str, Any]:
    """Copy a checkpoint into ``root``'s model layout and announce it.

    The safetensors file is copied to ``{root}/models/{domain}-{mode}-{fingerprint}/`` with its
    JSON sidecar (written last, with ``domain`` and ``mode`` set), so the pipeline's stages and
    the catalogue read it as they read a fine-tuned model. Then
    ``explain-transfer.checkpoint.published`` is emitted: the ``regenerate-on-publish``
    deployment relabels every X-dataset under ``root`` whose latest version explains a model of
    the same domain and mode.

    Args:
        source: URI of a ``model.safetensors`` with its sidecar ``model.json`` beside it.
        root: the output root (a path or ``s3://`` URI).
        domain: the domain the model was fine-tuned on.
        mode: ``P`` (prediction only) or ``X``.
        emit: send the event (False: copy only).

    Returns:
        ``uri``, ``fingerprint``, ``domain``, ``mode``, ``copied`` (False when that exact
        checkpoint was already there) and ``event_id`` (None when no event was sent).

    Raises:
        ValueError: not a safetensors file, no sidecar, a sidecar of another domain or mode, or
            a sidecar whose ``state_fingerprint`` does not match the tensors.
    """
    import safetensors.torch

    if mode not in ("P", "X"):
        raise ValueError(f"mode must be 'P' or 'X', got {mode!r}")
    src, key = open_file(source)
    if not key.endswith(".safetensors"):
        raise ValueError(f"{source} is not a .safetensors checkpoint")
    if not src.exists(sidecar_key(key)):
        raise ValueError(f"{source} has no sidecar {sidecar_key(key)} beside it")
    data = src.read_bytes(key)
    sidecar = load_sidecar(src, key)
    fingerprint = state_fingerprint(safetensors.torch.load(data))
    if sidecar.get("state_fingerprint", fingerprint) != fingerprint:
        raise ValueError(
            f"{source}: its sidecar describes other tensors ({sidecar['state_fingerprint']}, "
            f"the file holds {fingerprint})"
        )
    for field, value in (("domain", domain), ("mode", mode)):
        if sidecar.get(field, value) != value:
            raise ValueError(f"{source} is a {field} {sidecar[field]!r} model, not {value!r}")
    out = open_storage(root)
    model_key = f"{layout.finetune_key(domain, mode, fingerprint)}/{layout.MODEL_FILE}"
    copied = not (out.exists(model_key) and out.exists(sidecar_key(model_key)))
    if copied:
        out.write_bytes(model_key, data)
        record = {**sidecar, "domain": domain, "mode": mode, "state_fingerprint": fingerprint}
        record.setdefault("published_from", source)
        # The sidecar last: until it exists, nothing reads the checkpoint as complete.
        out.write_json(sidecar_key(model_key), record)
    uri = out.url(model_key)
    event = None
    if emit:
        event = emit_checkpoint_published(
            uri,
            out.uri,
            fingerprint=fingerprint,
            domain=domain,
            mode=mode,
            published_by="publish_model",
        )
    return {
        "uri": uri,
        "fingerprint": fingerprint,
        "domain": domain,
        "mode": mode,
        "copied": copied,
        "event_id": str(event.id) if event else None,
    }


def publish_labelling_config(
    label: LabelConfig | dict[str, Any], root: str, dataset: str, *, emit: bool = True
) -> dict[str, Any]:
    """Store labelling settings for the X-dataset ``dataset`` under ``root`` and announce them.

    Written to ``{root}/labelling/{dataset}-{fingerprint}.json``; the
    ``regenerate-on-publish`` deployment then relabels the latest version of each split of
    ``dataset`` with these settings (a new version; the old one stays).

    Returns:
        ``uri``, ``fingerprint``, ``dataset`` and ``event_id``.
    """
    config = LabelConfig.model_validate(label)
    text = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    fingerprint = hashlib.sha256(text.encode()).hexdigest()[:16]
    out = open_storage(root)
    key = f"{LABELLING_PREFIX}/{dataset}-{fingerprint}.json"
    out.write_json(key, json.loads(text))
    uri = out.url(key)
    event = None
    if emit:
        event = _emit(
            LABELLING_CONFIG_PUBLISHED,
            {
                "prefect.resource.id": asset_key(uri),
                "prefect.resource.name": f"{dataset} labelling {fingerprint}",
            },
            {"uri": uri, "root": out.uri, "dataset": dataset, "fingerprint": fingerprint},
        )
    return {
        "uri": uri,
        "fingerprint": fingerprint,
        "dataset": dataset,
        "event_id": str(event.id) if event else None,
    }

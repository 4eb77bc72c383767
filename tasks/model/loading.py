"""One loader for every checkpoint the pipeline uses: base, fine-tuned (P or X) and target.

A checkpoint is a weights file (safetensors, or a ``torch.save`` state dict) at a URI, or a
fine-tuning run folder holding ``model.safetensors``. When a JSON sidecar sits beside it (every
checkpoint this project writes has one) it supplies what the caller leaves out: the
architecture, the head's class names and prompt templates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from storage import layout, open_file
from storage.checkpoints import load_sidecar, sidecar_key
from storage.uri import join_uri
from tasks.model.clip import load_clip, model_fingerprint
from tasks.model.names import DEFAULT_MODEL, DEFAULT_TEMPLATES
from tasks.model.sem import SelfExplainingCLIP, zero_shot_head

_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


@dataclass
class LoadedModel:
    """A self-explaining CLIP loaded from a checkpoint, with what its sidecar said.

    Attributes:
        sem: the model in eval mode, on the requested device.
        uri: the weights file read (None for a random initialisation).
        sidecar: the checkpoint's sidecar (empty when there is none).
        class_names: the head's classes in label order.
    """

    sem: SelfExplainingCLIP
    uri: str | None
    class_names: list[str]
    sidecar: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """The content fingerprint of the open_clip weights."""
        return self.sidecar.get("fingerprint") or model_fingerprint(self.sem.clip)

    @property
    def base_fingerprint(self) -> str | None:
        """The pretrained base a fine-tuned model started from (None if unknown)."""
        return self.sidecar.get("base_fingerprint")


def weights_uri(uri: str) -> str:
    """The weights file of ``uri``: itself, or ``model.safetensors`` inside a run folder."""
    text = str(uri).rstrip("/")
    if text.endswith(_WEIGHT_SUFFIXES):
        return text
    return join_uri(text, layout.MODEL_FILE)


def read_sidecar(uri: str) -> dict[str, Any]:
    """The sidecar of the checkpoint at ``uri``; empty when it has none."""
    storage, key = open_file(weights_uri(uri))
    return load_sidecar(storage, key) if storage.exists(sidecar_key(key)) else {}


def resolve_class_names(
    class_names: Sequence[str] | None, run_config: dict[str, Any], domain: str | None = None
) -> list[str]:
    """The head's classes: given, else the run's config, else the synthetic domain's.

    Raises:
        ValueError: none of them names the classes.
    """
    if class_names is not None:
        return list(class_names)
    if run_config.get("class_names"):
        return list(run_config["class_names"])
    from tasks.data.synthetic import SYNTHETIC_DOMAINS

    for name in (domain, run_config.get("domain")):
        if name in SYNTHETIC_DOMAINS:
            return list(SYNTHETIC_DOMAINS[name].class_names)
    raise ValueError(
        f"cannot tell the classes of domain {domain or run_config.get('domain')!r}: "
        "it is not a built-in synthetic domain; give its class names"
    )


def load_sem(
    uri: str | None,
    *,
    model_name: str | None = None,
    class_names: Sequence[str] | None = None,
    domain: str | None = None,
    templates: Sequence[str] | None = None,
    grid: tuple[int, int] = (7, 7),
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Load a checkpoint as a :class:`SelfExplainingCLIP` with its domain's zero-shot head.

    Args:
        uri: weights file or run folder (path, ``file://``, ``s3://``); None builds a random
            initialisation, seeded so that every process builds the same weights.
        model_name: open_clip architecture (None: the sidecar's, else the embedded default).
        class_names: the head's classes (None: the sidecar's run config, else ``domain``'s).
        domain: a synthetic domain whose classes to use when none are given.
        templates: prompt templates (None: the run config's, else ``a photo of a {}.``).
        grid: attribution grid ``(gh, gw)``.
        device: where the model goes, and where its text tower computes the head.

    Raises:
        ValueError: unknown architecture, unknown classes, weights that do not fit, or weights
            trained with another activation than the architecture's.
    """
    file_uri = weights_uri(uri) if uri else None
    sidecar = read_sidecar(file_uri) if file_uri else {}
    run_config = sidecar.get("config") or {}
    name = model_name or run_config.get("model_name") or sidecar.get("model_name") or DEFAULT_MODEL
    names = resolve_class_names(class_names, run_config, domain)
    prompts = tuple(templates or run_config.get("templates") or DEFAULT_TEMPLATES)
    if file_uri is None:
        # A random initialisation must not depend on what the process drew before: a shard
        # worker (a retry, a Dask process) has to rebuild the very model the plan fingerprinted.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            clip_model = load_clip(name, None)
    else:
        clip_model = load_clip(name, file_uri)
    # The text tower runs on the target device: a large head (ImageNet's 4,000 prompts) costs
    # minutes of a CPU per process and well under a second of a GPU.
    clip_model = clip_model.to(device)
    head = zero_shot_head(clip_model, names, prompts, model_name=name)
    sem = SelfExplainingCLIP(clip_model, head, grid=tuple(grid)).to(device).eval()
    return LoadedModel(sem=sem, uri=file_uri, class_names=names, sidecar=sidecar)

"""open_clip models built from the project's architecture configs, weights read through storage.

Model architectures are data (``model_configs/*.json``, registered with open_clip); weights come
from a local file or an object-store URI, never from a hub.

The MLP activation is part of a model's identity: OpenAI's CLIP weights (and a few others) were
trained with QuickGELU, and in a model built with ``nn.GELU`` they load without a complaint and
compute something else. open_clip states the activation in the architecture (``quick_gelu`` in
the config, ``-quickgelu`` names such as ``ViT-B-32-quickgelu``); the project records it in each
checkpoint's sidecar (:func:`checkpoint_metadata`) and :func:`load_clip` refuses weights whose
activation differs from the architecture's.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import open_clip
from open_clip.transformer import QuickGELU
from torch import nn

from storage import open_file
from storage.checkpoints import load_sidecar, load_state_dict, sidecar_key, state_fingerprint
from tasks.model.names import (  # re-exported: the names live where no torch is imported
    DEFAULT_MODEL,
    MODEL_CONFIG_DIR,
    available_models,
    model_activation,
    model_config,
)

logger = logging.getLogger(__name__)

ACTIVATIONS = ("gelu", "quick_gelu")
QUICKGELU_SUFFIX = "-quickgelu"

_registered = False


class _DropMessage(logging.Filter):
    """Drops log records whose message contains ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def register_model_configs() -> None:
    """Make the project's model configs (``tasks/model/model_configs/*.json``) known to open_clip.

    Idempotent: open_clip appends every added path to its search list, so this registers once.
    """
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


# Whoever imports open_clip through this module can build the project's architectures by name
# (``open_clip.create_model("tiny-vit-56")``), as before the names moved to tasks.model.names.
register_model_configs()


def clip_activation(clip_model: nn.Module) -> str:
    """The activation a built model computes with: ``gelu`` or ``quick_gelu``.

    Read from the modules themselves, so it is what the weights will meet, whatever config or
    override built the model.
    """
    kinds: set[str] = set()
    for module in clip_model.modules():
        if isinstance(module, QuickGELU):
            kinds.add("quick_gelu")
        elif isinstance(module, nn.GELU):
            kinds.add("gelu" if module.approximate == "none" else f"gelu_{module.approximate}")
    return "+".join(sorted(kinds)) or "none"


def checkpoint_metadata(clip_model: nn.Module, model_name: str) -> dict[str, str]:
    """What a checkpoint's sidecar says about its architecture: ``model_name`` and ``activation``.

    Every writer of open_clip weights merges this into its sidecar metadata, so that a loader
    can refuse the weights in a model with another activation.
    """
    return {"model_name": model_name, "activation": clip_activation(clip_model)}


def weights_activation(
    key: str, sidecar: Mapping[str, Any], model_name: str | None = None
) -> tuple[str | None, str]:
    """The activation weights were trained with, and how that is known.

    In order: the sidecar's ``activation``; the architecture its sidecar names (``model_name``,
    or the run config's); open_clip's naming of the file (``quickgelu`` in the name, or a
    pretrained tag of ``model_name``'s family such as ``openai``, whose configs say which
    activation they were trained with).

    Args:
        key: the weights' file name or key (only its last part is read).
        sidecar: the weights' sidecar (empty when there is none).
        model_name: the architecture the weights are meant for, whose pretrained tags to match.

    Returns:
        ``(activation, how)``; ``activation`` is None when none of these tell.

    Raises:
        ValueError: the sidecar's ``activation`` is not a string.
    """
    recorded = sidecar.get("activation")
    if recorded is not None:
        if not isinstance(recorded, str):
            raise ValueError(f"sidecar activation {recorded!r} of {key} is not a string")
        return recorded, "its sidecar's activation"
    config = sidecar.get("config")
    for name in (sidecar.get("model_name"), config.get("model_name") if config else None):
        if isinstance(name, str) and name in available_models():
            return model_activation(name), f"its sidecar's model_name {name!r}"
    stem = re.sub(r"\.(safetensors|pt|pth|bin)$", "", key.rsplit("/", 1)[-1].lower())
    if _has_token(stem, QUICKGELU_SUFFIX[1:]):
        return "quick_gelu", f"{QUICKGELU_SUFFIX[1:]!r} in its file name"
    if model_name is not None:
        tags = _pretrained_activations(model_name)
        found = {tags[tag] for tag in tags if _has_token(stem, tag)}
        if len(found) == 1:
            matched = max((tag for tag in tags if _has_token(stem, tag)), key=len)
            return found.pop(), f"open_clip's pretrained tag {matched!r} in its file name"
    return None, "no sidecar activation, no model_name, no known pretrained tag in its file name"


def _has_token(stem: str, token: str) -> bool:
    return re.search(rf"(^|[^a-z0-9]){re.escape(token.lower())}([^a-z0-9]|$)", stem) is not None


def _pretrained_activations(model_name: str) -> dict[str, str]:
    """open_clip's pretrained tags of ``model_name`` and its ``-quickgelu`` twin -> activation."""
    family = model_name.removesuffix(QUICKGELU_SUFFIX)
    tags: dict[str, str] = {}
    for name in (family, family + QUICKGELU_SUFFIX):
        for tag in open_clip.list_pretrained_tags_by_model(name):
            quick = open_clip.get_pretrained_cfg(name, tag).get("quick_gelu", False)
            tags[tag] = "quick_gelu" if quick else "gelu"
    return tags


def _twin(model_name: str, activation: str) -> str | None:
    """The architecture that differs from ``model_name`` by its activation only, if any."""
    family = model_name.removesuffix(QUICKGELU_SUFFIX)
    for name in (family, family + QUICKGELU_SUFFIX):
        if name in available_models() and model_activation(name) == activation:
            return name
    return None


def check_activation(
    clip_model: nn.Module, model_name: str, key: str, sidecar: Mapping[str, Any], where: str
) -> None:
    """Refuse weights whose recorded activation differs from the built model's.

    Weights that do not tell (no sidecar information, no open_clip name) are loaded as the
    architecture says, with a warning naming the ways to state it.

    Args:
        clip_model: the model built for ``model_name``.
        model_name: its architecture.
        key: the weights' file name or key.
        sidecar: the weights' sidecar (empty when there is none).
        where: the weights' URI, for messages.

    Raises:
        ValueError: the weights were trained with another activation than the model's.
    """
    built = clip_activation(clip_model)
    recorded, how = weights_activation(key, sidecar, model_name)
    if recorded is None:
        if not model_name.endswith(QUICKGELU_SUFFIX):
            twin = _twin(model_name, "quick_gelu")
            logger.warning(
                "cannot tell which activation the weights %s were trained with (%s): loading "
                "them with %s's %s; QuickGELU weights (OpenAI's among them) need %s, or a "
                "sidecar %s with an 'activation'",
                where,
                how,
                model_name,
                built,
                f"model_name {twin!r}" if twin else "a quick_gelu architecture",
                sidecar_key(key).rsplit("/", 1)[-1],
            )
        return
    if recorded != built:
        twin = _twin(model_name, recorded)
        hint = f"use model_name {twin!r}" if twin else f"use an architecture built with {recorded}"
        raise ValueError(
            f"weights {where} were trained with {recorded} ({how}) but model {model_name!r} "
            f"computes with {built}; {hint}"
        )


def load_clip(model_name: str = DEFAULT_MODEL, pretrained: str | None = None) -> nn.Module:
    """Build an open_clip model and, optionally, load its weights from a storage URI.

    No weights are ever fetched from a hub: ``pretrained`` is a local path, ``file://`` or
    ``s3://`` URI of a safetensors file or of a ``torch.save`` state dict (``.pt``/``.bin``/
    ``.pth``, loaded with ``weights_only=True``), read through :mod:`storage`. The weights'
    activation (:func:`weights_activation`) must be the model's (:func:`check_activation`).

    Args:
        model_name: an open_clip architecture name (``tasks/model/model_configs`` included).
        pretrained: URI of the weights, or None for a random initialisation.

    Returns:
        The open_clip model in eval mode, on CPU.

    Raises:
        ValueError: the architecture is unknown (the message lists the known ones), or the
            weights were trained with another activation.
    """
    _check_known(model_name)
    # open_clip warns on the root logger that no weights were loaded: true, and expected here,
    # since weights come from storage below (or a random init is asked for).
    quiet = _DropMessage("No pretrained weights loaded")
    logging.getLogger().addFilter(quiet)
    try:
        model = open_clip.create_model(model_name, pretrained=None)
    finally:
        logging.getLogger().removeFilter(quiet)
    if pretrained:
        storage, key = open_file(pretrained)
        sidecar = load_sidecar(storage, key) if storage.exists(sidecar_key(key)) else {}
        check_activation(model, model_name, key, sidecar, str(pretrained))
        # storage unwraps {"state_dict": ...} checkpoints and DataParallel's "module." prefix.
        state = load_state_dict(storage, key)
        if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
            state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
        model.load_state_dict(state, strict=True)
        logger.info("loaded %s weights from %s", model_name, pretrained)
    return model.eval()


def model_fingerprint(clip_model: nn.Module) -> str:
    """Content fingerprint of an open_clip model's state dict (identifies a checkpoint)."""
    return state_fingerprint(clip_model.state_dict())


def _check_known(model_name: str) -> None:
    model_config(model_name)  # raises ValueError naming the known ones

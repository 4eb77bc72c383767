"""open_clip models built from the project's architecture configs, weights read through storage.

Model architectures are data (``model_configs/*.json``, registered with open_clip); weights come
from a local file or an object-store URI, never from a hub.
"""

from __future__ import annotations

import logging
from pathlib import Path

import open_clip
from torch import nn

from storage import open_file
from storage.checkpoints import load_state_dict, state_fingerprint

logger = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
DEFAULT_MODEL = "tiny-vit-56"

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


def available_models() -> list[str]:
    """Names of every architecture open_clip can build here (its own and the project's)."""
    register_model_configs()
    return open_clip.list_models()


def load_clip(model_name: str = DEFAULT_MODEL, pretrained: str | None = None) -> nn.Module:
    """Build an open_clip model and, optionally, load its weights from a storage URI.

    No weights are ever fetched from a hub: ``pretrained`` is a local path, ``file://`` or
    ``s3://`` URI of a safetensors file or of a ``torch.save`` state dict (``.pt``/``.bin``/
    ``.pth``, loaded with ``weights_only=True``), read through :mod:`storage`.

    Args:
        model_name: an open_clip architecture name (``tasks/model/model_configs`` included).
        pretrained: URI of the weights, or None for a random initialisation.

    Returns:
        The open_clip model in eval mode, on CPU.

    Raises:
        ValueError: the architecture is unknown (the message lists the known ones).
    """
    names = available_models()
    if model_name not in names:
        raise ValueError(f"unknown model {model_name!r}; available: {', '.join(names)}")
    # open_clip warns on the root logger that no weights were loaded: true, and expected here,
    # since weights come from storage below (or a random init is asked for).
    quiet = _DropMessage("No pretrained weights loaded")
    logging.getLogger().addFilter(quiet)
    try:
        model = open_clip.create_model(model_name, pretrained=None)
    finally:
        logging.getLogger().removeFilter(quiet)
    if pretrained:
        # storage unwraps {"state_dict": ...} checkpoints and DataParallel's "module." prefix.
        state = load_state_dict(*open_file(pretrained))
        if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
            state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
        model.load_state_dict(state, strict=True)
        logger.info("loaded %s weights from %s", model_name, pretrained)
    return model.eval()


def model_fingerprint(clip_model: nn.Module) -> str:
    """Content fingerprint of an open_clip model's state dict (identifies a checkpoint)."""
    return state_fingerprint(clip_model.state_dict())


def model_image_size(model_name: str) -> int:
    """The input image size (pixels per side) of an open_clip architecture, without building it.

    Raises:
        ValueError: the architecture is unknown.
    """
    names = available_models()
    if model_name not in names:
        raise ValueError(f"unknown model {model_name!r}; available: {', '.join(names)}")
    size = open_clip.get_model_config(model_name)["vision_cfg"]["image_size"]
    return int(size[0] if isinstance(size, (list, tuple)) else size)

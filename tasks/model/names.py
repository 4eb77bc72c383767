"""Architectures by name, read from open_clip's and the project's config files alone.

What a config check needs to know about a model (that it exists, its input size, its
activation) is in its JSON file. Reading the files here, without importing open_clip (which
imports torch, seconds), lets the command line judge ``--model`` and ``--image-size`` before
anything heavy starts. The files and the rules are open_clip's (``open_clip.factory``): every
``*.json`` of its ``model_configs/`` folder and of the project's that has ``embed_dim``,
``vision_cfg`` and ``text_cfg``, the project's taking precedence, sorted in open_clip's natural
order; :mod:`tasks.model.clip` registers the same folder with open_clip, so both agree. Once
open_clip is imported, architectures registered with it at run time
(``open_clip.add_model_config``) count too.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
DEFAULT_MODEL = "tiny-vit-56"
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)

_REQUIRED = ("embed_dim", "vision_cfg", "text_cfg")


def _natural_key(name: str) -> list[int | str]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name.lower())]


def _open_clip_config_dir() -> Path | None:
    spec = importlib.util.find_spec("open_clip")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "model_configs"


@functools.cache
def _configs() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for folder in (_open_clip_config_dir(), MODEL_CONFIG_DIR):
        if folder is None or not folder.is_dir():
            continue
        for path in folder.glob("*.json"):
            config = json.loads(path.read_text(encoding="utf-8"))
            if all(field in config for field in _REQUIRED):
                found[path.stem] = config
    return dict(sorted(found.items(), key=lambda item: _natural_key(item[0])))


def _registered() -> set[str]:
    """Architectures open_clip knows at run time, when it is already imported (else none)."""
    open_clip = sys.modules.get("open_clip")
    return set(open_clip.list_models()) if open_clip is not None else set()


def available_models() -> list[str]:
    """Names of every architecture open_clip can build here (its own and the project's)."""
    return sorted(set(_configs()) | _registered(), key=_natural_key)


def model_config(model_name: str) -> dict[str, Any]:
    """An architecture's open_clip config (a copy).

    Raises:
        ValueError: the architecture is unknown.
    """
    configs = _configs()
    if model_name in configs:
        return copy.deepcopy(configs[model_name])
    if model_name in _registered():
        return sys.modules["open_clip"].get_model_config(model_name)
    raise ValueError(f"unknown model {model_name!r}; available: {', '.join(available_models())}")


def model_image_size(model_name: str) -> int:
    """The input image size (pixels per side) of an open_clip architecture, without building it.

    Raises:
        ValueError: the architecture is unknown.
    """
    size = model_config(model_name)["vision_cfg"]["image_size"]
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def model_activation(model_name: str) -> str:
    """The activation an open_clip architecture is built with, from its config alone.

    Raises:
        ValueError: the architecture is unknown.
    """
    return "quick_gelu" if model_config(model_name).get("quick_gelu") else "gelu"

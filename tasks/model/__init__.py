"""The model: open_clip loading, the ViT token helpers, the self-explaining CLIP and its loader.

- :mod:`tasks.model.clip`: architectures as data (``model_configs/``), weights from storage.
- :mod:`tasks.model.vit`: the open_clip ViT split at the patch embedding (token masking).
- :mod:`tasks.model.sem`: :class:`SelfExplainingCLIP`, its zero-shot head and classifier view.
- :mod:`tasks.model.loading`: one loader for base, fine-tuned and target checkpoints.
"""

from tasks.model.clip import (
    DEFAULT_MODEL,
    MODEL_CONFIG_DIR,
    available_models,
    load_clip,
    model_fingerprint,
    model_image_size,
    register_model_configs,
)
from tasks.model.loading import LoadedModel, load_sem
from tasks.model.sem import (
    DEFAULT_TEMPLATES,
    SelfExplainingCLIP,
    SEMClassifier,
    standardize_per_image,
    zero_shot_head,
)
from tasks.model.vit import OpenCLIPClassifier

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_TEMPLATES",
    "LoadedModel",
    "MODEL_CONFIG_DIR",
    "OpenCLIPClassifier",
    "SEMClassifier",
    "SelfExplainingCLIP",
    "available_models",
    "load_clip",
    "load_sem",
    "model_fingerprint",
    "model_image_size",
    "register_model_configs",
    "standardize_per_image",
    "zero_shot_head",
]

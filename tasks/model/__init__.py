"""The model: open_clip loading, the ViT token helpers, the self-explaining CLIP and its loader.

- :mod:`tasks.model.names`: architectures by name, from their config files (no torch).
- :mod:`tasks.model.clip`: architectures as data (``model_configs/``), weights from storage.
- :mod:`tasks.model.vit`: the open_clip ViT split at the patch embedding (token masking).
- :mod:`tasks.model.sem`: :class:`SelfExplainingCLIP`, its zero-shot head and classifier view.
- :mod:`tasks.model.loading`: one loader for base, fine-tuned and target checkpoints.
"""

from tasks.lazy import lazy_exports

# Each name is imported from its module on first use, so that importing one light module
# of the package (a config) does not import the heavy ones (torch, open_clip).
_EXPORTS = {
    "available_models": "tasks.model.names",
    "DEFAULT_MODEL": "tasks.model.names",
    "DEFAULT_TEMPLATES": "tasks.model.names",
    "load_clip": "tasks.model.clip",
    "load_sem": "tasks.model.loading",
    "LoadedModel": "tasks.model.loading",
    "MODEL_CONFIG_DIR": "tasks.model.names",
    "model_fingerprint": "tasks.model.clip",
    "model_image_size": "tasks.model.names",
    "OpenCLIPClassifier": "tasks.model.vit",
    "register_model_configs": "tasks.model.clip",
    "SelfExplainingCLIP": "tasks.model.sem",
    "SEMClassifier": "tasks.model.sem",
    "standardize_per_image": "tasks.model.sem",
    "zero_shot_head": "tasks.model.sem",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

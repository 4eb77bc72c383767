"""Stage 1: build an explanation dataset (an "X-dataset") with Kernel SHAP labels.

- :mod:`tasks.build_dataset.config`: :class:`BuildConfig` and :class:`LabelConfig`.
- :mod:`tasks.build_dataset.inputs`: the sorted input listing, its split into output shards,
  and reading a shard's inputs through :mod:`tasks.data.readers`.
- :mod:`tasks.build_dataset.stage`: plan, label one shard, finalize (the three steps a flow
  fans out), and the progress of a running build.
"""

from tasks.lazy import lazy_exports

# Each name is imported from its module on first use, so that importing one light module
# of the package (a config) does not import the heavy ones (torch, open_clip).
_EXPORTS = {
    "BuildConfig": "tasks.build_dataset.config",
    "BuildPlan": "tasks.build_dataset.stage",
    "BuildProgress": "tasks.build_dataset.stage",
    "clear_model_cache": "tasks.build_dataset.stage",
    "explained_model_fingerprint": "tasks.build_dataset.stage",
    "finalize_build": "tasks.build_dataset.stage",
    "InputKind": "tasks.build_dataset.config",
    "iter_units": "tasks.build_dataset.inputs",
    "label_samples": "tasks.build_dataset.stage",
    "label_shard": "tasks.build_dataset.stage",
    "LabelConfig": "tasks.build_dataset.config",
    "list_input": "tasks.build_dataset.inputs",
    "load_explained_model": "tasks.build_dataset.stage",
    "plan_build": "tasks.build_dataset.stage",
    "resolve_samples": "tasks.build_dataset.resolve",
    "ShardOutcome": "tasks.build_dataset.stage",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

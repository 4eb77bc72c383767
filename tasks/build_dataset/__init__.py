"""Stage 1: build an explanation dataset (an "X-dataset") with Kernel SHAP labels.

- :mod:`tasks.build_dataset.config`: :class:`BuildConfig` and :class:`LabelConfig`.
- :mod:`tasks.build_dataset.inputs`: the sorted input listing, its split into output shards,
  and reading a shard's inputs through :mod:`tasks.data.readers`.
- :mod:`tasks.build_dataset.stage`: plan, label one shard, finalize (the three steps a flow
  fans out), and the progress of a running build.
"""

from tasks.build_dataset.config import BuildConfig, InputKind, LabelConfig
from tasks.build_dataset.inputs import iter_units, list_input
from tasks.build_dataset.stage import (
    BuildPlan,
    BuildProgress,
    ShardOutcome,
    clear_model_cache,
    explained_model_fingerprint,
    finalize_build,
    label_samples,
    label_shard,
    load_explained_model,
    plan_build,
)

__all__ = [
    "BuildConfig",
    "BuildPlan",
    "BuildProgress",
    "InputKind",
    "LabelConfig",
    "ShardOutcome",
    "clear_model_cache",
    "explained_model_fingerprint",
    "finalize_build",
    "iter_units",
    "label_samples",
    "label_shard",
    "list_input",
    "load_explained_model",
    "plan_build",
]

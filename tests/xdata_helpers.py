"""A small synthetic X-dataset built the way the build flow builds one, for the game tests."""

from __future__ import annotations

from tasks.build_dataset import (
    BuildConfig,
    BuildPlan,
    LabelConfig,
    clear_model_cache,
    finalize_build,
    label_shard,
    plan_build,
)


def build_small_xdata(root: str, label: LabelConfig, checkpoint: str | None = None) -> BuildPlan:
    """10 ``shapes`` val images (2 per class) labelled with ``label`` in 2 shards under ``root``
    (by the model at ``checkpoint``, or the build's default)."""
    config = BuildConfig(
        name="shapes-x",
        split="val",
        input_kind="synthetic",
        input_uri="shapes",
        synthetic_per_class=2,
        output_uri=root,
        num_shards=2,
        device="cpu",
        label=label,
        checkpoint=checkpoint,
    )
    clear_model_cache()
    plan = plan_build(config)
    for index in range(config.num_shards):
        label_shard(plan, index)
    finalize_build(plan)
    return plan

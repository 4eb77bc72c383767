"""Scenario 6: the same config and seed give the same labels and manifest, run after run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from reliability_helpers import build_config, dataset_samples, shap_of

import tasks.build_dataset
from storage import open_storage
from storage.shards import read_manifest
from tasks.build_dataset import BuildConfig, LabelConfig, finalize_build, label_shard, plan_build


def _build(config: BuildConfig) -> tuple[str, list[str], dict[str, bytes]]:
    """Run a build from a cold model cache; return version, shard sha256s and labels by key."""
    # Each run rebuilds the explained model after drawing from the global RNG, as a fresh
    # worker process that did other work first would.
    tasks.build_dataset.clear_model_cache()
    torch.rand(1000)
    plan = plan_build(config)
    for index in reversed(range(config.num_shards)):  # order of shard work must not matter
        label_shard(plan, index)
    finalize_build(plan)
    dataset = open_storage(plan.dataset_uri)
    shas = read_manifest(dataset).column("sha256").to_pylist()
    labels = {s["__key__"]: s["shap.npy"] for s in dataset_samples(dataset, "shapes-x", "val")}
    return plan.version, shas, labels


def test_same_config_and_seed_reproduce_labels_and_manifest(tmp_path: Path) -> None:
    first = _build(build_config(str(tmp_path / "a")))
    second = _build(build_config(str(tmp_path / "b")))
    assert first[0] == second[0]  # same version
    assert first[1] == second[1] and len(first[1]) == 2  # same shard bytes
    assert first[2] == second[2] and len(first[2]) == 10  # same labels, byte for byte

    # The seed matters where the design samples: budget 40 draws 19 pairs of coalitions of 9
    # players at random, so another seed gives another version and other labels.
    def sampled(seed: int, folder: str):
        label = LabelConfig(grid_h=3, grid_w=3, budget=40, images_per_batch=2, seed=seed)
        return _build(build_config(str(tmp_path / folder), label=label))

    base, other = sampled(0, "c"), sampled(1, "d")
    assert other[0] != base[0] != first[0]
    assert any(
        not np.array_equal(shap_of({"shap.npy": other[2][k]}), shap_of({"shap.npy": v}))
        for k, v in base[2].items()
    )

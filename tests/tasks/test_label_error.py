"""X-dataset builds with the default sampler, the shap sampler, and the per-image error estimate."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from storage import open_storage
from storage.shards import complete_shards
from tasks.build_dataset import BuildConfig, LabelConfig, finalize_build, label_shard, plan_build


def _config(out: Path, **label) -> BuildConfig:
    return BuildConfig(
        name="shapes-x",
        split="val",
        input_kind="synthetic",
        input_uri="shapes",
        synthetic_per_class=1,
        output_uri=str(out),
        num_shards=1,
        device="cpu",
        label=LabelConfig(grid_h=3, grid_w=3, budget=24, images_per_batch=4, **label),
    )


def _samples(dataset_uri: str) -> list[dict]:
    dataset = open_storage(dataset_uri)
    (shard,) = complete_shards(dataset, "shapes-x", "val")
    return list(wds.WebDataset(str(Path(dataset_uri) / shard), shardshuffle=False))


def test_label_config_defaults_to_leverage_and_the_sampler_is_part_of_the_version(tmp_path):
    assert LabelConfig().sampler == "leverage" and LabelConfig().error_estimate is False
    versions = {
        plan_build(_config(tmp_path, **label)).version
        for label in ({}, {"sampler": "kernel"}, {"error_estimate": True})
    }
    assert len(versions) == 3
    with pytest.raises(ValueError):
        LabelConfig(sampler="kernel", error_estimate=True)


def test_error_estimate_is_stored_beside_the_labels_and_summarised(tmp_path):
    plan = plan_build(_config(tmp_path, error_estimate=True))
    label_shard(plan, 0)
    summary = finalize_build(plan)
    samples = _samples(plan.dataset_uri)
    assert samples
    errors = []
    for sample in samples:
        phi = np.load(io.BytesIO(sample["shap.npy"]))
        err = np.load(io.BytesIO(sample["shap_err.npy"]))
        assert err.shape == phi.shape and err.dtype == np.float32 and (err >= 0).all()
        meta = json.loads(sample["json"])
        assert meta["sampler"] == "leverage" and len(meta["relative_error"]) == len(phi)
        np.testing.assert_allclose(
            meta["relative_error"][0],
            np.linalg.norm(err[0]) / np.linalg.norm(phi[0]),
            rtol=1e-4,
        )
        errors.append(meta["relative_error"][0])
    label_error = summary["label_error"]
    assert label_error["images"] == len(samples)
    assert label_error["mean"] == pytest.approx(np.mean(errors))
    # without the flag, no error field and no summary entry
    plain = plan_build(_config(tmp_path / "plain"))
    label_shard(plain, 0)
    assert "label_error" not in finalize_build(plain)
    assert all("shap_err.npy" not in s for s in _samples(plain.dataset_uri))

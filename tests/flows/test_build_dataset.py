"""The explanation-dataset flow on a real Prefect API, local folder and loopback S3."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from prefect.artifacts import Artifact

from flows.build_dataset import build_explanation_dataset
from storage import open_storage
from tasks.build_dataset import BuildConfig, LabelConfig
from tasks.data.synthetic import split_length


def _config(output_uri: str, **changes) -> BuildConfig:
    fields = dict(
        name="shapes-x",
        split="val",
        input_kind="synthetic",
        input_uri="shapes",
        synthetic_per_class=2,
        output_uri=output_uri,
        num_shards=2,
        # 3x3 cells over a 7x7-token ViT: pixel masking; small budget to stay fast.
        label=LabelConfig(grid_h=3, grid_w=3, budget=40, images_per_batch=8),
    )
    fields.update(changes)
    return BuildConfig(**fields)


def _read_local_tars(folder: Path) -> list[dict]:
    urls = sorted(str(p) for p in folder.glob("*.tar"))
    return list(wds.WebDataset(urls, shardshuffle=False))


def test_flow_builds_versioned_dataset_and_rerun_fills_only_missing(tmp_path: Path) -> None:
    config = _config(str(tmp_path))
    summary = build_explanation_dataset(config)
    inputs = split_length("shapes", "val", 2)
    assert summary["missing"] == [] and summary["samples"] == inputs == summary["inputs"]

    folder = Path(summary["dataset_uri"])
    assert folder.parent == tmp_path / "shapes-x" and folder.name.startswith("v-")
    samples = _read_local_tars(folder)
    assert sorted(s["__key__"] for s in samples) == [f"shapes-val-{i:06d}" for i in range(inputs)]
    for sample in samples:
        phi = np.load(io.BytesIO(sample["shap.npy"]))
        meta = json.loads(sample["json"])
        assert phi.dtype == np.float32 and phi.shape[1:] == (3, 3)
        assert meta["classes"][0] == int(sample["cls"]) and len(meta["classes"]) == phi.shape[0]
        # Efficiency: the attributions sum to v(full) - v(empty) for every explained class.
        np.testing.assert_allclose(
            phi.reshape(phi.shape[0], -1).sum(1),
            np.array(meta["v_full"]) - np.array(meta["v_empty"]),
            rtol=1e-4,
            atol=1e-4,
        )
        assert meta["budget"] == 40 and meta["grid"] == [3, 3] and meta["model"]
    manifest = open_storage(str(folder)).read_parquet("manifest.parquet")
    assert manifest.num_rows == 2 and sum(manifest.column("samples").to_pylist()) == inputs

    # A rerun with the same config writes nothing: the shards keep their bytes and mtimes.
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.tar")}
    again = build_explanation_dataset(config)
    assert again["version"] == summary["version"]
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.tar")} == before

    # A lost shard is the only one relabelled, with identical bytes (seeded per image).
    lost = folder / "shapes-x-val-000001.tar"
    original = lost.read_bytes()
    lost.unlink()
    (folder / "_completions" / "shapes-x-val-000001.tar.json").unlink()
    build_explanation_dataset(config)
    assert lost.read_bytes() == original
    assert (folder / "shapes-x-val-000000.tar").stat().st_mtime_ns == before[
        "shapes-x-val-000000.tar"
    ]

    # A changed labelling config makes a new version and leaves the old one alone.
    changed = build_explanation_dataset(
        _config(str(tmp_path), label=LabelConfig(grid_h=3, grid_w=3, budget=30))
    )
    assert changed["version"] != summary["version"]
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.tar")}.keys() == before.keys()


def test_flow_publishes_summary_artifact(tmp_path: Path) -> None:
    summary = build_explanation_dataset(_config(str(tmp_path), name="glyphs-x", input_uri="glyphs"))
    artifact = Artifact.get("x-dataset-glyphs-x-val")
    assert artifact is not None and artifact.type == "markdown"
    assert summary["version"] in artifact.data and "glyphs-x-val-000001.tar" in artifact.data


def test_flow_on_s3_endpoint(s3_env, tmp_path: Path) -> None:
    summary = build_explanation_dataset(_config(s3_env.uri("xdata")))
    assert summary["dataset_uri"].startswith(f"s3://{s3_env.bucket}/xdata/shapes-x/v-")
    dataset = open_storage(summary["dataset_uri"])
    keys = dataset.list()
    assert "manifest.parquet" in keys and "config.json" in keys
    for shard in summary["complete"]:
        dataset.download_file(shard, tmp_path / shard)
    samples = _read_local_tars(tmp_path)
    assert len(samples) == summary["inputs"]


def test_flow_hands_tasks_and_subflow_a_plan_without_the_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What Prefect and Dask serialise per task submit stays small whatever the input's size."""
    import cloudpickle
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    import flows.build_dataset as module

    submitted = []
    original = module._submit_tasks

    def recording(plan, tasks, overwrite, gpu):
        submitted.append(plan)
        return original(plan, tasks, overwrite, gpu)

    monkeypatch.setattr(module, "_submit_tasks", recording)
    config = _config(str(tmp_path), name="params-x", synthetic_per_class=4)
    summary = build_explanation_dataset(config)
    assert summary["missing"] == [] and summary["samples"] == 20
    (plan,) = submitted
    assert "units" not in plan and len(cloudpickle.dumps(plan)) < 4096
    assert all(f"shapes-val-{i:06d}" not in json.dumps(plan) for i in range(20))
    with get_client(sync_client=True) as client:
        (subflow,) = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                name=FlowRunFilterName(any_=["label-shards-params-x-val"])
            )
        )
    assert len(json.dumps(subflow.parameters)) < 4096


def test_budget_not_above_players_is_refused_before_compute() -> None:
    with pytest.raises(ValueError, match="budget 40 is not larger than the number of players 49"):
        LabelConfig(budget=40)

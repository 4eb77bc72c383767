"""Scenario 1: a worker SIGKILLed midway loses nothing and leaves nothing a reader could use."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from reliability_helpers import aws_env, build_config, dataset_samples, plan_file, run_worker

from storage import open_storage
from storage.checkpoints import load_sidecar
from storage.shards import complete_shards, read_manifest
from tasks.build_dataset import finalize_build, label_shard, plan_build
from tasks.data.export import export_synthetic_domain
from tasks.finetune import FinetuneConfig, finetune


# Each target gets the kill point that matters most for it: mid-shard (a half-written local
# tar) and between upload and marker (an object in the bucket that no marker vouches for).
@pytest.fixture(
    params=[("local", "--kill-after-batches=1"), ("s3", "--kill-before-marker")],
    ids=["local-mid-shard", "s3-before-marker"],
)
def target(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, str], str]:
    """An output URI, the environment a worker needs to reach it, and where the worker dies."""
    kind, kill = request.param
    if kind == "local":
        return str(tmp_path / "out"), {}, kill
    s3 = request.getfixturevalue("faulty_s3")
    return s3.uri("out"), aws_env(s3.server.endpoint_url), kill


def test_killed_labelling_worker_leaves_no_partial_shard_and_rerun_completes(
    target: tuple[str, dict[str, str], str], tmp_path: Path
) -> None:
    output_uri, env, kill = target
    scratch = tmp_path / "worker-tmp"
    scratch.mkdir()
    env = {**env, "TMPDIR": str(scratch)}
    # 10 inputs, 5 per shard, 2 images per batch: 3 batches per shard.
    plan = plan_build(build_config(output_uri))
    dataset = open_storage(plan.dataset_uri)
    shard0, shard1 = plan.shard_key(0), plan.shard_key(1)
    assert label_shard(plan, 0).samples == 5

    assert run_worker(["label", plan_file(tmp_path, plan.to_dict()), "1", kill], env) == -9
    if kill == "--kill-before-marker":
        assert dataset.exists(shard1)  # uploaded, but no marker vouches for it
    else:
        [partial] = scratch.rglob(f"{shard1}.*.partial")
        assert partial.stat().st_size > 0  # the worker died with the shard half written
        assert not dataset.exists(shard1)

    # While the worker is dead, a reader sees the complete shard and nothing of the other.
    assert complete_shards(dataset, "shapes-x", "val") == [shard0]
    before = [sample["__key__"] for sample in dataset_samples(dataset, "shapes-x", "val")]
    assert before == [f"shapes-val-{i:06d}" for i in range(5)]

    outcomes = [label_shard(plan, index) for index in range(2)]
    assert [o.skipped for o in outcomes] == [True, False]
    summary = finalize_build(plan)
    samples = dataset_samples(dataset, "shapes-x", "val")
    keys = [sample["__key__"] for sample in samples]
    assert len(keys) == len(set(keys)) == len(plan.units) == summary["samples"] == 10
    assert sorted(keys) == [f"shapes-val-{i:06d}" for i in range(10)]
    assert all("shap.npy" in sample for sample in samples)
    manifest = read_manifest(dataset)
    assert manifest.column("name").to_pylist() == [shard0, shard1]
    assert sum(manifest.column("samples").to_pylist()) == 10
    assert summary["missing"] == []


@pytest.mark.slow
def test_killed_finetune_resumes_from_its_checkpoint_to_the_same_weights(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = str(tmp_path / "data")
    export_synthetic_domain(data, "shapes", splits=("train",), per_class=2, samples_per_shard=4)
    # 10 samples, batch 4: 3 steps per epoch, 6 in all; checkpoints at steps 2, 3, 4 and 6.
    config = FinetuneConfig(
        domain="shapes",
        mode="P",
        data=data,
        epochs=2,
        batch_size=4,
        lr=5e-4,
        checkpoint_every=2,
        device="cpu",
    )
    reference = finetune(config, open_storage(str(tmp_path / "reference")), "run")

    config_json = tmp_path / "finetune.json"
    config_json.write_text(config.model_dump_json())
    crashed_uri = str(tmp_path / "crashed")
    args = ["finetune", str(config_json), crashed_uri, "run", "--kill-at-step", "5"]
    assert run_worker(args, {}) == -9
    crashed = open_storage(crashed_uri).child("run")
    assert not crashed.exists("model.safetensors") and not crashed.is_complete("model")
    assert load_sidecar(crashed, "last.safetensors")["step"] == 4

    steps: list[int] = []
    caplog.set_level(logging.INFO, logger="tasks.finetune")
    resumed = finetune(
        config, open_storage(crashed_uri), "run", progress=lambda step, total: steps.append(step)
    )
    assert "resuming at step 4" in caplog.text
    assert steps == [5, 6]
    assert resumed["steps"] == reference["steps"] == 6
    assert resumed["fingerprint"] == reference["fingerprint"]
    assert resumed["metrics"] == reference["metrics"]

"""Stage 1 at ImageNet scale: small task parameters, few storage requests, retries not losses.

Each test pins a property whose absence costs hours on 1.28M images (issue #28): the plan a
task receives does not grow with the input; planning exported shards reads their markers, not
their bytes; finalizing reads markers and reports concurrently after one listing; a transient
storage error fails the shard instead of quarantining its input; a checkpoint rewritten at the
same URI is loaded again by a long-lived worker.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from build_scale_helpers import count_storage_calls, fail_once

from storage import open_storage
from storage.checkpoints import save_state_dict
from storage.core import TransientStorageError
from storage.layout import shard_name
from storage.shards import ShardWriter, read_shard
from tasks.build_dataset import (
    BuildConfig,
    BuildPlan,
    LabelConfig,
    explained_model_fingerprint,
    finalize_build,
    label_shard,
    plan_build,
)
from tasks.data.export import export_synthetic_domain, write_class_names
from tasks.data.readers import _unique_key, webdataset_key_renames
from tasks.data.synthetic import make_sample
from tasks.model.clip import DEFAULT_MODEL, load_clip

# 3x3 cells over the tiny ViT, a small budget: labels in seconds on a shared CPU.
FAST = LabelConfig(grid_h=3, grid_w=3, budget=12, top_k=0, images_per_batch=8)


def _config(root: Path, **changes) -> BuildConfig:
    fields = dict(
        name="shapes-x",
        split="val",
        input_uri="shapes",
        synthetic_per_class=2,
        output_uri=str(root / "xdata"),
        label=FAST,
        num_shards=3,
        device="cpu",
    )
    fields.update(changes)
    return BuildConfig(**fields)


def test_task_parameters_are_small_and_independent_of_the_number_of_images(
    tmp_path: Path,
) -> None:
    zero = FAST.model_copy(update={"baseline": "zero"})
    small = plan_build(_config(tmp_path, synthetic_per_class=20, label=zero))
    large = plan_build(_config(tmp_path, synthetic_per_class=2000, label=zero))
    assert (small.inputs, large.inputs) == (100, 10_000)
    sizes = [len(pickle.dumps(plan.to_dict())) for plan in (small, large)]
    # The same fields; only the digits of the image count differ (100 vs 10000).
    assert abs(sizes[1] - sizes[0]) <= 8 and max(sizes) < 4096
    assert all(f"{i:08d}" not in str(large.to_dict()) for i in (0, 9_999))


def _duplicate_key_input(root: Path) -> str:
    """Three input shards where ``k`` repeats across shards: renames to carry in the plan."""
    store = open_storage(str(root / "input"))
    write_class_names(store, ["a", "b", "c", "d", "e"])
    layout = [["k", "p1", "p2"], ["k", "q1"], ["k_2", "r1", "r2", "r3"]]
    for index, keys in enumerate(layout):
        with ShardWriter(store, shard_name("dup", "val", index)) as writer:
            for position, key in enumerate(keys):
                sample = make_sample("shapes", "val", 3 * index + position, image_size=32)
                writer.write({"__key__": key, "png": sample["png"], "cls": sample["cls"]})
    return store.uri


def test_a_shard_labelled_from_the_small_plan_is_the_one_the_planner_would_label(
    tmp_path: Path,
) -> None:
    config = _config(
        tmp_path,
        input_kind="webdataset",
        input_uri=_duplicate_key_input(tmp_path),
        input_name="dup",
    )
    planned = plan_build(config)
    assert planned.renamed_keys == {"dup-val-000001.tar@0": "k_2", "dup-val-000002.tar@0": "k_2_2"}
    small = BuildPlan.from_dict(planned.to_dict())
    assert small.units is None  # everything a shard needs comes from plan/{shard}.json
    for index in range(planned.output_shards):
        assert small.shard_plan(index) == planned.shard_plan(index)
    assert sum(len(planned.shard_plan(i)[1]) for i in range(3)) == 2  # every rename, once

    dataset = open_storage(planned.dataset_uri)
    label_shard(planned, 1)
    first = dataset.completion_info(planned.shard_key(1))["sha256"]
    label_shard(small, 1, overwrite=True)
    assert dataset.completion_info(planned.shard_key(1))["sha256"] == first
    # Output shard 1 is samples 3-5 of 9: input shard 1 whole, the head of input shard 2.
    keys = [s["__key__"] for s in read_shard(dataset, planned.shard_key(1))]
    assert keys == ["k_2", "q1", "k_2_2"]


def test_planning_exported_shards_reads_their_markers_not_their_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = str(tmp_path / "data")
    export_synthetic_domain(data, "shapes", splits=("val",), per_class=4, samples_per_shard=4)
    shards = [shard_name("shapes", "val", i) for i in range(5)]
    config = _config(
        tmp_path,
        input_kind="webdataset",
        input_uri=data,
        input_name="shapes",
        num_shards=2,
        label=FAST.model_copy(update={"baseline": "zero"}),
    )
    calls = count_storage_calls(monkeypatch)
    plan = plan_build(config)
    assert plan.inputs == 20 and plan.renamed_keys == {}
    # No input shard is opened: the exporter's markers prove the keys unique.
    assert [key for key in calls.keys("open_read") if key.endswith(".tar")] == []
    assert sorted(calls.keys("read_bytes", "/data/_completions/")) == sorted(
        f"{data}/_completions/{shard}.json" for shard in shards
    )
    assert len(calls.keys("list", f"{data}/")) == 1
    # The plan files: one per output shard, the listing's report, the plan's marker.
    written = calls.keys("write_bytes", plan.dataset_uri)
    assert sorted(key.rsplit("/", 1)[-1] for key in written if "/plan/" in key) == [
        "listing-report.json",
        "shapes-x-val-000000.json",
        "shapes-x-val-000001.json",
    ]

    # The dataset mean reads the heads of the shards only, one image each here.
    monkeypatch.setattr("tasks.build_dataset.inputs.MEAN_SAMPLE_SIZE", 5)
    calls.clear()
    plan_build(config.model_copy(update={"label": FAST}))
    assert sorted(calls.keys("open_read", ".tar")) == [f"{data}/{shard}" for shard in shards]


def test_only_shards_whose_key_ranges_overlap_are_read_and_renames_are_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_storage(str(tmp_path / "keys"))
    layout = {
        "s-val-000000.tar": ["k"],
        "s-val-000001.tar": ["k"],  # overlaps shard 0: both read
        "s-val-000002.tar": ["k_2"],  # alone, but holds the rename of shard 1's key: read
        "s-val-000003.tar": ["m1", "m2"],  # alone: never read
        "s-val-000004.tar": ["z"],  # a marker from another writer (no key range): read
    }
    for shard, keys in layout.items():
        with ShardWriter(store, shard) as writer:
            for key in keys:
                writer.write({"__key__": key, "cls": 0, "png": b"x"})
    info = store.completion_info("s-val-000004.tar")
    store.mark_complete("s-val-000004.tar", {k: info[k] for k in ("samples", "bytes", "sha256")})

    calls = count_storage_calls(monkeypatch)
    renames = webdataset_key_renames(store, list(layout))
    assert sorted(k.rsplit("/", 1)[-1] for k in calls.keys("open_read")) == [
        "s-val-000000.tar",
        "s-val-000001.tar",
        "s-val-000002.tar",
        "s-val-000004.tar",
    ]
    # The renames a read of every shard gives.
    used: set[str] = set()
    expected = {}
    for shard, keys in layout.items():
        for position, key in enumerate(keys):
            if (unique := _unique_key(key, used)) != key:
                expected[f"{shard}@{position}"] = unique
    assert renames == expected == {"s-val-000001.tar@0": "k_2", "s-val-000002.tar@0": "k_2_2"}


def test_finalize_lists_once_and_reads_each_marker_and_report_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = plan_build(_config(tmp_path, num_shards=5))
    for index in range(5):
        label_shard(plan, index)
    small = BuildPlan.from_dict(plan.to_dict())
    calls = count_storage_calls(monkeypatch)
    summary = finalize_build(small)
    assert summary["missing"] == [] and summary["samples"] == summary["inputs"] == 10
    counts = calls.counts()
    # One listing; no existence check per shard; a marker and a report per shard, and the
    # listing's report; the manifest and the split report written.
    assert counts["list"] == 1 and counts["exists"] == 0
    assert counts["read_bytes"] == 2 * 5 + 1
    assert counts["write_bytes"] == 2


def test_a_transient_error_fails_the_shard_and_its_retry_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = open_storage(str(tmp_path / "folder"))
    for i in range(6):
        folder.write_bytes(f"{'ab'[i % 2]}/{i:02d}.png", make_sample("shapes", "val", i)["png"])
    config = _config(tmp_path, input_kind="imagefolder", input_uri=folder.uri, num_shards=1)
    clean = plan_build(config.model_copy(update={"output_uri": str(tmp_path / "clean")}))
    label_shard(clean, 0)
    clean_info = open_storage(clean.dataset_uri).completion_info(clean.shard_key(0))

    plan = plan_build(config)
    dataset = open_storage(plan.dataset_uri)
    error = TransientStorageError("cannot read s3://b/a/02.png: SlowDown: please reduce")
    hit = fail_once(monkeypatch, "read_bytes", lambda key: key.endswith("02.png"), error)
    with pytest.raises(TransientStorageError, match="SlowDown"):
        label_shard(plan, 0)
    assert hit and not dataset.is_complete(plan.shard_key(0))  # nothing published
    outcome = label_shard(plan, 0)  # what the task's retry does
    assert outcome.samples == 6 and outcome.quarantined == 0
    info = dataset.completion_info(plan.shard_key(0))
    assert (info["sha256"], info["samples"]) == (clean_info["sha256"], clean_info["samples"])


def test_a_transient_error_on_an_input_shard_is_not_a_bad_shard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = str(tmp_path / "data")
    export_synthetic_domain(data, "shapes", splits=("val",), per_class=2, samples_per_shard=4)
    config = _config(
        tmp_path, input_kind="webdataset", input_uri=data, input_name="shapes", num_shards=1
    )
    plan = plan_build(config)
    error = TransientStorageError("cannot open s3://b/shapes-val-000001.tar: InternalError")
    fail_once(monkeypatch, "open_read", lambda key: key.endswith("shapes-val-000001.tar"), error)
    with pytest.raises(TransientStorageError):
        label_shard(plan, 0)
    outcome = label_shard(plan, 0)
    assert outcome.samples == 10 and outcome.report.get("counts", {}).get("bad_shards", 0) == 0


def test_a_checkpoint_rewritten_at_the_same_uri_is_loaded_again(tmp_path: Path) -> None:
    weights = open_storage(str(tmp_path / "weights"))
    state = load_clip(DEFAULT_MODEL).state_dict()
    save_state_dict(weights, "theta.safetensors", state, {"model_name": DEFAULT_MODEL})
    config = _config(tmp_path, checkpoint=weights.url("theta.safetensors"), num_shards=1)
    plan = plan_build(config)
    assert explained_model_fingerprint(config, plan.class_names) == plan.model_fingerprint

    changed = {k: (v + 0.01 if v.is_floating_point() else v) for k, v in state.items()}
    save_state_dict(weights, "theta.safetensors", changed, {"model_name": DEFAULT_MODEL})
    # The same process (a long-lived Dask worker) sees the new weights, not its cached model.
    assert explained_model_fingerprint(config, plan.class_names) != plan.model_fingerprint
    with pytest.raises(ValueError, match="plan the build again"):
        label_shard(plan, 0)
    replanned = plan_build(config)
    assert replanned.version != plan.version
    assert label_shard(replanned, 0).samples == replanned.inputs

"""The X-dataset builder keeps its input's shard layout when asked (P and X then stream alike)."""

from __future__ import annotations

import pytest

from storage import open_storage
from storage.layout import shard_name
from storage.shards import ShardWriter, read_shard
from tasks.build_dataset import BuildConfig, BuildPlan, LabelConfig, label_shard, plan_build
from tasks.build_dataset.stage import label_task
from tasks.data.export import write_class_names
from tasks.data.synthetic import SYNTHETIC_DOMAINS, make_split

DOMAIN = "shapes"


def _input(tmp_path, layout: list[list[dict]]) -> str:
    source = open_storage(str(tmp_path / "data"))
    write_class_names(source, list(SYNTHETIC_DOMAINS[DOMAIN].class_names))
    for index, part in enumerate(layout):
        with ShardWriter(source, shard_name(DOMAIN, "train", index)) as writer:
            for sample in reversed(part):  # not key order: the order must be kept, not sorted
                writer.write({k: sample[k] for k in ("__key__", "png", "cls")})
    return source.uri


def _config(tmp_path, input_uri: str, num_shards: int) -> BuildConfig:
    return BuildConfig(
        name="shapes-x",
        input_kind="webdataset",
        input_uri=input_uri,
        input_name=DOMAIN,
        num_shards=num_shards,
        preserve_layout=True,
        label=LabelConfig(budget=60),
        output_uri=str(tmp_path / "xdata"),
        device="cpu",
    )


def test_preserve_layout_writes_one_shard_per_input_shard_in_order(tmp_path) -> None:
    samples = list(make_split(DOMAIN, "train", seed=0, per_class=2))
    layout = [samples[0:3], samples[3:4], samples[4:10]]  # uneven on purpose
    plan = plan_build(_config(tmp_path, _input(tmp_path, layout), num_shards=1))
    # The input's layout wins for the output; num_shards (1) is the number of tasks.
    assert plan.output_shards == 3 and plan.num_tasks == 1 and plan.config.num_shards == 1
    for index in range(3):
        label_shard(plan, index)
    out = open_storage(plan.dataset_uri)
    for index, part in enumerate(layout):
        written = list(read_shard(out, shard_name("shapes-x", "train", index)))
        assert [s["__key__"] for s in written] == [s["__key__"] for s in reversed(part)]
        assert all("shap.npy" in s for s in written)


def test_preserve_layout_groups_consecutive_input_shards_into_num_shards_tasks(tmp_path) -> None:
    """Five input shards, two tasks: 2 + 3 consecutive shards, the output as with one task each."""
    samples = list(make_split(DOMAIN, "train", seed=0, per_class=2))
    layout = [samples[0:2], samples[2:3], samples[3:5], samples[5:8], samples[8:10]]
    input_uri = _input(tmp_path, layout)
    grouped = plan_build(_config(tmp_path, input_uri, num_shards=2))
    assert grouped.output_shards == 5 and grouped.num_tasks == 2
    assert [list(grouped.task_shards(i)) for i in range(2)] == [[0, 1], [2, 3, 4]]
    # The number of tasks changes how the work is cut, not what is written: same version.
    one_each = plan_build(_config(tmp_path, input_uri, num_shards=64))
    assert one_each.version == grouped.version and one_each.num_tasks == 5

    # A task run from the plan's small dict (as a Prefect task gets it) labels its whole group.
    outcomes = [label_task(BuildPlan.from_dict(grouped.to_dict()), i) for i in range(2)]
    assert [[o.shard for o in group] for group in outcomes] == [
        [shard_name("shapes-x", "train", i) for i in shards] for shards in ([0, 1], [2, 3, 4])
    ]
    out = open_storage(grouped.dataset_uri)
    for index, part in enumerate(layout):
        written = list(read_shard(out, shard_name("shapes-x", "train", index)))
        assert [s["__key__"] for s in written] == [s["__key__"] for s in reversed(part)]
    # Labelled with one task per shard, every shard is found complete.
    assert all(o.skipped for i in range(5) for o in label_task(one_each, i))
    with pytest.raises(ValueError, match=r"task_index 2 outside \[0, 2\)"):
        grouped.task_shards(2)


def test_preserve_layout_needs_webdataset_input(tmp_path) -> None:
    with pytest.raises(ValueError, match="preserve_layout needs WebDataset input"):
        BuildConfig(name="x", input_uri=DOMAIN, preserve_layout=True, output_uri=str(tmp_path))

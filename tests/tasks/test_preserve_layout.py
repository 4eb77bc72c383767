"""The X-dataset builder keeps its input's shard layout when asked (P and X then stream alike)."""

from __future__ import annotations

import pytest

from storage import open_storage
from storage.layout import shard_name
from storage.shards import ShardWriter, read_shard
from tasks.build_dataset import BuildConfig, LabelConfig, label_shard, plan_build
from tasks.data.export import write_class_names
from tasks.data.synthetic import SYNTHETIC_DOMAINS, make_split

DOMAIN = "shapes"


def test_preserve_layout_writes_one_shard_per_input_shard_in_order(tmp_path) -> None:
    source = open_storage(str(tmp_path / "data"))
    samples = list(make_split(DOMAIN, "train", seed=0, per_class=2))
    write_class_names(source, list(SYNTHETIC_DOMAINS[DOMAIN].class_names))
    layout = [samples[0:3], samples[3:4], samples[4:10]]  # uneven on purpose
    for index, part in enumerate(layout):
        with ShardWriter(source, shard_name(DOMAIN, "train", index)) as writer:
            for sample in reversed(part):  # not key order: the order must be kept, not sorted
                writer.write({k: sample[k] for k in ("__key__", "png", "cls")})
    config = BuildConfig(
        name="shapes-x",
        input_kind="webdataset",
        input_uri=source.uri,
        input_name=DOMAIN,
        num_shards=1,
        preserve_layout=True,
        label=LabelConfig(budget=60),
        output_uri=str(tmp_path / "xdata"),
        device="cpu",
    )
    plan = plan_build(config)
    assert plan.config.num_shards == 3
    for index in range(3):
        label_shard(plan, index)
    out = open_storage(plan.dataset_uri)
    for index, part in enumerate(layout):
        written = list(read_shard(out, shard_name("shapes-x", "train", index)))
        assert [s["__key__"] for s in written] == [s["__key__"] for s in reversed(part)]
        assert all("shap.npy" in s for s in written)


def test_preserve_layout_needs_webdataset_input(tmp_path) -> None:
    with pytest.raises(ValueError, match="preserve_layout needs WebDataset input"):
        BuildConfig(name="x", input_uri=DOMAIN, preserve_layout=True, output_uri=str(tmp_path))

"""``max_per_class``: a build labels only the first images of each class, whatever its shards."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from storage import open_storage
from storage.layout import shard_name
from storage.shards import ShardWriter, read_shard
from tasks.build_dataset import BuildConfig, LabelConfig, label_shard, list_input, plan_build
from tasks.data.export import write_class_names
from tasks.data.synthetic import SYNTHETIC_DOMAINS

CLASSES = ["red", "green", "blue"]
# Labels of the input, shard by shard, in stored order (not sorted by class on purpose).
LAYOUT = [[0, 0, 0, 1, 2], [1, 1, 2, 2, 0, 1]]


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (value * 40 % 256, 80, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


def _webdataset_input(root: Path) -> tuple[str, list[str]]:
    """The input folder and the keys of the first two samples of each class, in input order."""
    store = open_storage(str(root / "input"))
    write_class_names(store, CLASSES)
    seen: dict[int, int] = {}
    expected = []
    for index, labels in enumerate(LAYOUT):
        with ShardWriter(store, shard_name("toy", "val", index)) as writer:
            for position, label in enumerate(labels):
                key = f"s{index}-{position:02d}"
                writer.write({"__key__": key, "png": _png(3 * index + position), "cls": label})
                seen[label] = seen.get(label, 0) + 1
                if seen[label] <= 2:
                    expected.append(key)
    return store.uri, expected


def _config(root: Path, input_uri: str, **changes) -> BuildConfig:
    fields = dict(
        name="toy-ref",
        split="val",
        input_kind="webdataset",
        input_uri=input_uri,
        input_name="toy",
        label=LabelConfig(budget=60, top_k=0),
        num_shards=1,
        output_uri=str(root / "xdata"),
        device="cpu",
    )
    fields.update(changes)
    return BuildConfig(**fields)


def _labelled_keys(root: Path, config: BuildConfig) -> tuple[str, list[str]]:
    plan = plan_build(config)
    for index in range(config.num_shards):
        label_shard(plan, index)
    out = open_storage(plan.dataset_uri)
    keys = [
        sample["__key__"]
        for index in range(config.num_shards)
        for sample in read_shard(out, shard_name(config.name, config.split, index))
    ]
    return plan.version, keys


def test_webdataset_build_labels_the_first_images_of_each_class_for_any_shard_count(
    tmp_path: Path,
) -> None:
    input_uri, expected = _webdataset_input(tmp_path)
    assert len(expected) == 6
    one_version, one = _labelled_keys(tmp_path, _config(tmp_path, input_uri, max_per_class=2))
    two_version, two = _labelled_keys(
        tmp_path, _config(tmp_path, input_uri, max_per_class=2, num_shards=2)
    )
    assert one == expected and two == expected
    assert one_version != two_version  # the shard count is part of the version, as before
    unlimited = plan_build(_config(tmp_path, input_uri))
    assert unlimited.version != one_version
    # The unlimited listing is the one every existing build has: one unit per input shard.
    assert unlimited.units == [
        f"{shard_name('toy', 'val', i)}@{len(labels)}" for i, labels in enumerate(LAYOUT)
    ]
    # A limit that keeps every image still names another build than no limit.
    everything = plan_build(_config(tmp_path, input_uri, max_per_class=10))
    assert everything.version != unlimited.version


def test_imagefolder_and_synthetic_listings_keep_the_first_images_of_each_class(
    tmp_path: Path,
) -> None:
    folder = open_storage(str(tmp_path / "folder"))
    for class_id, name in enumerate(CLASSES):
        for i in (3, 1, 2):
            folder.write_bytes(f"{name}/img{i}.png", _png(class_id * 3 + i))
    config = _config(tmp_path, folder.uri, input_kind="imagefolder", input_name=None)
    listed = list_input(config.model_copy(update={"max_per_class": 2})).units
    # Classes follow the sorted folder names (blue, green, red), files the sorted paths.
    assert [unit.split(":", 2)[2] for unit in listed] == [
        f"{name}/img{i}.png" for name in sorted(CLASSES) for i in (1, 2)
    ]
    assert len(list_input(config).units) == 9

    synthetic = BuildConfig(
        name="shapes-ref",
        split="test",
        input_uri="shapes",
        synthetic_per_class=4,
        max_per_class=2,
        output_uri=str(tmp_path / "xdata"),
    )
    classes = len(SYNTHETIC_DOMAINS["shapes"].class_names)
    assert list_input(synthetic).units == [f"{i:08d}" for i in range(2 * classes)]


def test_preserve_layout_refuses_a_limit(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot be combined with max_per_class"):
        _config(tmp_path, "x", preserve_layout=True, max_per_class=2)


def test_pipeline_references_hold_whole_classes_and_accuracy_reads_the_export() -> None:
    from flows.pipeline import PipelineConfig, _build_config, reference_per_class

    config = PipelineConfig(out_uri="out")
    assert config.per_class == {"train": 64, "val": 100, "test": 100}
    # textures has 4 classes: 100 test images are 25 per class; 30 val images of 5 classes, 6.
    assert reference_per_class(config, "test", 4) == 25
    assert reference_per_class(config, "val", 5) == 6
    assert reference_per_class(config, "val", 4) == 8  # rounded up to whole classes
    build = _build_config(config, "textures", "textures-ref", "test", "m", LabelConfig(), 25)
    assert build.max_per_class == 25 and not build.preserve_layout
    # The source X-dataset keeps P's layout, as before.
    assert _build_config(config, "shapes", "shapes-x", "train", "m", LabelConfig()).preserve_layout
    assert reference_per_class(PipelineConfig.miniature("out"), "test", 5) is None


def test_each_data_seed_exports_into_its_own_folder() -> None:
    """A ``--seeds`` study must not rewrite seed 0's images with seed 1's under the same key."""
    from flows.pipeline import PipelineConfig, _data_uri

    uris = {_data_uri(PipelineConfig(out_uri="out", data_seed=s), "shapes") for s in (0, 1, 2)}
    assert len(uris) == 3
    assert _data_uri(PipelineConfig(out_uri="out"), "shapes").endswith("data/shapes")

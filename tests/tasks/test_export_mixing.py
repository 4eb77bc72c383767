"""Exported ImageFolder shards mix classes, and so do the training batches streamed from them.

An ImageNet-style folder lists class by class; exported in that order, every 256-sample shard
would hold one class and the training stream's shuffle buffer (a few shards) a handful of them.
"""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from storage import open_storage
from tasks.data.domains import DomainSpec, check_domain, export_domain, mixed_order
from tasks.data.export import export_synthetic_domain, export_to_shards
from tasks.data.readers import iter_image_folder, iter_webdataset
from tasks.data.stream import Decoder, TrainStream, list_split

CLASSES = 32
PER_CLASS = 16
SHARD = 8


def _folder(root: Path, per_class: dict[str, int]) -> Path:
    """``root/{split}/c{k:02d}/img-{i}.jpg``: tiny distinct JPEGs, ``CLASSES`` classes."""
    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        for k in range(CLASSES):
            folder = root / split / f"c{k:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img-{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The folder exported as a domain, and the same train files exported in listing order."""
    tmp = tmp_path_factory.mktemp("mixing")
    root = _folder(tmp / "folder", {"train": PER_CLASS, "val": 2, "test": 2})
    spec = DomainSpec(name="tiny", kind="imagefolder", uri=str(root))
    plan = check_domain(spec)
    out = open_storage(tmp / "data" / "tiny")
    export_domain(plan, out, per_class={}, image_size=8, seed=0, samples_per_shard=SHARD)
    # What export wrote before: the listing's order, class folder by class folder.
    sorted_out = open_storage(tmp / "sorted")
    export_to_shards(
        iter_image_folder(root / "train"), sorted_out, "tiny", "train", samples_per_shard=SHARD
    )
    return {"root": root, "spec": spec, "plan": plan, "out": out, "sorted": sorted_out}


def _shard_classes(storage, name: str, split: str) -> list[list[int]]:
    from storage.shards import complete_shards, read_shard

    return [
        [int(s["cls"]) for s in read_shard(storage, key)]
        for key in complete_shards(storage, name, split)
    ]


def _batch_classes(storage, batch_size: int = 16, buffer: int = 2 * SHARD) -> list[int]:
    """Distinct classes in each training batch of three epochs: batches as large as a
    shuffle buffer of a few shards (ImageNet: 1,000 samples, ~4 shards, batches of 128)."""
    stream = TrainStream(
        list_split(storage.uri, "train", "tiny"),
        Decoder(image_size=8, targets="no"),
        batch_size=batch_size,
        seed=0,
        shuffle_buffer=buffer,
    )
    distinct = []
    for epoch in range(3):
        stream.set_epoch(epoch)
        distinct += [len(set(batch.labels.tolist())) for batch in stream]
    return distinct


def test_every_shard_holds_as_many_classes_as_it_can(exported: dict) -> None:
    shards = _shard_classes(exported["out"], "tiny", "train")
    assert sum(len(s) for s in shards) == CLASSES * PER_CLASS
    # A round of CLASSES positions never repeats a class, and these shards lie within rounds.
    for classes in shards:
        assert len(set(classes)) == len(classes) == SHARD, classes
    # In listing order every shard held one class.
    before = _shard_classes(exported["sorted"], "tiny", "train")
    assert all(len(set(classes)) == 1 for classes in before)


def test_training_batches_mix_classes(exported: dict) -> None:
    mixed = _batch_classes(exported["out"])
    before = _batch_classes(exported["sorted"])
    # 16-sample batches from a 2-shard buffer: 13 of 32 classes on average now (16 random
    # draws from 32 classes give 12.6); from class-sorted shards 6, and never more than 8.
    assert statistics.mean(mixed) >= 12 and min(mixed) >= 8, mixed
    assert statistics.mean(before) <= 7 and max(before) <= 8, before


def test_order_depends_on_keys_only_and_the_first_n_of_each_class_come_first(
    exported: dict,
) -> None:
    plan = exported["plan"]
    files = list(plan.units["train"])
    assert mixed_order(files[::-1], "train") == mixed_order(files, "train") == files
    # Rounds: the first n * C samples of the exported split hold exactly n of each class, so a
    # reference of "the first n images of each class" is a prefix of the shards.
    stored = [int(s["cls"]) for s in iter_webdataset(exported["out"], "tiny", "train")]
    for n in range(1, PER_CLASS + 1):
        assert Counter(stored[: n * CLASSES]) == {k: n for k in range(CLASSES)}
    # per_class keeps those same files: the lowest-hashed n of each class, in the same order.
    capped = check_domain(exported["spec"].model_copy(update={"per_class": {"train": 3}}))
    assert capped.units["train"] == plan.units["train"][: 3 * CLASSES]
    assert capped.units["val"] == plan.units["val"]


def test_builtin_synthetic_domains_already_mix_classes(tmp_path: Path) -> None:
    # Sample i of a synthetic split is class i % C: every shard holds every class, as before.
    out = open_storage(tmp_path / "shapes")
    export_synthetic_domain(out, "shapes", splits=("train",), per_class=8, samples_per_shard=10)
    shards = _shard_classes(out, "shapes", "train")
    assert [len(s) for s in shards] == [10, 10, 10, 10]
    assert all(classes == [i % 5 for i in range(10)] for classes in shards)

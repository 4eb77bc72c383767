"""Export by listed shards: membership from the listing, one read and one decode per image.

Every read of an input file, every listing of an input folder and every decode is counted
(through the storage and the reader), so these tests see exactly what an export costs: a rerun
over complete shards must read nothing, and a first run must fetch and decode each image once.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tasks.data.readers as readers
import tasks.data.synthetic as synthetic
from storage import open_storage
from storage.layout import split_report_key
from storage.local import LocalStorage
from storage.shards import complete_shards, read_manifest
from tasks.data.domains import DomainSpec, check_domain, domain_shards, export_domain
from tasks.data.export import export_synthetic_domain, export_to_shards
from tasks.data.synthetic import make_split

SHARD = 8


class Calls:
    """Reads, listings and decodes, counted across threads."""

    def __init__(self, input_root: Path) -> None:
        self.root = str(input_root)
        self.reads: Counter[str] = Counter()
        self.lists: Counter[str] = Counter()
        self.decodes = 0
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self.reads.clear()
            self.lists.clear()
            self.decodes = 0


@pytest.fixture
def calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Calls:
    counter = Calls(tmp_path / "folder")
    read_bytes, list_keys, open_image = (
        LocalStorage.read_bytes,
        LocalStorage.list,
        readers.open_image,
    )

    def counted_read(self: LocalStorage, key: str) -> bytes:
        path = str(Path(str(self.root)) / key)
        if path.startswith(counter.root):
            with counter._lock:
                counter.reads[path] += 1
        return read_bytes(self, key)

    def counted_list(self: LocalStorage, prefix: str = "") -> list[str]:
        if str(self.root).startswith(counter.root):
            with counter._lock:
                counter.lists[str(self.root)] += 1
        return list_keys(self, prefix)

    def counted_open(data: bytes, **kwargs):
        with counter._lock:
            counter.decodes += 1
        return open_image(data, **kwargs)

    monkeypatch.setattr(LocalStorage, "read_bytes", counted_read)
    monkeypatch.setattr(LocalStorage, "list", counted_list)
    monkeypatch.setattr(readers, "open_image", counted_open)
    return counter


def _folder(root: Path, classes: int = 5, per_class: int = 7) -> Path:
    """``root/{train,val,test}/c{k}/img-{i}.jpg`` (tiny JPEGs; one BMP, stored as PNG)."""
    rng = np.random.default_rng(1)
    for split, count in (("train", per_class), ("val", 2), ("test", 3)):
        for k in range(classes):
            for i in range(count):
                path = root / split / f"c{k}" / f"img-{i:02d}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(path, format="JPEG", quality=90)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / "c0" / "odd.bmp")
    return root


def _export(plan, out: Path, **options) -> dict[str, list[str]]:
    return export_domain(
        plan,
        open_storage(out),
        per_class={},
        image_size=8,
        seed=0,
        samples_per_shard=SHARD,
        **options,
    )


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture
def plan(tmp_path: Path):
    root = _folder(tmp_path / "folder")
    return check_domain(DomainSpec(name="tiny", kind="imagefolder", uri=str(root)))


def test_each_image_is_fetched_and_decoded_once(plan, calls: Calls, tmp_path: Path) -> None:
    files = sum(len(units) for units in plan.units.values())
    _export(plan, tmp_path / "out", shard_workers=3, read_workers=4)
    assert len(calls.reads) == files and set(calls.reads.values()) == {1}
    assert calls.decodes == files  # the BMP included: converted from its one decode
    # The plan's listing is the only one: exporting lists no input folder.
    assert not calls.lists
    out = open_storage(tmp_path / "out")
    assert sum(row["samples"] for row in read_manifest(out).to_pylist()) == files


def test_a_rerun_over_complete_shards_reads_no_image(plan, calls: Calls, tmp_path: Path) -> None:
    first = _export(plan, tmp_path / "out")
    before = _snapshot(tmp_path / "out" / "_completions")
    calls.clear()
    again = check_domain(plan.spec)  # a new run lists each split folder once ...
    assert again == plan and set(calls.lists.values()) == {1} and len(calls.lists) == 3
    assert _export(again, tmp_path / "out") == first  # ... and reads no image at all
    assert not calls.reads and calls.decodes == 0
    assert _snapshot(tmp_path / "out" / "_completions") == before
    report = open_storage(tmp_path / "out").read_json(split_report_key("tiny", "train"))
    assert report["this_run"]["counts"] == {"skipped": len(plan.units["train"])}
    assert report["export"]["counts"]["written"] == len(plan.units["train"])


def test_a_missing_shard_is_filled_reading_only_its_own_files(
    plan, calls: Calls, tmp_path: Path
) -> None:
    out = open_storage(tmp_path / "out")
    keys = _export(plan, tmp_path / "out")["train"]
    whole = _snapshot(tmp_path / "out")
    out.clear_complete(keys[2])
    out.delete(keys[2])
    calls.clear()
    _export(plan, tmp_path / "out")
    shard = domain_shards(plan, samples_per_shard=SHARD)["train"][2]
    root = tmp_path / "folder" / "train"
    assert set(calls.reads) == {str(root / path) for path, _, _ in shard.files}
    # Everything but the split reports (whose this_run says what this run did) is as before.
    again = _snapshot(tmp_path / "out")
    for snapshot in (again, whole):
        for split in ("train", "val", "test"):
            del snapshot[split_report_key("tiny", split)]
    assert again == whole


def test_parallel_export_writes_what_a_sequential_one_does(plan, tmp_path: Path) -> None:
    _export(plan, tmp_path / "sequential", shard_workers=1, read_workers=1)
    _export(plan, tmp_path / "parallel", shard_workers=4, read_workers=3)
    sequential, parallel = _snapshot(tmp_path / "sequential"), _snapshot(tmp_path / "parallel")
    assert sequential == parallel
    assert any(name.endswith(".tar") for name in parallel)


def test_shards_of_a_shorter_listing_leave_no_stale_shard(plan, tmp_path: Path) -> None:
    out = open_storage(tmp_path / "out")
    _export(plan, tmp_path / "out")
    assert len(complete_shards(out, "tiny", "train")) == 5  # 36 files, 8 per shard
    for path in sorted((tmp_path / "folder" / "train").rglob("img-0[56].jpg")):
        path.unlink()  # 26 files left: 4 shards
    shorter = check_domain(plan.spec)
    keys = _export(shorter, tmp_path / "out")["train"]
    assert complete_shards(out, "tiny", "train") == keys and len(keys) == 4
    assert not out.exists("tiny-train-000004.tar")
    stored = sum(
        row["samples"] for row in read_manifest(out).to_pylist() if "-train-" in row["name"]
    )
    assert stored == len(shorter.units["train"]) == 26


def test_synthetic_export_is_the_sequential_export_and_a_rerun_draws_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    per_class = {"train": 5, "val": 2}
    listed = open_storage(tmp_path / "listed")
    export_synthetic_domain(
        listed, "glyphs", splits=("train", "val"), per_class=per_class, samples_per_shard=SHARD
    )
    sequential = open_storage(tmp_path / "sequential")
    for split in ("train", "val"):
        export_to_shards(
            make_split("glyphs", split, per_class=per_class[split], image_size=56),
            sequential,
            "glyphs",
            split,
            samples_per_shard=SHARD,
            num_classes=5,
        )
    for key in complete_shards(listed, "glyphs", "train") + complete_shards(
        listed, "glyphs", "val"
    ):
        assert listed.read_bytes(key) == sequential.read_bytes(key), key
    # Every image, whichever way it is drawn, is rendered here.
    drawn = []
    render = synthetic.render_sample
    monkeypatch.setattr(
        synthetic, "render_sample", lambda *a, **k: drawn.append(a) or render(*a, **k)
    )
    export_synthetic_domain(
        listed, "glyphs", splits=("train", "val"), per_class=per_class, samples_per_shard=SHARD
    )
    assert drawn == []
    listed.clear_complete(complete_shards(listed, "glyphs", "val")[0])
    export_synthetic_domain(
        listed, "glyphs", splits=("train", "val"), per_class=per_class, samples_per_shard=SHARD
    )
    assert [(split, index) for _, split, index in drawn] == [("val", i) for i in range(SHARD)]

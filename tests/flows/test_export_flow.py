"""The export flow: one listing per run, one task per ImageFolder shard, failures by shard.

Runs on the session's temporary Prefect API (tests/flows/conftest.py).
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import flows.export as export_flows
from flows.export import export_domain_spec_flow
from storage import open_storage
from storage.layout import split_report_key
from storage.local import LocalStorage
from storage.shards import complete_shards
from tasks.data.domains import DomainSpec, check_domain, export_domain

SHARD = 4


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(2)
    for split, count in (("train", 5), ("val", 1), ("test", 2)):
        for k in range(3):
            for i in range(count):
                path = tmp_path / "folder" / split / f"c{k}" / f"img-{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
    return tmp_path / "folder"


@pytest.fixture
def counted(folder: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Counter]:
    """Reads of input files and listings of input folders, across threads."""
    counts: dict[str, Counter] = {"reads": Counter(), "lists": Counter()}
    lock = threading.Lock()
    read_bytes, list_keys = LocalStorage.read_bytes, LocalStorage.list

    def read(self: LocalStorage, key: str) -> bytes:
        if str(self.root).startswith(str(folder)):
            with lock:
                counts["reads"][f"{self.root}/{key}"] += 1
        return read_bytes(self, key)

    def listing(self: LocalStorage, prefix: str = "") -> list[str]:
        if str(self.root).startswith(str(folder)):
            with lock:
                counts["lists"][str(self.root)] += 1
        return list_keys(self, prefix)

    monkeypatch.setattr(LocalStorage, "read_bytes", read)
    monkeypatch.setattr(LocalStorage, "list", listing)
    return counts


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _flow(spec: DomainSpec, out: Path) -> dict[str, list[str]]:
    return export_domain_spec_flow(
        spec, str(out), samples_per_shard=SHARD, shard_workers=3, read_workers=2
    )


def test_the_flow_lists_once_reads_each_image_once_and_matches_the_plain_export(
    folder: Path, counted: dict[str, Counter], tmp_path: Path
) -> None:
    spec = DomainSpec(name="tiny", kind="imagefolder", uri=str(folder))
    shards = _flow(spec, tmp_path / "flow")
    assert {split: len(keys) for split, keys in shards.items()} == {
        "train": 4,
        "val": 1,
        "test": 2,
    }
    # One listing of each split folder in the whole run, one read of each image.
    assert sorted(counted["lists"]) == [str(folder / s) for s in ("test", "train", "val")]
    assert set(counted["lists"].values()) == {1}
    assert len(counted["reads"]) == 3 * (5 + 1 + 2) and set(counted["reads"].values()) == {1}
    export_domain(
        check_domain(spec),
        open_storage(tmp_path / "plain"),
        per_class={},
        image_size=8,
        seed=0,
        samples_per_shard=SHARD,
    )
    assert _files(tmp_path / "flow") == _files(tmp_path / "plain")

    counted["reads"].clear()
    counted["lists"].clear()
    assert _flow(spec, tmp_path / "flow") == shards
    assert not counted["reads"] and set(counted["lists"].values()) == {1}


def test_a_failing_shard_is_named_and_the_others_are_kept(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = DomainSpec(name="tiny", kind="imagefolder", uri=str(folder))
    out = tmp_path / "out"
    real = export_flows.export_domain_shard
    attempts = Counter()

    def flaky(shard, storage, **options):
        attempts[shard.key] += 1
        if shard.key == "tiny-train-000001.tar":
            raise OSError("connection reset by peer")
        return real(shard, storage, **options)

    monkeypatch.setattr(export_flows, "export_domain_shard", flaky)
    monkeypatch.setattr(
        export_flows,
        "export_shard_task",
        export_flows.export_shard_task.with_options(retry_delay_seconds=0),
    )
    plan = check_domain(spec)
    with pytest.raises(RuntimeError, match=r"1 of 7 shards failed .*tiny-train-000001\.tar"):
        _planned(plan, out)
    assert attempts["tiny-train-000001.tar"] == 1 + export_flows.SHARD_RETRIES
    storage = open_storage(out)
    assert complete_shards(storage, "tiny", "train") == [
        f"tiny-train-{i:06d}.tar" for i in (0, 2, 3)
    ]

    monkeypatch.setattr(export_flows, "export_domain_shard", real)
    shards = _planned(plan, out)
    assert shards["train"] == [f"tiny-train-{i:06d}.tar" for i in range(4)]
    report = storage.read_json(split_report_key("tiny", "train"))
    assert report["this_run"]["counts"]["written"] == SHARD  # only the missing shard
    assert report["export"]["counts"]["written"] == 15


def _planned(plan, out: Path) -> dict[str, list[str]]:
    from prefect import flow

    @flow(name="export-planned-test")
    def run() -> dict[str, list[str]]:
        return export_flows.export_planned_domain(
            plan,
            str(out),
            per_class={},
            image_size=8,
            seed=0,
            samples_per_shard=SHARD,
            shard_workers=2,
            read_workers=2,
        )

    return run()

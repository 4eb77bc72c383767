"""Scenario 3: bad inputs are converted or quarantined with a reason, and the counts reconcile.

The same zoo of bad files goes through the labeller (ImageFolder and WebDataset input) and the
exporter; none of them may crash the run, and every input is either written or quarantined.
"""

from __future__ import annotations

import io
import itertools
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from reliability_helpers import build_config, shap_of

from storage import open_storage
from storage.layout import shard_name, split_report_key
from storage.shards import ShardWriter, read_shard
from tasks.build_dataset import finalize_build, label_shard, plan_build
from tasks.data.export import export_to_shards, write_class_names
from tasks.data.quarantine import QuarantineReport
from tasks.data.readers import iter_image_folder


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _noise(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "CMYK": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode)


def _gradient(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], axis=-1))


def _bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A tiny PNG whose header claims a gigantic image (a decompression bomb's signature)."""
    data = bytearray(_encode(_noise((1, 1)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


GOOD = _encode(_noise((40, 30), seed=1), "PNG")
GRAY = _encode(_noise((40, 30), "L", seed=2), "PNG")
CMYK = _encode(_noise((40, 30), "CMYK", seed=3), "JPEG")
LARGE = _encode(_gradient(1600, 1200), "JPEG", quality=90)
CORRUPT = _encode(_noise((64, 64), seed=4), "JPEG")[:600]

#: file -> bytes, and the reason category expected for the ones that must be quarantined.
FOLDER = {
    "a/good.png": (GOOD, None),
    "a/gray.png": (GRAY, None),
    "a/cmyk.jpg": (CMYK, None),
    "a/corrupt.jpg": (CORRUPT, "truncated/corrupt"),
    "a/empty.jpg": (b"", "zero-byte file"),
    "b/large.jpg": (LARGE, None),
    "b/not-an-image.jpg": (b"%PDF-1.4 this is not an image\n" * 20, "not an image"),
    "b/bomb.png": (_bomb_png(), "too large"),
}


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """An ImageNet-style folder of good and bad files, plus a symlink that leads outside it."""
    root = tmp_path / "folder"
    for name, (data, _) in FOLDER.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    secret = tmp_path / "outside-the-root.png"
    secret.write_bytes(GOOD)
    (root / "b" / "escape.png").symlink_to(secret)
    return root


def _reasons(report: dict) -> dict[str, int]:
    return report["reasons"]


def test_labeller_on_an_image_folder_quarantines_or_converts_every_bad_file(
    image_folder: Path, tmp_path: Path
) -> None:
    config = build_config(
        str(tmp_path / "out"),
        input_kind="imagefolder",
        input_uri=str(image_folder),
        num_shards=1,
    )
    plan = plan_build(config)
    assert len(plan.units) == len(FOLDER) + 1  # the symlink is listed like any file
    outcome = label_shard(plan, 0)
    report = outcome.report

    expected = [reason for _, reason in FOLDER.values() if reason] + ["unreadable"]
    assert _reasons(report) == {reason: expected.count(reason) for reason in set(expected)}
    assert [e["key"] for e in report["quarantined"] if e["reason"].startswith("unreadable")] == [
        "b/escape.png"
    ]
    assert "outside the storage root" in str(report["quarantined"])
    # Counts reconcile: every input is written or quarantined, none twice.
    assert report["counts"]["read"] == len(plan.units)
    assert outcome.samples + outcome.quarantined == len(plan.units)
    assert outcome.samples == 4

    dataset = open_storage(plan.dataset_uri)
    samples = {s["__key__"]: s for s in read_shard(dataset, plan.shard_key(0))}
    assert sorted(samples) == ["a/cmyk", "a/good", "a/gray", "b/large"]
    assert samples["a/gray"]["png"] == GRAY and samples["b/large"]["jpg"] == LARGE
    assert "png" in samples["a/cmyk"] and "jpg" not in samples["a/cmyk"]  # converted, recorded
    assert [(c["key"], c["target"]) for c in report["converted"]] == [("a/cmyk", "png RGB")]
    for sample in samples.values():
        assert np.isfinite(shap_of(sample)).all()
    summary = finalize_build(plan)
    assert summary["samples"] + summary["quarantined"] == len(plan.units)
    run_report = dataset.read_json("reports/shapes-x-val.json")
    assert run_report["num_quarantined"] == len(expected)


def test_labeller_on_webdataset_input_skips_bad_shards_samples_labels_and_keys(
    tmp_path: Path,
) -> None:
    source = open_storage(str(tmp_path / "source"))
    write_class_names(source, ["circle", "square", "star"])
    good_samples = [
        {"__key__": "good-0", "png": GOOD, "cls": 0},
        {"__key__": "gray-0", "png": GRAY, "cls": 1},
        {"__key__": "cmyk-0", "jpg": CMYK, "cls": 2},
    ]
    bad_samples = [
        {"__key__": "label-99", "png": GOOD, "cls": 99},
        {"__key__": "../escape", "png": GOOD, "cls": 0},
        {"__key__": "/etc/absolute", "png": GOOD, "cls": 0},
        {"__key__": "corrupt-0", "jpg": CORRUPT, "cls": 0},
        {"__key__": "empty-0", "png": b"", "cls": 0},
        {"__key__": "text-0", "jpg": b"just some text, not a JPEG", "cls": 1},
    ]
    # ShardWriter does not validate (the exporter does), so these shards hold the raw zoo.
    with ShardWriter(source, shard_name("zoo", "val", 0)) as writer:
        for sample in good_samples + bad_samples:
            writer.write(sample)
    with ShardWriter(source, shard_name("zoo", "val", 1)) as writer:
        for index in range(4):
            writer.write({"__key__": f"lost-{index}", "png": GOOD, "cls": 0})
    # Shard 1 is then truncated behind its completion marker's back.
    truncated = source.url(shard_name("zoo", "val", 1))
    Path(truncated).write_bytes(Path(truncated).read_bytes()[:3000])

    config = build_config(
        str(tmp_path / "out"),
        input_kind="webdataset",
        input_uri=source.uri,
        input_name="zoo",
        num_shards=1,
    )
    plan = plan_build(config)
    outcome = label_shard(plan, 0)
    report = outcome.report
    entries = {e["key"]: e["reason"] for e in report["quarantined"]}

    # The shared reader counts what it passed on: read == yielded + quarantined at read.
    assert report["counts"] == {"bad_shards": 1, "read": 9, "yielded": 7}
    assert entries[shard_name("zoo", "val", 1)].startswith("bad shard")
    assert "out of range" in entries["label-99"]
    assert "bad key" in entries[f"{shard_name('zoo', 'val', 0)}:../escape"]
    assert "bad key" in entries[f"{shard_name('zoo', 'val', 0)}:/etc/absolute"]
    assert entries["corrupt-0"].startswith("truncated/corrupt")
    assert entries["empty-0"] == "zero-byte file"
    assert entries["text-0"] == "not an image"
    # Every sample of the readable shard is written or quarantined; the bad shard is one entry.
    assert outcome.samples == len(good_samples)
    assert outcome.samples + outcome.quarantined - 1 == report["counts"]["read"]
    written = {s["__key__"] for s in read_shard(open_storage(plan.dataset_uri), plan.shard_key(0))}
    assert written == {s["__key__"] for s in good_samples}


def test_exporter_converts_or_quarantines_and_counts_reconcile(
    image_folder: Path, tmp_path: Path
) -> None:
    report = QuarantineReport()
    folder_samples = iter_image_folder(image_folder, report=report)
    extra = [
        {"__key__": "x/label-7", "png": GOOD, "cls": 7},
        {"__key__": "../x/escape", "png": GOOD, "cls": 0},
        {"__key__": "/abs/path", "png": GOOD, "cls": 0},
        {"__key__": "a/good", "png": GOOD, "cls": 0},  # duplicates a folder sample's key
        {"__key__": "x/not-image", "png": b"GIF89a but not really", "cls": 1},
        {"__key__": "x/gray-under-jpg", "jpg": GRAY, "cls": 1},  # a PNG under the jpg field
    ]
    out = open_storage(str(tmp_path / "export"))
    shards = export_to_shards(
        itertools.chain(folder_samples, extra),
        out,
        "zoo",
        "train",
        samples_per_shard=4,
        num_classes=2,
        report=report,
    )
    counts = report.counts
    inputs = len(FOLDER) + 1 + len(extra)
    assert counts["read"] == len(FOLDER) + 1
    assert counts["read"] == counts["yielded"] + report.num_quarantined("read")
    assert counts["received"] == counts["yielded"] + len(extra)
    assert counts["received"] == counts["written"] + report.num_quarantined("export")
    assert counts["written"] + report.num_quarantined() == inputs
    assert report.reasons() == {
        "bad key": 2,
        "duplicate key": 1,
        "label out of range": 1,
        "not an image": 2,
        "too large": 1,
        "truncated/corrupt": 1,
        "unreadable": 1,
        "zero-byte file": 1,
    }
    assert {(c.key, c.target) for c in report.converted} == {
        ("a/cmyk", "png RGB"),
        ("x/gray-under-jpg", "png"),
    }
    stored = [s for key in shards for s in read_shard(out, key)]
    assert len(stored) == counts["written"] == 5
    assert len({s["__key__"] for s in stored}) == len(stored)
    assert out.read_json(split_report_key("zoo", "train"))["export"]["counts"]["written"] == 5

"""Image decoding, ImageFolder and WebDataset sources, and export to shards (local storage)."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset
from PIL import Image

from storage import open_storage
from storage.layout import shard_name, shard_report_key, split_report_key
from storage.shards import ShardWriter, complete_shards, read_manifest
from tasks.data.export import export_synthetic_domain, export_to_shards, write_class_names
from tasks.data.images import (
    BadImageError,
    decode_image,
    encode_png,
    image_to_tensor,
    sample_to_tensor,
)
from tasks.data.quarantine import QuarantineReport
from tasks.data.readers import (
    image_folder_classes,
    image_for_storage,
    iter_image_folder,
    iter_webdataset,
    key_problem,
    read_class_names,
    sanitise_key,
)
from tasks.data.synthetic import SYNTHETIC_DOMAINS, make_split


def _noise(height: int = 24, width: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _rgba_png() -> bytes:
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, 4:, 3] = 255  # left half fully transparent, right half opaque red
    return _encode(Image.fromarray(rgba, mode="RGBA"), "PNG")


def _palette_png() -> bytes:
    return _encode(Image.fromarray(_noise()).convert("P", palette=Image.Palette.ADAPTIVE), "PNG")


def test_decode_converts_every_mode_to_rgb():
    gray = _encode(Image.fromarray(_noise()[..., 0], mode="L"), "JPEG")
    cmyk = _encode(Image.fromarray(_noise()).convert("CMYK"), "JPEG")
    sixteen = _encode(
        Image.fromarray((np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)), "PNG"
    )
    for data in (gray, cmyk, _palette_png(), _rgba_png(), sixteen):
        img = decode_image(data)
        assert img.mode == "RGB"
    flat = np.asarray(decode_image(_rgba_png()))
    assert (flat[:, :4] == 255).all(), "transparent pixels must become white"
    assert (flat[:, 4:] == [200, 0, 0]).all()
    # 16-bit values are scaled, not clipped: the brightest pixel maps to 63000 / 257.
    assert np.asarray(decode_image(sixteen)).max() == round(63000 / 257)


def test_decode_refuses_bad_inputs_with_reasons():
    jpeg = _encode(Image.fromarray(_noise()), "JPEG")
    cases = {
        b"": "zero-byte file",
        b"just some text, not pixels": "not an image",
        jpeg[: len(jpeg) // 2]: "truncated/corrupt",
        _encode(Image.new("L", (1200, 1000)), "PNG"): "too large",
    }
    for data, category in cases.items():
        with pytest.raises(BadImageError) as info:
            decode_image(data, max_pixels=1_000_000)
        assert info.value.category == category
        assert isinstance(info.value, ValueError)
    with pytest.raises(BadImageError, match=r"too large: 1200x1000"):
        decode_image(_encode(Image.new("L", (1200, 1000)), "PNG"), max_pixels=1_000_000)


def test_image_to_tensor_resizes_crops_and_does_not_normalise():
    white = image_to_tensor(Image.new("RGB", (90, 60), "white"), 32)
    assert white.shape == (3, 32, 32) and white.dtype == torch.float32
    assert torch.allclose(white, torch.ones_like(white), atol=1e-6)
    # A square image at the target size passes through with its exact pixels.
    pixels = _noise(40, 40)
    exact = image_to_tensor(Image.fromarray(pixels), 40)
    assert torch.equal(exact, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    # Center crop: a wide image whose middle third is black keeps black in the middle only.
    wide = np.full((30, 90, 3), 255, dtype=np.uint8)
    wide[:, 30:60] = 0
    crop = image_to_tensor(Image.fromarray(wide), 30)
    assert crop.shape == (3, 30, 30)
    assert crop[:, :, 5:25].max() < 0.05
    sample = {"__key__": "k", "jpg": _encode(Image.new("L", (50, 70), 128), "JPEG")}
    tensor = sample_to_tensor(sample, 28)
    assert tensor.shape == (3, 28, 28) and 0.4 < tensor.mean() < 0.6


def test_sanitise_and_check_keys():
    assert sanitise_key("n01440764/n01440764_10026.JPEG") == "n01440764/n01440764_10026"
    assert sanitise_key("/../a/./b c/x.y.z.png") == "a/b_c/x_y_z"
    assert sanitise_key("cls/ünï code!.jpg") == "cls/_n__code_"
    for key in ("a/b", "n01/x_1-2", "dom-train-000001"):
        assert key_problem(key) is None
    for key in ("../x", "/abs/x", "a/../b", "", "a/b.c", "s3://b/k", None):
        assert key_problem(key) is not None


@pytest.fixture
def image_folder(tmp_path: Path) -> dict:
    """A tiny ImageNet-style folder with one file of every kind the reader must handle."""
    root = tmp_path / "imagenet"
    rgb = Image.fromarray(_noise())
    files = {
        "n002/good.jpg": (_encode(rgb, "JPEG"), ("jpg", None)),
        "n002/good_png.png": (encode_png(rgb), ("png", None)),
        "n002/gray.jpeg": (_encode(rgb.convert("L"), "JPEG"), ("jpg", None)),
        "n002/cmyk.jpg": (_encode(rgb.convert("CMYK"), "JPEG"), ("png", "converted")),
        "n001/palette.png": (_palette_png(), ("png", None)),
        "n001/rgba.png": (_rgba_png(), ("png", None)),
        "n001/bitmap.bmp": (_encode(rgb, "BMP"), ("png", "converted")),
        "n001/png_named.JPG": (encode_png(rgb), ("png", None)),
        "n001/empty.jpg": (b"", "zero-byte file"),
        "n003/corrupt.jpg": (_encode(rgb, "JPEG")[:300], "truncated/corrupt"),
        "n003/notes.jpg": (b"these are notes, not an image\n", "not an image"),
        "n003/huge.png": (_encode(Image.new("RGB", (1200, 1000)), "PNG"), "too large"),
    }
    for relative, (data, _) in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "README.txt").write_text("not part of any class")
    (root / "n001" / "labels.txt").write_text("ignored: no image extension")
    (root / "n001" / ".DS_Store").write_bytes(b"\x00\x01")
    return {"root": root, "files": files}


def test_image_folder_converts_or_quarantines_every_file(image_folder):
    root, files = image_folder["root"], image_folder["files"]
    report = QuarantineReport()
    samples = list(iter_image_folder(str(root), report=report, max_pixels=1_000_000))
    by_key = {s["__key__"]: s for s in samples}
    quarantined = {entry.key: entry for entry in report.quarantined}
    converted = {entry.key for entry in report.converted}
    wnid_ids = {"n001": 0, "n002": 1, "n003": 2}

    for relative, (data, expected) in files.items():
        key = sanitise_key(relative)
        if isinstance(expected, str):
            assert quarantined[relative].category == expected, relative
            assert quarantined[relative].stage == "read"
            assert key not in by_key
            continue
        field, conversion = expected
        sample = by_key[key]
        assert sample["cls"] == wnid_ids[relative.split("/")[0]]
        assert set(sample) == {"__key__", field, "cls"}, relative
        assert decode_image(sample[field]).mode == "RGB"
        if conversion:
            assert key in converted
            assert np.array_equal(
                np.asarray(decode_image(sample[field])), np.asarray(decode_image(data))
            )
        else:
            assert key not in converted
            assert sample[field] == data, f"{relative}: original bytes must be kept"

    counts = report.counts
    assert counts["read"] == len(files) == counts["yielded"] + report.num_quarantined("read")
    assert counts["yielded"] == len(samples) == 8
    assert counts["ignored"] == 2  # README.txt, labels.txt; hidden files are not even listed
    assert report.reasons() == {
        "not an image": 1,
        "too large": 1,
        "truncated/corrupt": 1,
        "zero-byte file": 1,
    }
    assert [s["__key__"] for s in samples] == sorted(s["__key__"] for s in samples)
    json.dumps(report.to_dict())


def test_image_for_storage_keeps_or_converts():
    rgb = Image.fromarray(_noise())
    jpeg = _encode(rgb, "JPEG")
    assert image_for_storage(jpeg, "a") == ("jpg", jpeg)
    report = QuarantineReport()
    field, data = image_for_storage(_encode(rgb.convert("CMYK"), "JPEG"), "b", report=report)
    assert field == "png" and Image.open(io.BytesIO(data)).mode == "RGB"
    assert [(e.key, e.source) for e in report.converted] == [("b", "jpeg CMYK")]
    with pytest.raises(BadImageError, match="zero-byte"):
        image_for_storage(b"", "c")


def test_image_folder_class_names(image_folder, tmp_path):
    root = image_folder["root"]
    assert image_folder_classes(root) == ["n001", "n002", "n003"]
    text = tmp_path / "synsets.txt"
    text.write_text("n001 goldfish, Carassius auratus\nn002 tench\nn003 great white shark\n")
    assert image_folder_classes(root, class_names_file=text) == [
        "goldfish",
        "tench",
        "great white shark",
    ]
    mapping = tmp_path / "names.json"
    mapping.write_text(json.dumps({"n003": "shark", "n001": ["goldfish", "carp"]}))
    # A wnid the file does not name falls back to the folder name.
    assert image_folder_classes(root, class_names_file=mapping) == ["goldfish", "n002", "shark"]
    ordered = tmp_path / "ordered.json"
    ordered.write_text(json.dumps(["a", "b", "c"]))
    assert image_folder_classes(root, class_names_file=str(ordered)) == ["a", "b", "c"]


def test_folder_to_shards_reconciles(image_folder, tmp_path):
    report = QuarantineReport()
    out = open_storage(tmp_path / "out")
    samples = iter_image_folder(image_folder["root"], report=report, max_pixels=1_000_000)
    keys = export_to_shards(samples, out, "folder", "train", samples_per_shard=3, report=report)
    assert keys == [shard_name("folder", "train", i) for i in range(3)]
    assert report.counts["read"] == report.counts["written"] + report.num_quarantined()
    assert report.counts["received"] == report.counts["yielded"] == report.counts["written"] == 8
    stored = out.read_json(split_report_key("folder", "train"))
    assert stored["this_run"]["num_quarantined"] == 4
    assert stored["export"]["counts"]["written"] == 8


def test_export_roundtrip_with_plain_webdataset(tmp_path):
    samples = list(make_split("glyphs", "val", seed=2, per_class=3))  # 15 samples
    out = open_storage(tmp_path / "glyphs")
    keys = export_to_shards(samples, out, "glyphs", "val", samples_per_shard=4, num_classes=5)
    assert keys == [shard_name("glyphs", "val", i) for i in range(4)]
    assert complete_shards(out, "glyphs", "val") == keys

    urls = [str(tmp_path / "glyphs" / key) for key in keys]
    dataset = webdataset.WebDataset(urls, shardshuffle=False, empty_check=False)
    read = list(dataset)
    assert [r["__key__"] for r in read] == [s["__key__"] for s in samples]
    for original, back in zip(samples, read, strict=True):
        assert back["png"] == original["png"]
        assert back["mask.png"] == original["mask.png"]
        assert int(back["cls"]) == original["cls"]

    manifest = read_manifest(out).to_pylist()
    assert [row["name"] for row in manifest] == keys
    assert [row["samples"] for row in manifest] == [4, 4, 4, 3]
    assert list(iter_webdataset(out, "glyphs", "val")) == samples


def test_export_with_num_shards_balances(tmp_path):
    samples = list(make_split("shapes", "test", per_class=2))  # 10 samples
    out = open_storage(tmp_path / "d")
    keys = export_to_shards(samples, out, "shapes", "test", num_shards=3)
    sizes = [row["samples"] for row in read_manifest(out).to_pylist()]
    assert len(keys) == 3 and sizes == [4, 3, 3]


def test_rerun_writes_nothing_new_and_fills_only_missing(tmp_path):
    samples = list(make_split("colours", "train", per_class=2))  # 10 samples
    root = tmp_path / "colours"
    out = open_storage(root)
    keys = export_to_shards(samples, out, "colours", "train", samples_per_shard=4)
    stamps = {key: (root / key).stat().st_mtime_ns for key in keys}
    digests = {key: out.completion_info(key)["sha256"] for key in keys}

    report = QuarantineReport()
    assert (
        export_to_shards(samples, out, "colours", "train", samples_per_shard=4, report=report)
        == keys
    )
    assert report.counts == {"received": 10, "skipped": 10}
    assert {key: (root / key).stat().st_mtime_ns for key in keys} == stamps

    # A crash before the marker of shard 1: only that shard is written again, identically.
    out.clear_complete(keys[1])
    (root / keys[1]).unlink()
    report = QuarantineReport()
    export_to_shards(samples, out, "colours", "train", samples_per_shard=4, report=report)
    assert report.counts == {"received": 10, "skipped": 6, "written": 4}
    assert (root / keys[0]).stat().st_mtime_ns == stamps[keys[0]]
    assert {key: out.completion_info(key)["sha256"] for key in keys} == digests
    summary = out.read_json(split_report_key("colours", "train"))["export"]
    assert summary["counts"] == {"received": 10, "written": 10}


def test_export_quarantines_bad_samples(tmp_path):
    good = list(make_split("textures", "val", per_class=1))  # 4 samples, classes 0..3
    png = good[0]["png"]
    bad = [
        {"__key__": "../escape", "png": png, "cls": 0},
        {"__key__": "/abs/path", "png": png, "cls": 0},
        {"__key__": "dotted.name", "png": png, "cls": 0},
        {"__key__": good[1]["__key__"], "png": png, "cls": 1},
        {"__key__": "label-high", "png": png, "cls": 4},
        {"__key__": "label-negative", "png": png, "cls": -1},
        {"__key__": "label-missing", "png": png},
        {"__key__": "no-image", "cls": 0},
        {"__key__": "corrupt", "png": png[:100], "cls": 0},
        {"__key__": "empty", "jpg": b"", "cls": 0},
    ]
    report = QuarantineReport()
    out = open_storage(tmp_path / "t")
    export_to_shards(good + bad, out, "textures", "val", num_classes=4, report=report)
    reasons = Counter(entry.category for entry in report.quarantined)
    assert reasons == {
        "bad key": 3,
        "duplicate key": 1,
        "label out of range": 2,
        "missing label": 1,
        "no single image field": 1,
        "truncated/corrupt": 1,
        "zero-byte file": 1,
    }
    assert report.counts["received"] == report.counts["written"] + report.num_quarantined()
    assert [s["__key__"] for s in iter_webdataset(out)] == [s["__key__"] for s in good]
    shard_report = out.read_json(shard_report_key(shard_name("textures", "val", 0)))
    assert shard_report["num_quarantined"] == len(bad)


def test_export_stores_image_under_its_real_format(tmp_path):
    jpeg = _encode(Image.fromarray(_noise()), "JPEG")
    webp_like = _encode(Image.fromarray(_noise()), "BMP")
    samples = [
        {"__key__": "a", "png": jpeg, "cls": 0},
        {"__key__": "b", "jpg": webp_like, "cls": 1},
    ]
    report = QuarantineReport()
    out = open_storage(tmp_path / "f")
    export_to_shards(samples, out, "mixed", "train", report=report)
    read = list(iter_webdataset(out, "mixed", "train"))
    assert read[0]["jpg"] == jpeg and "png" not in read[0]
    assert "jpg" not in read[1]
    assert np.array_equal(
        np.asarray(decode_image(read[1]["png"])), np.asarray(decode_image(webp_like))
    )
    assert len(report.converted) == 2


def test_iter_webdataset_skips_truncated_shard_and_bad_samples(tmp_path):
    samples = list(make_split("scenes", "test", per_class=2))  # 10 samples
    root = tmp_path / "s"
    out = open_storage(root)
    keys = export_to_shards(samples, out, "scenes", "test", samples_per_shard=4)
    # An extra complete shard holding an undecodable image, written outside export's checks.
    extra = shard_name("scenes", "test", 3)
    with ShardWriter(out, extra) as writer:
        writer.write({"__key__": "broken", "png": b"\x89PNG\r\n\x1a\nbroken", "cls": 0})
        writer.write({"__key__": "fine", "png": samples[0]["png"], "cls": 1})
    # Damage shard 1 after completion: a reader must not see any of its samples.
    data = (root / keys[1]).read_bytes()
    (root / keys[1]).write_bytes(data[: len(data) // 2])

    report = QuarantineReport()
    read = list(iter_webdataset(str(root), "scenes", "test", report=report))
    expected = [s["__key__"] for s in samples[:4] + samples[8:]] + ["fine"]
    assert [s["__key__"] for s in read] == expected
    assert report.counts["bad_shards"] == 1
    assert report.quarantined[0].key == keys[1] and report.quarantined[0].category == "bad shard"
    assert report.quarantined[1].key == f"{extra}:broken"
    assert report.counts["read"] == report.counts["yielded"] + 1

    # Without a name or split every complete shard of the folder is read.
    assert len(list(iter_webdataset(out))) == len(expected)
    assert list(iter_webdataset(out, "scenes", "train")) == []


def test_class_names_and_synthetic_domain_export(tmp_path):
    out = open_storage(tmp_path / "dom")
    write_class_names(out, ["tench", "goldfish"], wnids=["n1", "n2"])
    assert read_class_names(out) == ["tench", "goldfish"]
    assert out.read_json("classes.json")["wnids"] == ["n1", "n2"]

    shards = export_synthetic_domain(
        out,
        "shapes",
        splits=("train", "val"),
        per_class={"train": 3, "val": 1},
        samples_per_shard=8,
    )
    assert read_class_names(out) == list(SYNTHETIC_DOMAINS["shapes"].class_names)
    assert shards == {
        "train": [shard_name("shapes", "train", i) for i in range(2)],
        "val": [shard_name("shapes", "val", 0)],
    }
    manifest = read_manifest(out).to_pylist()
    assert sum(row["samples"] for row in manifest) == 20
    labels = Counter(s["cls"] for s in iter_webdataset(out, "shapes", "train"))
    assert labels == {c: 3 for c in range(5)}

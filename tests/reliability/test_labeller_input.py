"""Scenario 3b: adversarial labeller input never gives a shard that a reader cannot read.

Each test feeds the real build (``plan_build`` / ``label_shard`` / ``finalize_build``) an input
that used to end in an unreadable shard, a silent loss, a crash or a hang, and checks the output
with the project's ``read_shard`` *and* with plain ``webdataset``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import tarfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from reliability_helpers import build_config, shap_of

from storage import Storage, StorageError, open_storage
from storage.layout import shard_name, split_report_key
from storage.shards import ShardReadError, ShardWriter, read_shard
from tasks.build_dataset import finalize_build, label_shard, plan_build
from tasks.data.export import write_class_names
from tasks.data.images import BadImageError, decode_image


def _encode(img: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _noise(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _png(seed: int) -> bytes:
    return _encode(_noise(seed), "PNG")


def _build(tmp_path: Path, out: str = "out", **changes: Any) -> tuple[Any, list[Any], dict]:
    """Plan, label every shard and finalize; return the plan, the outcomes and the summary."""
    config = build_config(str(tmp_path / out), **changes)
    plan = plan_build(config)
    outcomes = [label_shard(plan, i) for i in range(config.num_shards)]
    return plan, outcomes, finalize_build(plan)


def _read_with_webdataset(plan: Any, decode: bool = False) -> list[dict[str, Any]]:
    """Every sample of the build's shards, read by plain webdataset (raises on a bad shard)."""
    dataset = open_storage(plan.dataset_uri)
    urls = [dataset.url(plan.shard_key(i)) for i in range(plan.config.num_shards)]
    pipeline = wds.WebDataset(urls, shardshuffle=False)
    if decode:
        pipeline = pipeline.decode()
    return list(pipeline)


def _read_with_read_shard(plan: Any) -> list[dict[str, Any]]:
    dataset = open_storage(plan.dataset_uri)
    return [
        sample
        for i in range(plan.config.num_shards)
        for sample in read_shard(dataset, plan.shard_key(i))
    ]


def _source(tmp_path: Path, classes: int = 2) -> Storage:
    source = open_storage(str(tmp_path / "source"))
    write_class_names(source, [f"class-{i}" for i in range(classes)])
    return source


def _write_source_shard(source: Storage, index: int, samples: list[dict[str, Any]]) -> str:
    key = shard_name("zoo", "val", index)
    with ShardWriter(source, key) as writer:
        for sample in samples:
            writer.write(sample)
    return key


def _webdataset_config(source: Storage, num_shards: int = 1) -> dict[str, Any]:
    return dict(
        input_kind="webdataset", input_uri=source.uri, input_name="zoo", num_shards=num_shards
    )


def _split_report(plan: Any) -> dict[str, Any]:
    return open_storage(plan.dataset_uri).read_json(
        split_report_key(plan.config.name, plan.config.split)
    )


# --- keys that collide --------------------------------------------------------------------


COLLIDING_FILES = ["a/a b.png", "a/a_b.png", "a/img.png", "a/img.jpg", "b/pic.bmp", "b/pic.webp"]


@pytest.mark.parametrize("num_shards", [1, 2])
def test_image_folder_names_that_clean_to_one_key_give_readable_shards(
    tmp_path: Path, num_shards: int
) -> None:
    root = tmp_path / "folder"
    formats = {".png": "PNG", ".jpg": "JPEG", ".bmp": "BMP", ".webp": "WEBP"}
    for seed, name in enumerate(COLLIDING_FILES):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(_encode(_noise(seed), formats[Path(name).suffix]))

    plan, outcomes, summary = _build(
        tmp_path, input_kind="imagefolder", input_uri=str(root), num_shards=num_shards
    )

    assert summary["samples"] == len(COLLIDING_FILES) and summary["quarantined"] == 0
    by_webdataset = _read_with_webdataset(plan)
    by_read_shard = _read_with_read_shard(plan)
    keys = [s["__key__"] for s in by_read_shard]
    assert [s["__key__"] for s in by_webdataset] == keys
    # Every file present once, under a key that says where it came from.
    assert sorted(keys) == ["a/a_b", "a/a_b_2", "a/img", "a/img_2", "b/pic", "b/pic_2"]
    assert all("shap.npy" in s and ("jpg" in s or "png" in s) for s in by_webdataset)


def test_duplicate_keys_in_webdataset_input_are_renamed_over_the_whole_listing(
    tmp_path: Path,
) -> None:
    source = _source(tmp_path)
    first = ["a", "dup", "b", "dup", "edge"]  # "dup" twice in one shard
    second = ["edge", "c"]  # "edge" ends shard 0 and starts shard 1
    _write_source_shard(
        source, 0, [{"__key__": k, "png": _png(i), "cls": i % 2} for i, k in enumerate(first)]
    )
    _write_source_shard(
        source, 1, [{"__key__": k, "png": _png(10 + i), "cls": 1} for i, k in enumerate(second)]
    )
    expected = ["a", "dup", "b", "dup_2", "edge", "edge_2", "c"]

    for num_shards in (1, 2):
        plan, _, summary = _build(
            tmp_path, f"out-{num_shards}", **_webdataset_config(source, num_shards)
        )
        assert summary["samples"] == len(expected) and summary["quarantined"] == 0
        # The same keys however the output is sharded: the renames are fixed in the plan.
        assert [s["__key__"] for s in _read_with_webdataset(plan)] == expected
        assert [s["__key__"] for s in _read_with_read_shard(plan)] == expected
    # A renamed sample keeps its own image and label.
    samples = {s["__key__"]: s for s in _read_with_read_shard(plan)}
    assert samples["dup_2"]["png"] == _png(3) and samples["edge_2"]["png"] == _png(10)


# --- truncated shards ---------------------------------------------------------------------


def _member_offsets(data: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [member.offset for member in tar.getmembers()]


def test_a_tar_cut_inside_a_member_header_is_a_bad_shard_not_a_shorter_one(
    tmp_path: Path,
) -> None:
    source = _source(tmp_path)
    samples = [{"__key__": f"s{i}", "png": _png(i), "cls": i % 2} for i in range(6)]
    cut = _write_source_shard(source, 0, samples)
    short = _write_source_shard(source, 1, samples[:2])
    good = _write_source_shard(source, 2, samples[:3])

    # Shard 0 is cut 100 bytes into the header of sample s3's first member, and its marker is
    # rewritten over the cut bytes, as a producer that wrote its marker after a failed upload
    # would: size and sha256 agree, only the sample count can tell.
    data = source.read_bytes(cut)
    header = _member_offsets(data)[3 * 2]  # two members (cls, png) per sample
    truncated = data[: header + 100]
    source.write_bytes(cut, truncated)
    source.mark_complete(
        cut,
        {"samples": 6, "bytes": len(truncated), "sha256": hashlib.sha256(truncated).hexdigest()},
    )
    # Without a marker at all the cut header is still caught; plain tarfile calls it the end.
    source.write_bytes("loose/cut.tar", truncated)
    with pytest.raises(ShardReadError, match="member header at byte"):
        list(read_shard(source, "loose/cut.tar"))
    assert len(list(wds.WebDataset(source.url("loose/cut.tar"), shardshuffle=False))) == 3
    # Shard 1 is a whole, valid tar whose marker promises one sample more than it holds.
    info = source.completion_info(short)
    source.mark_complete(short, {**info, "samples": 3})

    plan, outcomes, summary = _build(tmp_path, **_webdataset_config(source))

    report = _split_report(plan)
    entries = {e["key"]: e["reason"] for e in report["quarantined"]}
    assert entries[cut].startswith("bad shard") and "member header" in entries[cut]
    assert entries[short].startswith("bad shard") and "completion marker says 3" in entries[short]
    assert report["counts"]["bad_shards"] == 2
    # Only the intact shard's samples, all of them; no part of the damaged shards.
    assert [s["__key__"] for s in _read_with_read_shard(plan)] == ["s0", "s1", "s2"]
    assert summary["samples"] == 3
    assert good in {unit.rsplit("@", 1)[0] for unit in plan.units}


# --- fields that must not travel ----------------------------------------------------------


class _Payload:
    """Unpickling this creates a folder: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.mkdir, (str(self.marker),)


def test_non_image_members_of_webdataset_input_are_not_copied(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    payload = pickle.dumps(_Payload(marker))
    mask = _encode(Image.new("L", (40, 30), 255), "PNG")
    source = _source(tmp_path)
    _write_source_shard(
        source,
        0,
        [
            {
                "__key__": f"s{i}",
                "png": _png(i),
                "cls": i % 2,
                "mask.png": mask,
                "pickle": payload,
                "pth": payload,
                "pyd": payload,
                "txt": b"caption",
                "json": b'{"from": "input"}',
            }
            for i in range(3)
        ],
    )
    # The input really carries the payload (read raw, nothing decoded).
    assert all("pickle" in s for s in read_shard(source, shard_name("zoo", "val", 0)))

    plan, _, summary = _build(tmp_path, **_webdataset_config(source))

    assert summary["samples"] == 3
    raw = _read_with_webdataset(plan)
    assert {frozenset(k for k in s if not k.startswith("__")) for s in raw} == {
        frozenset({"png", "cls", "mask.png", "shap.npy", "game.npz", "json"})
    }
    # webdataset's default decoder unpickles .pickle/.pyd/.pth: safe here, nothing to run.
    decoded = _read_with_webdataset(plan, decode=True)
    assert len(decoded) == 3 and not marker.exists()
    assert all(s["json"]["model"] == plan.model_fingerprint for s in decoded)
    assert all(s["mask.png"] == mask for s in decoded)  # the mask travels, bytes unchanged


# --- names, files and members that are not what they seem ---------------------------------


def test_a_file_name_that_is_not_utf8_is_quarantined_and_the_rest_goes_on(
    tmp_path: Path,
) -> None:
    root = tmp_path / "folder"
    (root / "a").mkdir(parents=True)
    (root / "a" / "good.png").write_bytes(_png(0))
    (root / "b").mkdir()
    (root / "b" / "fine.png").write_bytes(_png(1))
    bad_name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes, not UTF-8
    try:
        (root / "b" / bad_name).write_bytes(_png(2))
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses names that are not UTF-8")

    plan, _, summary = _build(tmp_path, input_kind="imagefolder", input_uri=str(root))

    assert summary["samples"] == 2 and summary["quarantined"] == 1
    assert sorted(s["__key__"] for s in _read_with_read_shard(plan)) == ["a/good", "b/fine"]
    entry = _split_report(plan)["quarantined"][0]
    assert entry == {
        "key": "b/caf\\xe9.png",
        "reason": "bad file name: not valid UTF-8",
        "stage": "list",
    }


def test_a_fifo_in_the_input_folder_is_skipped_and_planning_does_not_block(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "folder"
    (root / "a").mkdir(parents=True)
    (root / "a" / "good.png").write_bytes(_png(0))
    (root / "b").mkdir()
    (root / "b" / "fine.png").write_bytes(_png(1))
    fifo = root / "b" / "pipe.jpg"
    os.mkfifo(fifo)
    result: dict[str, Any] = {}

    def build() -> None:
        try:
            result["plan"], _, result["summary"] = _build(
                tmp_path, input_kind="imagefolder", input_uri=str(root)
            )
        except BaseException as exc:  # reported below, in the test's own thread
            result["error"] = exc

    caplog.set_level(logging.WARNING, logger="storage.local")
    worker = threading.Thread(target=build, daemon=True)
    worker.start()
    worker.join(timeout=120)
    try:
        assert not worker.is_alive(), "the build blocked on the FIFO"
    finally:
        # Give a reader stuck in open() its writer, so a failing run does not leave it hanging.
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    assert "error" not in result, result.get("error")
    assert result["summary"]["samples"] == 2
    assert "skipped 1 entries" in caplog.text and "pipe.jpg" in caplog.text
    storage = open_storage(str(root))
    assert "b/pipe.jpg" not in storage.list()
    with pytest.raises(StorageError, match="not a regular file"):
        storage.read_bytes("b/pipe.jpg")


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes | None, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    if data is None:
        info.type, info.linkname = tarfile.SYMTYPE, link
        tar.addfile(info)
    else:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def test_webdataset_images_under_other_extensions_or_behind_a_symlink_member(
    tmp_path: Path,
) -> None:
    source = _source(tmp_path)
    jpeg = _encode(_noise(1), "JPEG", quality=90)
    webp = _encode(_noise(2), "WEBP")
    members: list[tuple[str, bytes | None]] = [
        ("j.cls", b"0"),
        ("j.jpeg", jpeg),  # a JPEG under .jpeg: kept, bytes unchanged
        ("w.cls", b"1"),
        ("w.webp", webp),  # converted to PNG, recorded
        ("b.cls", b"0"),
        ("b.bmp", _encode(_noise(3), "BMP")),
        ("link.cls", b"1"),
        ("link.png", None),  # a symlink member: no image
        ("broken.cls", b"0"),
        ("broken.tiff", b"II*\x00 not really a tiff"),
        ("two.cls", b"0"),
        ("two.jpeg", jpeg),
        ("two.png", _png(4)),  # two images: which one is the sample's?
    ]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            _tar_member(tar, name, data, link="/etc/passwd")
    key = shard_name("zoo", "val", 0)
    source.write_bytes(key, buffer.getvalue())
    source.mark_complete(
        key,
        {
            "samples": 6,
            "bytes": len(buffer.getvalue()),
            "sha256": hashlib.sha256(buffer.getvalue()).hexdigest(),
        },
    )

    plan, outcomes, summary = _build(tmp_path, **_webdataset_config(source))

    samples = {s["__key__"]: s for s in _read_with_read_shard(plan)}
    assert sorted(samples) == ["b", "j", "w"]
    assert samples["j"]["jpg"] == jpeg
    assert "png" in samples["w"] and "png" in samples["b"]
    assert Image.open(io.BytesIO(samples["w"]["png"])).size == (40, 30)
    assert all(np.isfinite(shap_of(s)).all() for s in samples.values())
    assert len(_read_with_webdataset(plan)) == 3
    report = outcomes[0].report
    entries = {e["key"].rsplit(":", 1)[-1]: e["reason"] for e in report["quarantined"]}
    assert entries.keys() == {"link", "broken", "two"}
    assert "not regular files: png" in entries["link"]
    assert entries["broken"].startswith(("not an image", "truncated/corrupt"))
    assert entries["two"].startswith("no single image field")
    assert {c["key"] for c in report["converted"]} == {"w", "b"}
    assert summary["samples"] + summary["quarantined"] == 6


def test_an_extreme_aspect_ratio_is_quarantined_before_any_resize(tmp_path: Path) -> None:
    strip = _encode(Image.new("RGB", (1, 100_000), (200, 10, 10)), "PNG")
    assert len(strip) < 2_000  # tiny on disk; 56 x 5.6M pixels once resized
    with pytest.raises(BadImageError, match=r"extreme aspect ratio: 1x100000"):
        decode_image(strip)

    root = tmp_path / "folder"
    (root / "a").mkdir(parents=True)
    (root / "a" / "strip.png").write_bytes(strip)
    (root / "a" / "wide.png").write_bytes(_encode(_noise(0, (400, 40)), "PNG"))  # 10:1 is fine
    (root / "a" / "good.png").write_bytes(_png(1))

    plan, _, summary = _build(tmp_path, input_kind="imagefolder", input_uri=str(root))

    assert sorted(s["__key__"] for s in _read_with_read_shard(plan)) == ["a/good", "a/wide"]
    assert [(e["key"], e["reason"]) for e in _split_report(plan)["quarantined"]] == [
        ("a/strip.png", "extreme aspect ratio: 1x100000")
    ]
    assert summary["samples"] + summary["quarantined"] == 3

"""Shards: written with TarWriter, published then marked, read back by us and by plain webdataset."""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
import threading
import time

import numpy as np
import pytest
import webdataset
from PIL import Image

from storage import ObjectNotFoundError, ShardReadError, open_storage
from storage.layout import shard_name
from storage.shards import ShardWriter, complete_shards, read_manifest, read_shard, write_manifest


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _samples(count: int, offset: int = 0) -> list[dict]:
    samples = []
    for i in range(offset, offset + count):
        shap = np.random.default_rng(i).standard_normal((2, 7, 7)).astype(np.float32)
        shap_buffer = io.BytesIO()
        np.save(shap_buffer, shap)
        samples.append(
            {
                "__key__": f"{i:06d}",
                "png": _png(i),
                "cls": i % 5,
                "shap.npy": shap_buffer.getvalue(),
                "json": json.dumps({"classes": [i % 5], "budget": 150}).encode(),
            }
        )
    return samples


def _write_shard(storage, key, samples):
    with ShardWriter(storage, key) as writer:
        for sample in samples:
            writer.write(sample)
    return writer


def test_shard_name_is_zero_padded_and_sortable():
    assert shard_name("imagenet-x", "train", 42) == "imagenet-x-train-000042.tar"
    names = [shard_name("d", "val", i) for i in (10, 2, 100)]
    assert sorted(names) == [shard_name("d", "val", i) for i in (2, 10, 100)]
    with pytest.raises(ValueError):
        shard_name("d", "val", -1)


def test_write_read_round_trip(storage_uri):
    storage = open_storage(storage_uri)
    samples = _samples(5)
    key = shard_name("dom", "train", 0)
    writer = _write_shard(storage, key, samples)

    assert writer.samples == 5
    data = storage.read_bytes(key)
    assert writer.sha256 == hashlib.sha256(data).hexdigest()
    assert storage.completion_info(key) == {
        "samples": 5,
        "bytes": len(data),
        "sha256": writer.sha256,
        # The keys at a glance: what lets a planner prove keys unique without reading shards.
        "first_key": "000000",
        "last_key": "000004",
        "keys_increasing": True,
    }
    read = list(read_shard(storage, key))
    assert read == samples
    assert all(isinstance(sample["cls"], int) for sample in read)
    shap = np.load(io.BytesIO(read[3]["shap.npy"]))
    assert shap.dtype == np.float32 and shap.shape == (2, 7, 7)


def test_plain_webdataset_reads_our_shards(storage_uri):
    storage = open_storage(storage_uri)
    samples = _samples(4)
    key = shard_name("dom", "test", 3)
    _write_shard(storage, key, samples)
    with storage.local_copy(key) as path:
        dataset = webdataset.WebDataset(str(path), shardshuffle=False)
        read = list(dataset)
        decoded = next(iter(webdataset.WebDataset(str(path), shardshuffle=False).decode("rgb")))
    assert decoded["png"].shape == (8, 8, 3)
    assert [s["__key__"] for s in read] == [s["__key__"] for s in samples]
    for ours, theirs in zip(samples, read, strict=True):
        assert theirs["png"] == ours["png"]
        assert theirs["shap.npy"] == ours["shap.npy"]
        assert theirs["json"] == ours["json"]
        assert int(theirs["cls"]) == ours["cls"]


def test_plain_webdataset_decode_after_local_copy(tmp_path):
    storage = open_storage(str(tmp_path))
    _write_shard(storage, "d-train-000000.tar", _samples(2))
    dataset = webdataset.WebDataset(storage.url("d-train-000000.tar"), shardshuffle=False)
    first = next(iter(dataset.decode("rgb")))
    assert first["png"].shape == (8, 8, 3)
    assert first["cls"] == 0


def test_a_writer_that_raises_leaves_nothing_visible(storage_uri, tmp_path):
    storage = open_storage(storage_uri)
    key = shard_name("dom", "train", 1)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    writer = ShardWriter(storage, key, temp_dir=str(scratch))
    with pytest.raises(RuntimeError, match="boom"):
        with writer:
            for i, sample in enumerate(_samples(3)):
                if i == 2:
                    raise RuntimeError("boom")
                writer.write(sample)
    assert not storage.exists(key)
    assert not storage.is_complete(key)
    assert storage.list() == []
    assert complete_shards(storage, "dom", "train") == []
    assert writer.samples == 2
    assert list(scratch.iterdir()) == [], "the local temporary tar must be removed"


def test_rewriting_a_shard_replaces_object_and_marker(storage_uri):
    storage = open_storage(storage_uri)
    key = shard_name("dom", "train", 0)
    _write_shard(storage, key, _samples(2))
    second = _write_shard(storage, key, _samples(3, offset=10))
    assert storage.completion_info(key)["sha256"] == second.sha256
    assert [s["__key__"] for s in read_shard(storage, key)] == ["000010", "000011", "000012"]


def test_deterministic_shard_bytes(tmp_path):
    first = _write_shard(open_storage(str(tmp_path / "a")), "d-train-000000.tar", _samples(3))
    second = _write_shard(open_storage(str(tmp_path / "b")), "d-train-000000.tar", _samples(3))
    assert first.sha256 == second.sha256


def test_truncated_shard_raises_shard_read_error(storage_uri):
    storage = open_storage(storage_uri)
    key = shard_name("dom", "train", 0)
    _write_shard(storage, key, _samples(4))
    data = storage.read_bytes(key)
    # Cut inside a member's data: tar itself notices.
    storage.write_bytes("cut/mid.tar", data[: len(data) // 2 + 100])
    with pytest.raises(ShardReadError, match="cut/mid.tar"):
        list(read_shard(storage, "cut/mid.tar"))
    # Cut exactly on a member boundary: tarfile would call it the end of the archive, but the
    # end-of-archive block is missing.
    boundary = _member_boundary(data)
    storage.write_bytes("cut/boundary.tar", data[:boundary])
    with pytest.raises(ShardReadError, match="member header at byte .* is missing"):
        list(read_shard(storage, "cut/boundary.tar"))
    # The completion marker tells too.
    storage.write_bytes(key, data[:boundary])
    with pytest.raises(ShardReadError, match="truncated or corrupt|completion marker"):
        list(read_shard(storage, key))


def _member_boundary(data: bytes) -> int:
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    return members[len(members) // 2].offset


def test_reading_a_missing_shard(storage_uri):
    storage = open_storage(storage_uri)
    with pytest.raises(ObjectNotFoundError):
        list(read_shard(storage, shard_name("dom", "train", 9)))


def test_complete_shards_and_manifest(storage_uri):
    storage = open_storage(storage_uri)
    for index in (2, 0, 1):
        _write_shard(storage, shard_name("dom", "train", index), _samples(index + 1, offset=index))
    _write_shard(storage, shard_name("dom", "val", 0), _samples(1))
    _write_shard(storage, shard_name("other", "train", 0), _samples(1))
    # A tar without its marker, as a crash between upload and marker would leave it.
    with tempfile.NamedTemporaryFile(suffix=".tar") as handle:
        handle.write(b"\0" * 1024)
        handle.flush()
        storage.upload_file(handle.name, shard_name("dom", "train", 3))

    shards = complete_shards(storage, "dom", "train")
    assert shards == [shard_name("dom", "train", i) for i in range(3)]

    table = write_manifest(storage, shards)
    manifest = read_manifest(storage)
    assert manifest.equals(table)
    assert manifest.column_names == ["name", "samples", "bytes", "sha256"]
    rows = manifest.to_pylist()
    assert [row["name"] for row in rows] == shards
    assert [row["samples"] for row in rows] == [1, 2, 3]
    for row in rows:
        data = storage.read_bytes(row["name"])
        assert row["bytes"] == len(data)
        assert row["sha256"] == hashlib.sha256(data).hexdigest()

    with pytest.raises(ObjectNotFoundError, match="completion marker"):
        write_manifest(storage, [*shards, shard_name("dom", "train", 3)])


def test_marker_says_whether_the_keys_increase(tmp_path):
    storage = open_storage(str(tmp_path))
    samples = _samples(3)
    _write_shard(storage, "d-train-000000.tar", [samples[1], samples[0], samples[2]])
    _write_shard(storage, "d-train-000001.tar", [samples[0], samples[0]])  # repeated key
    dotted = {**samples[2], "__key__": "a/b.c"}  # reads back as key "a/b": no promise
    _write_shard(storage, "d-train-000002.tar", [samples[0], dotted])
    _write_shard(storage, "d-train-000003.tar", [])
    infos = [storage.completion_info(f"d-train-00000{i}.tar") for i in range(4)]
    assert [info.get("keys_increasing") for info in infos] == [False, False, False, None]
    assert (infos[0]["first_key"], infos[0]["last_key"]) == ("000001", "000002")
    assert "first_key" not in infos[3] and infos[3]["samples"] == 0


def test_manifest_reads_markers_concurrently_or_not_at_all(tmp_path, monkeypatch):
    storage = open_storage(str(tmp_path))
    shards = [shard_name("dom", "train", i) for i in range(12)]
    for index, key in enumerate(shards):
        _write_shard(storage, key, _samples(1, offset=index))
    reads: list[str] = []
    threads: set[int] = set()
    original = type(storage).read_bytes

    def read_bytes(self, key):
        reads.append(key)
        threads.add(threading.get_ident())
        time.sleep(0.01)  # a request's latency: calls overlap only if they run concurrently
        return original(self, key)

    monkeypatch.setattr(type(storage), "read_bytes", read_bytes)
    table = write_manifest(storage, shards)
    # One read per marker and nothing else (no existence checks), spread over a thread pool.
    assert sorted(reads) == sorted(f"_completions/{key}.json" for key in shards)
    assert len(threads) > 1
    reads.clear()
    infos = {key: storage.completion_info(key) for key in shards}
    reads.clear()
    assert write_manifest(storage, shards, infos=infos).equals(table)
    assert reads == []  # the markers the caller had were not read again


def test_a_split_is_listed_with_its_markers_read_concurrently(tmp_path, monkeypatch):
    from tasks.data.stream import list_split

    storage = open_storage(str(tmp_path))
    shards = [shard_name("dom", "train", i) for i in range(6)]
    for index, key in enumerate(shards):
        _write_shard(storage, key, _samples(2, offset=2 * index))
    sequential = list_split(str(tmp_path), "train")
    # Every marker read waits for a second one: read one after another, the barrier breaks.
    barrier = threading.Barrier(2, timeout=10)
    original = type(storage).read_bytes

    def read_bytes(self, key):
        if key.startswith("_completions/"):
            barrier.wait()
        return original(self, key)

    monkeypatch.setattr(type(storage), "read_bytes", read_bytes)
    listed = list_split(str(tmp_path), "train")
    assert listed == sequential
    assert listed.shards == tuple(shards) and listed.counts == (2,) * 6
    assert all(len(digest) == 64 for digest in listed.digests)

"""Reading and decoding ahead of the model changes nothing but speed.

The labeller with several decode workers writes the same bytes (shards and quarantine reports)
as with one, quarantines a corrupt image met by a worker exactly as the serial path does, and an
interrupted run leaves no thread behind and no shard published.
"""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from reliability_helpers import build_config

from storage import open_storage
from storage.layout import shard_name, shard_report_key
from storage.shards import ShardWriter
from tasks.build_dataset import BuildConfig, label_shard, plan_build
from tasks.data.export import write_class_names
from tasks.data.prefetch import THREAD_PREFIX

WORKERS = 3


def _jpeg(seed: int, size: tuple[int, int] = (50, 38)) -> bytes:
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    img = Image.fromarray(low).resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


CORRUPT = _jpeg(99, (64, 64))[:500]


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


def _build_bytes(config: BuildConfig) -> tuple[str, dict[str, bytes]]:
    """Label every shard; the version and the bytes of every shard and shard report."""
    plan = plan_build(config)
    dataset = open_storage(plan.dataset_uri)
    files = {}
    for index in range(config.num_shards):
        label_shard(plan, index)
        shard = plan.shard_key(index)
        files[shard] = dataset.read_bytes(shard)
        files[shard_report_key(shard)] = dataset.read_bytes(shard_report_key(shard))
    return plan.version, files


@pytest.fixture
def webdataset_input(tmp_path: Path) -> str:
    """Two input shards of JPEGs; a corrupt image and a bad label among them."""
    source = open_storage(str(tmp_path / "source"))
    write_class_names(source, ["circle", "square", "star"])
    for index in range(2):
        with ShardWriter(source, shard_name("zoo", "val", index)) as writer:
            for i in range(9):
                n = index * 9 + i
                sample = {"__key__": f"img-{n:03d}", "jpg": _jpeg(n), "cls": n % 3}
                if n == 5:
                    sample["jpg"] = CORRUPT  # passes the reader (validate=False), fails decoding
                if n == 12:
                    sample["cls"] = 7
                writer.write(sample)
    return source.uri


def _webdataset_config(tmp_path: Path, input_uri: str, workers: int, **changes) -> BuildConfig:
    fields = dict(
        input_kind="webdataset",
        input_uri=input_uri,
        input_name="zoo",
        num_shards=2,
        decode_workers=workers,
    )
    fields.update(changes)
    return build_config(str(tmp_path / f"out-{workers}"), **fields)


def test_several_decode_workers_write_the_same_bytes_and_quarantine_the_same_way(
    tmp_path: Path, webdataset_input: str
) -> None:
    serial_version, serial = _build_bytes(_webdataset_config(tmp_path, webdataset_input, 1))
    version, parallel = _build_bytes(_webdataset_config(tmp_path, webdataset_input, WORKERS))

    assert version == serial_version  # decode_workers is not part of the dataset version
    assert parallel.keys() == serial.keys()
    for key in serial:
        assert parallel[key] == serial[key], key
    report = open_storage(str(tmp_path / f"out-{WORKERS}"))  # the reports say it plainly too
    entries = []
    for key in sorted(k for k in parallel if k.startswith("reports/")):
        entries += report.child(f"shapes-x/{version}").read_json(key)["quarantined"]
    assert [(e["key"], e["stage"]) for e in entries] == [
        ("img-005", "label"),
        ("img-012", "label"),
    ]
    assert entries[0]["reason"].startswith("truncated/corrupt")
    assert entries[1]["reason"] == "label out of range: 7 not in [0, 3)"
    assert _prefetch_threads() == []


def test_an_image_folder_gives_the_same_bytes_with_one_and_several_workers(
    tmp_path: Path,
) -> None:
    root = tmp_path / "folder"
    for n in range(14):
        path = root / ("a" if n % 2 else "b") / f"{n:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(CORRUPT if n == 6 else _jpeg(n))
    (root / "a" / "empty.jpg").write_bytes(b"")
    outputs = []
    for workers in (1, WORKERS):
        config = build_config(
            str(tmp_path / f"out-{workers}"),
            input_kind="imagefolder",
            input_uri=str(root),
            num_shards=2,
            decode_workers=workers,
        )
        outputs.append(_build_bytes(config))
    assert outputs[0] == outputs[1]
    # Folder files are validated as they are read (by the read workers here).
    reports = [json.loads(v) for k, v in outputs[1][1].items() if k.startswith("reports/")]
    entries = [(e["key"], e["stage"], e["reason"]) for r in reports for e in r["quarantined"]]
    assert entries == [
        ("a/empty.jpg", "read", "zero-byte file"),
        ("b/006.jpg", "read", "truncated/corrupt: Truncated File Read"),
    ]


def test_an_interrupted_run_leaves_no_thread_and_no_shard(
    tmp_path: Path, webdataset_input: str
) -> None:
    config = _webdataset_config(tmp_path, webdataset_input, WORKERS, num_shards=1)
    plan = plan_build(config)
    dataset = open_storage(plan.dataset_uri)
    before = set(threading.enumerate())
    seen = []

    def stop_after_the_second_batch(done: int, total: int) -> None:
        seen.append(done)
        assert _prefetch_threads(), "the readers should be running ahead"
        if len(seen) == 2:
            raise KeyboardInterrupt("interrupted mid-shard")

    with pytest.raises(KeyboardInterrupt):
        label_shard(plan, 0, progress=stop_after_the_second_batch)
    assert seen == [2, 4]
    assert _prefetch_threads() == []
    assert set(threading.enumerate()) <= before
    assert not dataset.is_done(plan.shard_key(0), plan.version, plan.shard_key(0))
    assert not dataset.exists(plan.shard_key(0))


def test_a_reader_failure_in_a_worker_fails_the_shard_and_leaves_no_thread(
    tmp_path: Path, webdataset_input: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tasks.build_dataset.inputs as inputs

    config = _webdataset_config(tmp_path, webdataset_input, WORKERS, num_shards=1)
    plan = plan_build(config)
    read = inputs.read_shard_samples

    def fail_on_the_second_shard(storage, shard, *args, **kwargs):
        if shard.endswith("000001.tar"):
            raise ConnectionError("input storage dropped the connection")
        return read(storage, shard, *args, **kwargs)

    monkeypatch.setattr(inputs, "read_shard_samples", fail_on_the_second_shard)
    before = set(threading.enumerate())
    with pytest.raises(ConnectionError, match="dropped the connection"):
        label_shard(plan, 0)
    assert _prefetch_threads() == []
    assert set(threading.enumerate()) <= before
    dataset = open_storage(plan.dataset_uri)
    assert not dataset.exists(plan.shard_key(0))


def test_the_readers_run_a_bounded_distance_ahead_of_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tasks.build_dataset.inputs as inputs

    root = tmp_path / "folder"
    (root / "a").mkdir(parents=True)
    for n in range(200):
        (root / "a" / f"{n:03d}.jpg").write_bytes(_jpeg(n % 7))
    config = build_config(
        str(tmp_path / "out"),
        input_kind="imagefolder",
        input_uri=str(root),
        num_shards=1,
        decode_workers=2,
    )
    plan = plan_build(config)
    read = inputs.read_image_file
    reads = []

    def counted(*args, **kwargs):
        reads.append(args[1])
        return read(*args, **kwargs)

    monkeypatch.setattr(inputs, "read_image_file", counted)
    ahead = []

    def slow_model(done: int, total: int) -> None:
        time.sleep(1.0)  # ample time for unbounded readers to read everything
        ahead.append(len(reads) - done)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        label_shard(plan, 0, progress=slow_model)
    # 2 workers, batches of 2: 8 files being read, 8 being decoded, 3 to 4 batches queued, and
    # in the labeller's stream 3 * depth + 2 = 8 batches (2 pulled ahead of the model, 1 + 2
    # handed to the solver, 1 + 2 solved for the writer).
    assert ahead and ahead[0] <= 8 + 8 + 4 * 2 + 8 * 2
    assert _prefetch_threads() == []

"""Determinism across executors: a thread pool and a Dask LocalCluster build the same bytes.

Bitwise equality needs the same numeric environment. Dask's nanny starts every worker with
``OMP_NUM_THREADS=1``, and CPU kernels round differently with another intra-op thread count (the
zero-shot head then differs by an ulp), so the thread-pool run here uses one torch thread too.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import tasks.build_dataset
from flows.runners import RunnerConfig
from storage import open_storage
from storage.shards import complete_shards, read_manifest, read_shard
from tasks.build_dataset import BuildConfig, LabelConfig


def _config(output_uri: str) -> BuildConfig:
    return BuildConfig(
        name="shapes-x",
        split="val",
        input_kind="synthetic",
        input_uri="shapes",
        synthetic_per_class=2,
        output_uri=output_uri,
        num_shards=2,
        device="cpu",
        label=LabelConfig(grid_h=3, grid_w=3, budget=20, images_per_batch=4),
    )


def _labels(dataset_uri: str) -> dict[str, bytes]:
    dataset = open_storage(dataset_uri)
    return {
        sample["__key__"]: sample["shap.npy"]
        for shard in complete_shards(dataset, "shapes-x", "val")
        for sample in read_shard(dataset, shard)
    }


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """The intra-op thread count of a Dask worker, and a model cache built under it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tasks.build_dataset.clear_model_cache()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        tasks.build_dataset.clear_model_cache()


@pytest.mark.slow
def test_thread_pool_and_dask_processes_build_identical_datasets(
    tmp_path: Path, one_torch_thread: None
) -> None:
    from flows.build_dataset import build_explanation_dataset

    threads = build_explanation_dataset(
        _config(str(tmp_path / "threads")), runner=RunnerConfig(kind="thread")
    )
    # Two worker processes: each rebuilds the explained model and labels one shard.
    dask = build_explanation_dataset(
        _config(str(tmp_path / "dask")), runner=RunnerConfig(kind="dask", max_workers=2)
    )

    assert threads["missing"] == dask["missing"] == []
    assert threads["version"] == dask["version"]
    manifests = [read_manifest(open_storage(s["dataset_uri"])) for s in (threads, dask)]
    assert manifests[0].column("sha256").to_pylist() == manifests[1].column("sha256").to_pylist()
    labels = [_labels(s["dataset_uri"]) for s in (threads, dask)]
    assert labels[0] == labels[1] and len(labels[0]) == threads["inputs"] == 10

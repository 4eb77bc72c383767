"""Every Dask worker labels on its own GPU, and asking for CUDA never ends on the CPU.

This machine has no GPU: the device list is faked (``CUDA_VISIBLE_DEVICES``,
``torch.cuda.is_available`` and ``device_count``), and what is checked is which GPUs each
worker process is given and what ``cuda`` resolves to there. The worker processes are real
(a :class:`GPULocalCluster` on loopback).
"""

from __future__ import annotations

import os

import pytest
import torch
from distributed import Client

from flows.runners import (
    GPULocalCluster,
    RunnerConfig,
    make_task_runner,
    visible_gpus,
    worker_gpu_blocks,
)
from tasks.build_dataset import BuildConfig, LabelConfig, plan_build
from tasks.config import WORKER_GPUS_ENV, resolve_device


def test_the_gpus_to_hand_out_are_the_environment_s_else_the_driver_s(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3,GPU-5f1e")
    assert visible_gpus() == ["2", "3", "GPU-5f1e"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,-1,1")  # CUDA stops at an invalid entry
    assert visible_gpus() == ["0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert visible_gpus() == ["0", "1", "2", "3"]


def test_workers_get_disjoint_blocks_of_gpus_or_a_clear_refusal() -> None:
    gpus = [str(i) for i in range(8)]
    assert worker_gpu_blocks(4, 2, gpus) == [["0", "1"], ["2", "3"], ["4", "5"], ["6", "7"]]
    assert worker_gpu_blocks(3, 1, ["7", "5", "3"]) == [["7"], ["5"], ["3"]]
    with pytest.raises(ValueError, match=r"3 Dask workers with 1 GPU\(s\) each need 3 GPUs, but"):
        worker_gpu_blocks(3, 1, ["0", "1"])


def test_a_local_gpu_cluster_is_refused_before_it_starts_when_gpus_are_short(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ValueError, match="need 4 GPUs, but this machine shows 2"):
        make_task_runner(RunnerConfig(kind="dask", max_workers=4, gpus_per_worker=1))
    runner = make_task_runner(RunnerConfig(kind="dask", max_workers=2, gpus_per_worker=1))
    assert runner.cluster_class is GPULocalCluster
    assert (runner.cluster_kwargs["gpus"], runner.cluster_kwargs["gpus_per_worker"]) == (
        ["0", "1"],
        1,
    )
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ValueError, match="shows 0"):
        make_task_runner(RunnerConfig(kind="dask", max_workers=1, gpus_per_worker=1))
    # Without GPUs asked for, a local cluster is Dask's own.
    assert make_task_runner(RunnerConfig(kind="dask")).cluster_class == "distributed.LocalCluster"


def _worker_view() -> tuple[str, str, str, str]:
    """In a worker: its CUDA_VISIBLE_DEVICES, its given GPUs, and what cuda / auto resolve to."""
    seen = []
    for setting in ("cuda", "auto"):
        try:
            seen.append(str(resolve_device(setting)))
        except RuntimeError as exc:
            seen.append(str(exc))
    return os.environ["CUDA_VISIBLE_DEVICES"], os.environ[WORKER_GPUS_ENV], *seen


@pytest.mark.slow
def test_each_worker_process_sees_only_its_own_gpu_and_never_falls_back_to_the_cpu() -> None:
    with (
        GPULocalCluster(
            2, gpus=["4", "6"], threads_per_worker=1, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        views = list(client.run(_worker_view).values())
        resources = [w["resources"] for w in client.scheduler_info()["workers"].values()]
    assert sorted((visible, given) for visible, given, _, _ in views) == [("4", "4"), ("6", "6")]
    assert resources == [{"GPU": 1}, {"GPU": 1}]
    # These workers were given a GPU they cannot use (there is none here): `cuda` and `auto`
    # alike refuse with the worker's GPU named, instead of labelling on the CPU.
    for visible, _, cuda, auto in views:
        for message in (cuda, auto):
            assert "sees no usable GPU" in message, message
            assert f"CUDA_VISIBLE_DEVICES={visible}, a worker given GPUs {visible}" in message


def test_cuda_in_a_gpu_worker_is_its_own_first_visible_device(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6")
    monkeypatch.setenv(WORKER_GPUS_ENV, "6")
    assert resolve_device("cuda") == resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(RuntimeError, match="'cuda:1' was asked for .* sees 1 GPU"):
        resolve_device("cuda:1")
    assert resolve_device("cpu") == torch.device("cpu")  # the CPU only when asked for


def test_outside_a_gpu_worker_auto_may_be_the_cpu_but_cuda_may_not(monkeypatch) -> None:
    monkeypatch.delenv(WORKER_GPUS_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="'cuda' was asked for .* sees no usable GPU"):
        resolve_device("cuda")


def test_a_build_asked_for_cuda_without_a_gpu_fails_at_planning(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = BuildConfig(
        name="shapes-x",
        input_uri="shapes",
        synthetic_per_class=1,
        label=LabelConfig(grid_h=2, grid_w=2, budget=8, top_k=0),
        num_shards=1,
        output_uri=str(tmp_path / "xdata"),
        device="cuda",
    )
    with pytest.raises(RuntimeError, match="refusing to run on the CPU instead"):
        plan_build(config)

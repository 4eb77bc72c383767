"""Every data-parallel rank trains on its own device, and asking for CUDA never ends on the CPU.

The GPUs are faked (``torch.cuda.is_available``, ``device_count``, ``set_device``): this
machine has none, and the rule is about which device each rank picks, not about CUDA itself.
"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from tasks import distributed
from tasks.distributed import Topology, backend_for, launch, rank_device
from tasks.finetune import FinetuneConfig


@pytest.fixture
def gpus(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Four fake GPUs; returns the list of ``torch.cuda.set_device`` calls."""
    current: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    return current


@pytest.mark.parametrize("setting", ["cuda", "auto"])
def test_each_local_rank_takes_its_own_gpu(gpus, monkeypatch, setting) -> None:
    devices = []
    for local_rank in range(4):
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        devices.append(rank_device(setting))
    assert devices == [torch.device("cuda", i) for i in range(4)]
    assert gpus == [0, 1, 2, 3]  # each made its rank's current device
    assert {backend_for(device) for device in devices} == {"nccl"}


def test_more_ranks_than_gpus_is_a_clear_error(gpus) -> None:
    with pytest.raises(RuntimeError, match="LOCAL_RANK 4 has no GPU of its own: 4 visible"):
        rank_device("cuda", local_rank=4)
    assert gpus == []


def test_cuda_asked_without_a_gpu_is_an_error_never_the_cpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="'cuda' was asked for .* sees no usable GPU"):
        rank_device("cuda", local_rank=0)
    # "auto" says: CUDA when there is one; "cpu" is the CPU, with gloo.
    assert rank_device("auto", local_rank=3) == torch.device("cpu")
    assert backend_for(rank_device("cpu", local_rank=1)) == "gloo"


def test_one_named_gpu_is_refused_for_a_data_parallel_run(gpus) -> None:
    with pytest.raises(ValueError, match="names one GPU"):
        rank_device("cuda:1", local_rank=0)
    with pytest.raises(ValidationError, match="'cuda:1' names one GPU.*use 'cuda' or 'auto'"):
        FinetuneConfig(domain="shapes", mode="P", data="d", device="cuda:1", nproc_per_node=2)
    # One process may still pick its GPU.
    assert FinetuneConfig(domain="shapes", mode="P", data="d", device="cuda:1").device == "cuda:1"


def test_a_launched_rank_asked_for_cuda_fails_clearly_on_a_machine_without_gpus(
    capfd, monkeypatch
) -> None:
    # A real torchrun launch: the rank refuses before joining the group, the launch fails.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(RuntimeError, match="torch.distributed.run exited with status"):
        launch("json:dumps", [], Topology(nproc_per_node=1), "cuda", what="device check")
    assert "sees no usable GPU" in capfd.readouterr().err


def test_rank_entries_are_named_module_function() -> None:
    assert distributed.load_entry("tasks.finetune:train_rank").__name__ == "train_rank"
    with pytest.raises(ValueError, match="not 'module:function'"):
        distributed.load_entry("tasks.finetune")
    with pytest.raises(ValueError, match="names nothing callable"):
        distributed.load_entry("tasks.finetune:TRAIN_RANK_ENTRY")

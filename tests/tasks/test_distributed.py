"""Data-parallel fine-tuning on CPU (gloo): the same weights as one process, and clean failure."""

from __future__ import annotations

import socket
import textwrap
import threading

import pytest
import torch

from storage import open_storage
from storage.checkpoints import load_sidecar, load_state_dict, save_state_dict
from storage.layout import shard_name
from storage.shards import ShardWriter
from tasks.data.synthetic import make_split
from tasks.distributed import launch_command
from tasks.finetune import TRAIN_RANK_ENTRY, FinetuneConfig, finetune
from tasks.model import DEFAULT_MODEL, load_clip

DOMAIN = "shapes"
SHARD_SIZE = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """16 images in 4 shards of 4, and a random base model."""
    root = tmp_path_factory.mktemp("ddp-data")
    storage = open_storage(str(root / "data"))
    samples = list(make_split(DOMAIN, "train", seed=0, per_class=4))[:16]
    for index in range(4):
        with ShardWriter(storage, shard_name(DOMAIN, "train", index)) as writer:
            for sample in samples[index * SHARD_SIZE : (index + 1) * SHARD_SIZE]:
                writer.write({k: sample[k] for k in ("__key__", "png", "cls")})
    torch.manual_seed(0)
    base = open_storage(str(root / "base"))
    save_state_dict(base, "base.safetensors", load_clip(DEFAULT_MODEL).state_dict(), {})
    return {"data": storage.uri, "base": base.url("base.safetensors")}


def _config(data: dict[str, str], nproc: int, **changes) -> FinetuneConfig:
    # A global batch of 8 = 2 ranks x 4 = 2 shards: with no sample shuffle, step s of one
    # process takes shards 2s and 2s+1 of the epoch's order, rank r of two takes shard 2s+r.
    fields = dict(
        domain=DOMAIN,
        mode="P",
        base=data["base"],
        data=data["data"],
        epochs=2,
        batch_size=2 * SHARD_SIZE,
        lr=1e-3,
        lr_schedule="constant",
        shuffle_buffer=0,
        loader_workers=0,
        checkpoint_every=1,
        device="cpu",
        nproc_per_node=nproc,
    )
    return FinetuneConfig(**{**fields, **changes})


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.slow
def test_two_gloo_processes_reach_the_weights_of_one(data, tmp_path) -> None:
    storage = open_storage(str(tmp_path / "out"))
    one = finetune(_config(data, 1), storage, "one")
    two = finetune(_config(data, 2), storage, "two")
    assert one["steps"] == two["steps"] == 4 and not two["skipped"]
    base = load_state_dict(*_split(data["base"]))
    one_state = load_state_dict(storage, one["key"])
    two_state = load_state_dict(storage, two["key"])
    moved = _max_abs_diff(one_state, base)
    diff = _max_abs_diff(one_state, two_state)
    print(f"max |theta_1proc - theta_2proc| = {diff:.3e} (training moved weights by {moved:.3e})")
    assert moved > 1e-3 and diff < 1e-5
    losses = [row["train_loss"] for row in one["metrics"]]
    assert [row["train_loss"] for row in two["metrics"]] == pytest.approx(losses, rel=1e-5)
    # Only rank 0 wrote: one model, one marker, one sidecar.
    files = {
        run: sorted(k.split("/", 1)[1] for k in storage.list(f"{run}/")) for run in ("one", "two")
    }
    assert files["one"] == files["two"]
    assert finetune(_config(data, 2), storage, "two")["skipped"]


def _split(uri: str):
    from storage import open_file

    return open_file(uri)


@pytest.mark.slow
def test_a_killed_rank_fails_the_run_and_the_rerun_resumes(data, tmp_path, monkeypatch) -> None:
    # A sitecustomize kills rank 1 with SIGKILL at its third optimizer step.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            import os
            if os.environ.get("RANK") == "1" and os.environ.get("KILL_RANK_1_AT_STEP"):
                import signal
                import torch
                _step, _calls = torch.optim.AdamW.step, [0]
                def _step_or_die(self, *args, **kwargs):
                    _calls[0] += 1
                    if _calls[0] == int(os.environ["KILL_RANK_1_AT_STEP"]):
                        os.kill(os.getpid(), signal.SIGKILL)
                    return _step(self, *args, **kwargs)
                torch.optim.AdamW.step = _step_or_die
            """
        )
    )
    monkeypatch.setenv("PYTHONPATH", str(hook))
    monkeypatch.setenv("KILL_RANK_1_AT_STEP", "3")
    storage = open_storage(str(tmp_path / "out"))
    config = _config(data, 2)
    with pytest.raises(RuntimeError, match="torch.distributed.run exited with status .*rerun"):
        finetune(config, storage, "run")
    assert not storage.exists("run/model.safetensors")
    assert load_sidecar(storage, "run/last.safetensors")["step"] in (2, 3)
    monkeypatch.delenv("KILL_RANK_1_AT_STEP")
    resumed = finetune(config, storage, "run")
    reference = finetune(_config(data, 1), storage, "reference")
    diff = _max_abs_diff(
        load_state_dict(storage, resumed["key"]), load_state_dict(storage, reference["key"])
    )
    assert resumed["steps"] == 4 and diff < 1e-5, diff


def test_multi_node_launch_names_the_rendezvous() -> None:
    config = FinetuneConfig(
        domain=DOMAIN,
        mode="P",
        data="unused",
        nproc_per_node=8,
        nnodes=2,
        node_rank=1,
        rdzv_endpoint="10.0.0.1:29400",
        rdzv_id="run-7",
    )
    command = launch_command(TRAIN_RANK_ENTRY, ["--out-key", "models/x"], config.topology, "cuda")
    assert "--nproc-per-node=8" in command and "--nnodes=2" in command
    assert "--rdzv-endpoint=10.0.0.1:29400" in command and "--node-rank=1" in command
    assert "--rdzv-id=run-7" in command and "--standalone" not in command
    # Every rank runs the generic rank main, which calls the fine-tuning's entry.
    tail = command[command.index("tasks.distributed") - 1 :]
    assert tail == ["-m", "tasks.distributed", "--entry", "tasks.finetune:train_rank"] + [
        "--device",
        "cuda",
        "--",
        "--out-key",
        "models/x",
    ]
    no_endpoint = config.model_copy(update={"rdzv_endpoint": None})
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        launch_command(TRAIN_RANK_ENTRY, [], no_endpoint.topology)
    # Where the nodes meet and which node this is do not change the weights.
    assert (
        config.resume_fingerprint()
        == config.model_copy(update={"node_rank": 0, "rdzv_endpoint": "h:1"}).resume_fingerprint()
    )


_TWO_NODE_HOOK = """
import os

if os.environ.get("RANK") is None:
    # torchrun's agent waits this long for the other nodes' agents once its own ranks are done
    # (300 s by default); a 1 s wait makes a slow final write of rank 0 outlast it in a test.
    from torch.distributed.elastic.agent.server import api

    _init = api.SimpleElasticAgent.__init__

    def _short_exit_barrier(self, *args, **kwargs):
        _init(self, *args, **kwargs)
        self._exit_barrier_timeout = 1.0

    api.SimpleElasticAgent.__init__ = _short_exit_barrier
else:
    # Each rank logs its writes of the final model, and rank 0's takes 5 s more.
    import time

    import storage.checkpoints as checkpoints

    _save = checkpoints.save_state_dict

    def _logged_save(storage, key, *args, **kwargs):
        if key == "model.safetensors":
            if os.environ["RANK"] == "0":
                time.sleep(5)
            with open(os.environ["MODEL_WRITES"], "a") as log:
                log.write(os.environ["RANK"] + "\\n")
        return _save(storage, key, *args, **kwargs)

    checkpoints.save_state_dict = _logged_save
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_both_succeed_and_rank_0_writes_the_model_once(
    data, tmp_path, monkeypatch
) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_TWO_NODE_HOOK)
    writes = tmp_path / "model-writes.log"
    monkeypatch.setenv("PYTHONPATH", str(hook))
    monkeypatch.setenv("MODEL_WRITES", str(writes))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    storage = open_storage(str(tmp_path / "shared"))
    endpoint = f"127.0.0.1:{_free_port()}"
    outcomes: dict[int, object] = {}

    def node(rank: int) -> None:
        # Two launches of the same task on one machine stand for two nodes: nnodes=2, one
        # process each, meeting at one c10d endpoint on loopback, writing to shared storage.
        config = _config(
            data, 1, nnodes=2, node_rank=rank, rdzv_endpoint=endpoint, rdzv_id=tmp_path.name
        )
        try:
            outcomes[rank] = finetune(config, storage, "run")
        except Exception as error:  # reported below, per node
            outcomes[rank] = error

    nodes = [threading.Thread(target=node, args=(rank,)) for rank in (0, 1)]
    for thread in nodes:
        thread.start()
    for thread in nodes:
        thread.join(timeout=300)
    errors = {rank: o for rank, o in outcomes.items() if isinstance(o, Exception)}
    assert not errors and len(outcomes) == 2, errors
    assert [outcomes[rank]["steps"] for rank in (0, 1)] == [4, 4]
    assert outcomes[0]["fingerprint"] == outcomes[1]["fingerprint"]
    assert writes.read_text().split() == ["0"]  # one write of the model, by rank 0
    assert storage.child("run").is_complete("model")

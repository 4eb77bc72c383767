"""Data-parallel fine-tuning: ``torch.distributed.run`` launches, each rank trains under DDP.

The fine-tune task calls :func:`launch_finetune`, which runs ``python -m torch.distributed.run``
as a subprocess with one process per device (``nproc_per_node``) on this node; each process runs
:func:`main` here, joins the process group (``nccl`` on GPUs, ``gloo`` on CPUs) and trains its
share of the shards (:class:`tasks.data.stream.TrainStream` splits them by rank and by
DataLoader worker). Only rank 0 writes checkpoints, the final model and the completion marker.

A failure anywhere fails the whole run: ``torch.distributed.run`` (``--max-restarts 0``)
stops the other ranks when one dies or raises, and :func:`launch_finetune` raises with its exit
status. A rerun of the task resumes every rank from rank 0's last checkpoint.

Multi-node: every node runs the same task with the same config except ``node_rank``; the ranks
meet at ``rdzv_endpoint`` (c10d rendezvous, docs/orchestration.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tasks.finetune import FinetuneConfig, Finetuner

logger = logging.getLogger(__name__)

# The folder holding the `tasks` and `storage` packages: the ranks import them from there.
_PROJECT_ROOT = Path(__file__).resolve().parent.parent


def launch_command(config: FinetuneConfig, storage_uri: str, out_key: str) -> list[str]:
    """The ``torch.distributed.run`` command line of a data-parallel fine-tuning run."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={config.nproc_per_node}",
        f"--nnodes={config.nnodes}",
        "--max-restarts=0",
    ]
    if config.nnodes == 1 and config.rdzv_endpoint is None:
        command.append("--standalone")
    else:
        if config.rdzv_endpoint is None:
            raise ValueError("a multi-node fine-tuning run needs rdzv_endpoint (host:port)")
        command += [
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={config.rdzv_endpoint}",
            f"--rdzv-id={config.rdzv_id}",
            f"--node-rank={config.node_rank}",
        ]
    command += [
        "-m",
        "tasks.distributed",
        "--config",
        config.model_dump_json(),
        "--storage",
        storage_uri,
        "--out-key",
        out_key,
    ]
    return command


def launch_finetune(config: FinetuneConfig, storage_uri: str, out_key: str) -> None:
    """Run a data-parallel fine-tuning to completion (rank 0 writes the model).

    Raises:
        RuntimeError: a rank died or raised; the message names the exit status. The last
            checkpoint is kept, so rerunning resumes from it.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PROJECT_ROOT), env.get("PYTHONPATH")]))
    # Each rank gets its share of the cores (torchrun would set 1 thread per process).
    cores = max(1, (os.cpu_count() or 1) // config.nproc_per_node)
    env.setdefault("OMP_NUM_THREADS", str(cores))
    command = launch_command(config, storage_uri, out_key)
    logger.info(
        "launching %d x %d fine-tuning processes: %s",
        config.nnodes,
        config.nproc_per_node,
        " ".join(command[:8]),
    )
    completed = subprocess.run(command, env=env, check=False)
    if completed.returncode != 0:
        raise RuntimeError(
            f"distributed fine-tuning of {config.domain} ({config.mode}) failed: "
            f"torch.distributed.run exited with status {completed.returncode} (a rank died or "
            "raised; see its log above); rerun to resume from the last checkpoint"
        )


def local_device() -> torch.device:
    """This rank's GPU (``LOCAL_RANK``), made the current CUDA device."""
    index = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def backend_for(config: FinetuneConfig) -> str:
    """``nccl`` when the run trains on CUDA devices, ``gloo`` otherwise."""
    wants_cuda = config.device.startswith("cuda") or config.device == "auto"
    return "nccl" if wants_cuda and torch.cuda.is_available() else "gloo"


def main(argv: list[str] | None = None) -> int:
    """One rank: join the group, train, leave. Started by ``torch.distributed.run``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="FinetuneConfig as JSON")
    parser.add_argument("--storage", required=True, help="URI of the output root")
    parser.add_argument("--out-key", required=True, help="the run's folder under --storage")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank %(process)d %(message)s")
    from storage import open_storage

    config = FinetuneConfig.model_validate_json(args.config)
    dist.init_process_group(backend=backend_for(config))
    try:
        finetuner = Finetuner(config, open_storage(args.storage), args.out_key)
        finetuner.train(rank=dist.get_rank(), world_size=dist.get_world_size())
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

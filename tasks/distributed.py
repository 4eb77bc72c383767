"""Data-parallel runs: ``torch.distributed.run`` launches, and what every rank needs.

A stage calls :func:`launch` with the path of its rank entry point (``"module:function"``), the
entry's arguments and a :class:`Topology`; :func:`launch` runs ``python -m torch.distributed.run``
as a subprocess with one process per device (``nproc_per_node``) on this node. Each process runs
:func:`main` here, which gives the rank its own device (:func:`rank_device`: ``cuda:LOCAL_RANK``,
or the CPU), joins the process group (``nccl`` on GPUs, ``gloo`` on CPUs), calls the entry and
leaves the group. Nothing here knows what the ranks compute, so this module imports no stage
(the fine-tuning's entry is :func:`tasks.finetune.train_rank`).

A failure anywhere fails the whole run: ``torch.distributed.run`` (``--max-restarts 0``) stops
the other ranks when one dies or raises, and :func:`launch` raises with its exit status.

Multi-node: every node runs the same task with the same config except ``node_rank``; the ranks
meet at ``rdzv_endpoint`` (c10d rendezvous, docs/orchestration.md).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from tasks.config import resolve_device

logger = logging.getLogger(__name__)

# The folder holding the `tasks` and `storage` packages: the ranks import them from there.
_PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Rank 0 evaluates and writes while the other ranks wait in their next collective (or in the
# final barrier); nccl's own default (10 minutes) is short for an evaluation on one GPU plus a
# model upload, so both backends get gloo's default.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)

#: What a rank entry point is: called on every rank, in an initialised process group, with the
#: arguments given to :func:`launch` and the rank's device.
RankEntry = Callable[[list[str], torch.device], None]


@dataclass(frozen=True)
class Topology:
    """Where the processes of one data-parallel run are.

    Attributes:
        nproc_per_node: processes on each node (one per GPU, or CPU processes on ``gloo``).
        nnodes: nodes; each runs :func:`launch` with its own ``node_rank``.
        node_rank: this node's rank.
        rdzv_endpoint: ``host:port`` of the c10d rendezvous; None on one node (a local port).
        rdzv_id: the rendezvous id the nodes of one run share.
    """

    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    rdzv_id: str = "run"

    @property
    def world_size(self) -> int:
        """Processes in all."""
        return self.nproc_per_node * self.nnodes


def launch_command(
    entry: str, args: Sequence[str], topology: Topology, device: str = "auto"
) -> list[str]:
    """The ``torch.distributed.run`` command line that runs ``entry`` on every rank.

    Args:
        entry: ``"module:function"`` of a :data:`RankEntry`.
        args: the entry's own arguments.
        topology: processes and nodes.
        device: the stage's device setting (``"auto"``, ``"cpu"`` or ``"cuda"``).

    Raises:
        ValueError: a multi-node run without ``rdzv_endpoint``.
    """
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={topology.nproc_per_node}",
        f"--nnodes={topology.nnodes}",
        "--max-restarts=0",
    ]
    if topology.nnodes == 1 and topology.rdzv_endpoint is None:
        command.append("--standalone")
    else:
        if topology.rdzv_endpoint is None:
            raise ValueError("a multi-node run needs rdzv_endpoint (host:port)")
        command += [
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={topology.rdzv_endpoint}",
            f"--rdzv-id={topology.rdzv_id}",
            f"--node-rank={topology.node_rank}",
        ]
    return [*command, "-m", __name__, "--entry", entry, "--device", device, "--", *args]


def launch(
    entry: str, args: Sequence[str], topology: Topology, device: str = "auto", *, what: str
) -> None:
    """Run ``entry`` on every rank of this node to completion.

    Returns only when every rank of the run has returned (ranks wait for each other at the end,
    :func:`main`), so what rank 0 writes exists when any node's launch returns.

    Args:
        entry: ``"module:function"`` of a :data:`RankEntry`.
        args: the entry's own arguments.
        topology: processes and nodes.
        device: the stage's device setting.
        what: names the run in the error message.

    Raises:
        RuntimeError: a rank died or raised; the message names the exit status.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PROJECT_ROOT), env.get("PYTHONPATH")]))
    # Each rank gets its share of the cores (torchrun would set 1 thread per process).
    cores = max(1, (os.cpu_count() or 1) // topology.nproc_per_node)
    env.setdefault("OMP_NUM_THREADS", str(cores))
    command = launch_command(entry, args, topology, device)
    logger.info(
        "launching %d x %d processes of %s: %s",
        topology.nnodes,
        topology.nproc_per_node,
        what,
        " ".join(command[:8]),
    )
    completed = subprocess.run(command, env=env, check=False)
    if completed.returncode != 0:
        raise RuntimeError(
            f"distributed {what} failed: torch.distributed.run exited with status "
            f"{completed.returncode} (a rank died or raised; see its log above); rerun to "
            "resume from the last checkpoint"
        )


def rank_device(device: str, local_rank: int | None = None) -> torch.device:
    """This rank's own device: ``cuda:LOCAL_RANK`` when the run trains on CUDA, else the CPU.

    ``"auto"`` trains on CUDA when this process sees a GPU. The GPU is made the current CUDA
    device, so that collectives and kernels of this rank never land on another rank's GPU.

    Args:
        device: the stage's device setting; a single ``"cuda:i"`` is refused (every rank would
            share that GPU).
        local_rank: the rank on this node (default: ``LOCAL_RANK`` of ``torch.distributed.run``).

    Raises:
        RuntimeError: CUDA was asked for and this process has no usable GPU, or fewer GPUs than
            the ranks of its node (never a silent fall-back to the CPU).
        ValueError: ``device`` names one GPU.
    """
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device)
    if resolved.type != "cuda":
        return resolved
    if resolved.index is not None:
        raise ValueError(
            f"device {device!r} names one GPU; a data-parallel run gives each rank its own: "
            "use 'cuda' or 'auto'"
        )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"device {device!r} was asked for but rank with LOCAL_RANK {local_rank} sees no "
            f"usable GPU (torch.cuda.is_available() is False, CUDA_VISIBLE_DEVICES={visible})"
        )
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RuntimeError(
            f"rank with LOCAL_RANK {local_rank} has no GPU of its own: {count} visible "
            f"(CUDA_VISIBLE_DEVICES={visible}); nproc_per_node must not exceed the GPUs of a node"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def backend_for(device: torch.device) -> str:
    """``nccl`` for a rank on a CUDA device, ``gloo`` otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def wait_for_all(device: torch.device) -> None:
    """Block until every rank of the group gets here (a barrier on this rank's device)."""
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


def load_entry(path: str) -> RankEntry:
    """The function that ``"module:function"`` names.

    Raises:
        ValueError: ``path`` is not ``module:function`` or names nothing callable.
    """
    module_name, _, function_name = path.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"rank entry {path!r} is not 'module:function'")
    function = getattr(importlib.import_module(module_name), function_name, None)
    if not callable(function):
        raise ValueError(f"rank entry {path!r} names nothing callable")
    return function


def main(argv: list[str] | None = None) -> int:
    """One rank: take its device, join the group, run the entry, wait for all, leave."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entry", required=True, help="module:function of the rank entry")
    parser.add_argument("--device", default="auto", help="the stage's device setting")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the entry's arguments after --")
    args = parser.parse_args(argv)
    entry_args = args.args[1:] if args.args[:1] == ["--"] else args.args
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank %(process)d %(message)s")
    entry = load_entry(args.entry)
    device = rank_device(args.device)
    dist.init_process_group(backend=backend_for(device), timeout=COLLECTIVE_TIMEOUT)
    try:
        entry(entry_args, device)
        # Rank 0 may still be writing what the others' nodes report as the result: no rank
        # returns (and no node's launcher exits) before every rank is done.
        wait_for_all(device)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

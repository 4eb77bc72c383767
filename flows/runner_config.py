"""Where the tasks of a sharded flow run: the configuration (:mod:`flows.runners` makes the runner).

Defined apart from the runners, which import Dask and Prefect, so that the command line can
judge it before anything heavy starts.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.config import StageConfig


class RunnerConfig(StageConfig):
    """Where the tasks of a sharded flow run.

    Attributes:
        kind: ``"thread"`` (in-process thread pool), ``"dask"`` (a ``LocalCluster`` started
            for the flow run, or the scheduler at ``address``).
        max_workers: threads for ``"thread"`` (default 1); worker processes for a local
            Dask cluster.
        address: ``tcp://host:8786`` of an existing Dask scheduler.
        threads_per_worker: threads of each local Dask worker process.
        gpus_per_worker: GPUs of each local Dask worker: the worker process sees only its own
            (``CUDA_VISIBLE_DEVICES``, :class:`flows.runners.GPULocalCluster`) and advertises them as the
            resource ``GPU``; a shard task asks for one, so a worker runs one shard per GPU at a
            time. ``max_workers * gpus_per_worker`` must not exceed the GPUs of the machine.
    """

    kind: Literal["thread", "dask"] = "thread"
    # One shard at a time by default: torch already spreads one shard's forward passes over
    # every CPU core, and two shards in threads would only fight for them.
    max_workers: int = Field(1, ge=1)
    address: str | None = None
    threads_per_worker: int = Field(1, ge=1)
    gpus_per_worker: int = Field(0, ge=0)

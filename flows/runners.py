"""Task runners chosen by configuration: a thread pool here, Dask for scale-out.

The sharded stages do not know where they run: the same flow takes a thread pool (the embedded
default), a ``LocalCluster`` of worker processes, or the address of an existing Dask scheduler
(multi-node; one worker per GPU, e.g. dask-cuda's ``LocalCUDACluster``, see docs/scale-out.md).
"""

from __future__ import annotations

from typing import Literal

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
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
        gpus_per_worker: Dask worker resource ``GPU`` advertised by each local worker; a shard
            task asks for one, so a worker runs one shard per GPU at a time.
    """

    kind: Literal["thread", "dask"] = "thread"
    # One shard at a time by default: torch already spreads one shard's forward passes over
    # every CPU core, and two shards in threads would only fight for them.
    max_workers: int = Field(1, ge=1)
    address: str | None = None
    threads_per_worker: int = Field(1, ge=1)
    gpus_per_worker: int = Field(0, ge=0)


def make_task_runner(config: RunnerConfig | None = None) -> TaskRunner:
    """Build the Prefect task runner a :class:`RunnerConfig` describes."""
    config = config or RunnerConfig()
    if config.kind == "thread":
        return ThreadPoolTaskRunner(max_workers=config.max_workers)
    from prefect_dask import DaskTaskRunner

    if config.address:
        return DaskTaskRunner(address=config.address)
    cluster_kwargs: dict = {
        "n_workers": config.max_workers,
        "threads_per_worker": config.threads_per_worker,
        "processes": True,
        "dashboard_address": None,
    }
    if config.gpus_per_worker:
        cluster_kwargs["resources"] = {"GPU": config.gpus_per_worker}
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=cluster_kwargs)

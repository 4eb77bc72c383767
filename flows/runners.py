"""Task runners chosen by configuration: a thread pool here, Dask for scale-out.

The sharded stages do not know where they run: the same flow takes a thread pool (the embedded
default), a ``LocalCluster`` of worker processes, or the address of an existing Dask scheduler
(multi-node; one worker per GPU, e.g. dask-cuda's ``LocalCUDACluster``; docs/orchestration.md).
Workers on other machines report to the run's Prefect API, so they need one they reach.

A local cluster with ``gpus_per_worker`` is a :class:`GPULocalCluster`: as dask-cuda does, each
worker process is started with ``CUDA_VISIBLE_DEVICES`` naming its own GPUs only, so ``cuda`` in
a worker is its own device and two workers never share one.
"""

from __future__ import annotations

import copy
import ipaddress
import os
import socket
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from distributed import LocalCluster
from distributed.system import MEMORY_LIMIT
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows.runner_config import RunnerConfig as RunnerConfig  # no Dask or Prefect; re-exported
from tasks.config import WORKER_GPUS_ENV


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (an IP address or a name) is this machine's loopback interface.

    A name counts when every address it resolves to is loopback (``localhost``, or a host name
    that ``/etc/hosts`` maps to 127.0.1.1); a name that does not resolve does not.
    """
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(resolved) and all(ipaddress.ip_address(a).is_loopback for a in resolved)


def _host(address: str) -> str | None:
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        return parts.hostname
    except ValueError:
        return None


def check_workers_reach_api(config: RunnerConfig, api_url: str | None) -> None:
    """Refuse an existing Dask cluster whose workers cannot reach the run's Prefect API.

    A Dask worker reports every shard task's state to the Prefect API of the run that submitted
    it. A scheduler on loopback has its workers on this machine, which reach any API here (the
    command line's private temporary one included); a scheduler elsewhere has workers on other
    machines, which reach neither a private API nor one on loopback.

    Args:
        config: where the shard tasks run.
        api_url: ``PREFECT_API_URL`` of the run; None when the command line starts its private
            temporary API on 127.0.0.1.

    Raises:
        ValueError: one line naming the scheduler and what to set.
    """
    if config.kind != "dask" or not config.address or config.address.startswith("inproc://"):
        return
    host = _host(config.address)
    if host is None or is_loopback_host(host):
        return
    where = f"workers of the Dask scheduler {config.address} (not on loopback)"
    todo = (
        "set PREFECT_API_URL to a Prefect server they reach (e.g. http://PREFECT-HOST:4200/api; "
        "docs/orchestration.md), or use a scheduler on this machine at tcp://127.0.0.1:PORT"
    )
    if api_url is None:
        raise ValueError(
            f"{where} cannot reach this run's private Prefect API on 127.0.0.1: {todo}"
        )
    api_host = _host(api_url)
    if api_host is None or is_loopback_host(api_host):
        raise ValueError(f"{where} cannot reach the Prefect API at {api_url} (loopback): {todo}")


def visible_gpus() -> list[str]:
    """The GPUs this process may hand to its workers, as ``CUDA_VISIBLE_DEVICES`` entries.

    The entries of ``CUDA_VISIBLE_DEVICES`` when it is set (indices or UUIDs, in its order; an
    empty value or ``-1`` hides every GPU), else ``0 .. device_count - 1``.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [entry.strip() for entry in visible.split(",") if entry.strip()]
        # CUDA stops at the first invalid entry; "-1" is the usual way to hide them all.
        return entries[: entries.index("-1")] if "-1" in entries else entries
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def worker_gpu_blocks(workers: int, gpus_per_worker: int, gpus: Sequence[str]) -> list[list[str]]:
    """Each local worker's own GPUs: consecutive blocks of ``gpus_per_worker`` of ``gpus``.

    Raises:
        ValueError: fewer GPUs than ``workers * gpus_per_worker`` (two workers would share one,
            or one would find none and label on the CPU).
    """
    if gpus_per_worker < 1:
        raise ValueError(f"gpus_per_worker must be at least 1, got {gpus_per_worker}")
    needed = workers * gpus_per_worker
    if needed > len(gpus):
        raise ValueError(
            f"{workers} Dask workers with {gpus_per_worker} GPU(s) each need {needed} GPUs, but "
            f"this machine shows {len(gpus)} (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): lower max_workers or "
            "gpus_per_worker"
        )
    return [list(gpus[i * gpus_per_worker : (i + 1) * gpus_per_worker]) for i in range(workers)]


class GPULocalCluster(LocalCluster):
    """A ``LocalCluster`` whose every worker process sees only its own GPUs.

    dask-cuda's ``LocalCUDACluster`` pattern without its dependency: the cluster starts empty
    and each worker's spec gets its nanny environment (``CUDA_VISIBLE_DEVICES``, set before the
    worker process starts, hence before CUDA is initialised there) from :meth:`new_worker_spec`.
    Worker ``i`` is named ``i`` and gets the ``i``-th block of :func:`worker_gpu_blocks`; it
    also gets :data:`~tasks.config.WORKER_GPUS_ENV`, so that a worker that was given GPUs but
    cannot use them fails instead of labelling on the CPU (:func:`tasks.config.resolve_device`).

    Args:
        n_workers: worker processes.
        gpus_per_worker: GPUs of each worker (its resource ``GPU``).
        gpus: the GPUs to hand out (default: :func:`visible_gpus`).
        **kwargs: as for ``LocalCluster`` (``processes`` is always true).
    """

    def __init__(
        self,
        n_workers: int,
        *,
        gpus_per_worker: int = 1,
        gpus: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        self.gpu_blocks = worker_gpu_blocks(
            n_workers, gpus_per_worker, visible_gpus() if gpus is None else gpus
        )
        resources = {**kwargs.pop("resources", {}), "GPU": gpus_per_worker}
        kwargs.setdefault("memory_limit", MEMORY_LIMIT // max(n_workers, 1))
        super().__init__(n_workers=0, processes=True, resources=resources, **kwargs)
        self.scale(n_workers)
        self.sync(self._correct_state)

    def new_worker_spec(self) -> dict[int, dict[str, Any]]:
        """The spec of the next worker: the first block of GPUs no worker holds."""
        free = [i for i in range(len(self.gpu_blocks)) if i not in self.worker_spec]
        if not free:
            raise ValueError(f"cannot start more than {len(self.gpu_blocks)} GPU workers")
        index = free[0]
        devices = ",".join(self.gpu_blocks[index])
        spec = copy.deepcopy(self.new_spec)
        env = dict(spec["options"].get("env") or {})
        env.update({"CUDA_VISIBLE_DEVICES": devices, WORKER_GPUS_ENV: devices})
        spec["options"]["env"] = env
        return {index: spec}


def make_task_runner(config: RunnerConfig | None = None) -> TaskRunner:
    """Build the Prefect task runner a :class:`RunnerConfig` describes.

    Raises:
        ValueError: an existing Dask cluster whose workers cannot reach the current Prefect API
            (:func:`check_workers_reach_api`), or a local cluster asking for more GPUs than the
            machine shows (:func:`worker_gpu_blocks`), before anything starts.
    """
    config = config or RunnerConfig()
    if config.kind == "thread":
        return ThreadPoolTaskRunner(max_workers=config.max_workers)
    from prefect.settings import get_current_settings
    from prefect_dask import DaskTaskRunner

    if config.address:
        check_workers_reach_api(config, get_current_settings().api.url)
        return DaskTaskRunner(address=config.address)
    cluster_kwargs: dict = {
        "n_workers": config.max_workers,
        "threads_per_worker": config.threads_per_worker,
        "processes": True,
        "dashboard_address": None,
    }
    if config.gpus_per_worker:
        gpus = visible_gpus()
        worker_gpu_blocks(config.max_workers, config.gpus_per_worker, gpus)  # refused here
        del cluster_kwargs["processes"]
        cluster_kwargs.update(gpus_per_worker=config.gpus_per_worker, gpus=gpus)
        return DaskTaskRunner(cluster_class=GPULocalCluster, cluster_kwargs=cluster_kwargs)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=cluster_kwargs)

"""Task runners chosen by configuration: a thread pool here, Dask for scale-out.

The sharded stages do not know where they run: the same flow takes a thread pool (the embedded
default), a ``LocalCluster`` of worker processes, or the address of an existing Dask scheduler
(multi-node; one worker per GPU, e.g. dask-cuda's ``LocalCUDACluster``; docs/orchestration.md).
Workers on other machines report to the run's Prefect API, so they need one they reach.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Literal
from urllib.parse import urlsplit

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


def make_task_runner(config: RunnerConfig | None = None) -> TaskRunner:
    """Build the Prefect task runner a :class:`RunnerConfig` describes.

    Raises:
        ValueError: an existing Dask cluster whose workers cannot reach the current Prefect API
            (:func:`check_workers_reach_api`).
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
        cluster_kwargs["resources"] = {"GPU": config.gpus_per_worker}
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=cluster_kwargs)

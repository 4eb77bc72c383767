"""The embedded Prefect stack: a local server with its UI, and every deployment served.

``explain-transfer serve`` calls :func:`serve_stack`: it starts ``prefect server start``
(SQLite under ``{out}/prefect-home``) as a subprocess, waits for ``/api/health``, creates the
``gpu`` tag concurrency limit if it is missing (one per GPU of this host unless told), and
serves the deployments of ``deployments/prefect.yaml`` with ``prefect.serve`` (schedules
included), so a new user opens http://127.0.0.1:4200 and triggers a run. The deployments run
the same flow functions the command line runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import httpx

from deployments.registry import DATA_ROOT_ENV, PREFECT_YAML, DeploymentSpec, load_deployment_specs

logger = logging.getLogger(__name__)

#: The tag the label-shard tasks carry; its concurrency limit bounds shards running at once.
GPU_TAG = "gpu"

#: Variables of the caller's Prefect configuration that must not leak into the local server.
_CLIENT_VARIABLES = ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for tests and ``--port 0``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex((host, port)) == 0


class PrefectServer:
    """``prefect server start`` on loopback as a subprocess, with its own Prefect home.

    Use as a context manager: entering starts the server and waits until ``/api/health``
    answers; leaving stops it. Its output goes to ``{home}/server.log`` and its process id to
    ``{home}/server.pid`` (so a supervisor can clean up after a hard kill).

    Args:
        home: ``PREFECT_HOME`` of the server (SQLite database, UI build, logs).
        port: TCP port of the API and UI.
        host: interface to listen on (loopback by default: the API has no authentication).
        startup_timeout: seconds to wait for ``/api/health``.
        env: extra environment variables of the server process.
    """

    def __init__(
        self,
        home: str | Path,
        port: int = 4200,
        host: str = "127.0.0.1",
        startup_timeout: float = 180.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.home = Path(home).resolve()
        self.port = port
        self.host = host
        self.startup_timeout = startup_timeout
        self.env = dict(env or {})
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The UI's address."""
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        """The value of ``PREFECT_API_URL`` for clients of this server."""
        return f"{self.url}/api"

    @property
    def log_path(self) -> Path:
        return self.home / "server.log"

    def start(self) -> None:
        """Start the server and wait until it is healthy.

        Raises:
            RuntimeError: the port is taken, or the server exited or did not become healthy
                in time (the end of its log is in the message).
        """
        if _port_in_use(self.host, self.port):
            raise RuntimeError(
                f"port {self.port} on {self.host} is already in use; choose another with --port"
            )
        self.home.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in _CLIENT_VARIABLES}
        env.update(
            PREFECT_HOME=str(self.home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_UI_ENABLED="true",
            PREFECT_SERVER_API_HOST=self.host,
            PREFECT_SERVER_API_PORT=str(self.port),
            # The UI's API address is not derived from --port: without this the browser
            # would call :4200 whatever port the server listens on.
            PREFECT_UI_API_URL=self.api_url,
        )
        env.update(self.env)
        command = [sys.executable, "-m", "prefect", "server", "start"]
        command += ["--host", self.host, "--port", str(self.port)]
        logger.info("starting the Prefect server on %s (home %s)", self.url, self.home)
        with open(self.log_path, "ab") as log:
            # Its own session: Ctrl-C in a terminal reaches this process, which then stops the
            # server in order, after the runner has finished with it.
            self.process = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        (self.home / "server.pid").write_text(f"{self.process.pid}\n")
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"the Prefect server exited with code {self.process.returncode}:\n"
                    + self._log_tail()
                )
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2.0).status_code == 200:
                    logger.info("Prefect server healthy at %s", self.url)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(
            f"the Prefect server did not answer {self.api_url}/health within "
            f"{self.startup_timeout:.0f} s:\n" + self._log_tail()
        )

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server (SIGTERM to its process group, SIGKILL after ``timeout``)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        with contextlib.suppress(OSError):
            (self.home / "server.pid").unlink()
        logger.info("Prefect server stopped")

    def __enter__(self) -> PrefectServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def stack_environment(
    api_url: str,
    data_root: str,
    result_storage_block: str | None = None,
) -> dict[str, str]:
    """The Prefect settings of the served deployments, as environment variables.

    Task results are persisted (``PREFECT_RESULTS_PERSIST_BY_DEFAULT``) next to the data: in
    ``{data_root}/prefect-results`` when the data root is a local folder, else in the storage
    block ``result_storage_block`` names (e.g. ``s3-bucket/explain-transfer`` from
    prefect-aws), which Prefect reads from ``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK``.

    Raises:
        ValueError: the data root is not local and no result storage block is given.
    """
    from storage import LocalStorage, open_storage

    env = {
        "PREFECT_API_URL": api_url,
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        DATA_ROOT_ENV: data_root,
    }
    root = open_storage(data_root)
    if result_storage_block:
        env["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] = result_storage_block
    elif isinstance(root, LocalStorage):
        env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(root.root / "prefect-results")
    else:
        raise ValueError(
            f"data root {root.uri} is not a local folder: give the Prefect storage block that "
            "holds task results (--result-storage-block s3-bucket/NAME; see docs/orchestration.md)"
        )
    return env


@contextlib.contextmanager
def environment(variables: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables and the matching Prefect settings, restored on exit.

    Both are needed: this process reads Prefect settings, and the flow-run subprocesses the
    runner spawns read the environment (which Prefect lets win over inherited settings).
    """
    from prefect.context import SettingsContext, get_settings_context
    from prefect.settings import Settings

    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        context = get_settings_context()
        with SettingsContext(profile=context.profile, settings=Settings()):
            yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def default_gpu_limit() -> int:
    """The ``gpu`` tag limit when none is given: the CUDA devices this host sees, at least 1.

    The served flow runs execute on this host, so its GPUs are the ones their shard tasks use;
    without a GPU, one shard at a time already keeps every CPU core busy.
    """
    import torch

    return max(1, torch.cuda.device_count())


def ensure_tag_concurrency_limit(
    tag: str = GPU_TAG, limit: int = 1, *, replace: bool = False
) -> bool:
    """Create the tag concurrency limit ``tag`` (like ``prefect concurrency-limit create``).

    An existing limit is kept as it is unless ``replace``: an operator may have tuned it, and
    only a limit given explicitly overrides that.

    Returns:
        True when the limit was created or set, False when an existing one was kept.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            existing = client.read_concurrency_limit_by_tag(tag)
        except ObjectNotFound:
            existing = None
        if existing is None or (replace and existing.concurrency_limit != limit):
            # Creating an existing tag's limit sets it (the server upserts by tag).
            client.create_concurrency_limit(tag=tag, concurrency_limit=limit)
            logger.info("set the %r tag concurrency limit to %d at a time", tag, limit)
            return True
    logger.info("keeping the %r tag concurrency limit (%d)", tag, existing.concurrency_limit)
    return False


def select_deployments(
    specs: Sequence[DeploymentSpec], names: Sequence[str] | None
) -> list[DeploymentSpec]:
    """The specs whose ``flow/deployment`` name is in ``names`` (all when ``names`` is None).

    Raises:
        ValueError: a name matches no deployment.
    """
    if not names:
        return list(specs)
    by_name = {spec.full_name: spec for spec in specs}
    unknown = sorted(set(names) - set(by_name))
    if unknown:
        raise ValueError(f"unknown deployments {unknown}; known: {sorted(by_name)}")
    return [by_name[name] for name in names]


def serve_stack(
    out: str | Path,
    port: int = 4200,
    api_url: str | None = None,
    data_root: str | None = None,
    gpu_limit: int | None = None,
    result_storage_block: str | None = None,
    deployment_names: Sequence[str] | None = None,
    run_limit: int | None = None,
    prefect_yaml: str | Path = PREFECT_YAML,
) -> None:
    """Start the embedded stack and serve the deployments until interrupted.

    Args:
        out: folder of the Prefect home (``{out}/prefect-home``) and the default data root.
        port: port of the local server and its UI (0: any free port).
        api_url: an existing Prefect API to serve on instead of starting a local server.
        data_root: root URI every deployment writes under (default ``$EXPLAIN_TRANSFER_DATA``,
            else ``{out}/data``).
        gpu_limit: the ``gpu`` tag concurrency limit: label-shard and sweep-target tasks
            running at once across every run on this API. Given, it is set even over an
            existing limit; None creates one of :func:`default_gpu_limit` (this host's GPUs)
            when missing and keeps an existing one. A Dask cluster of more GPUs needs its
            total given here.
        result_storage_block: Prefect block of task results for a non-local data root.
        deployment_names: serve only these ``flow/deployment`` names (default: all).
        run_limit: flow runs executed at once by this process (default: Prefect's).
        prefect_yaml: the registry of deployments.
    """
    from prefect import serve

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_root = data_root or os.environ.get(DATA_ROOT_ENV) or str(out / "data")
    specs = load_deployment_specs(prefect_yaml, env={**os.environ, DATA_ROOT_ENV: data_root})
    # Import every flow before starting anything: a broken entrypoint fails in a second.
    specs = select_deployments(specs, deployment_names)
    with contextlib.ExitStack() as stack:
        if api_url is None:
            server = PrefectServer(out / "prefect-home", port=port or free_port())
            stack.enter_context(server)
            api_url = server.api_url
        stack.enter_context(
            environment(stack_environment(api_url, data_root, result_storage_block))
        )
        if gpu_limit is None:
            ensure_tag_concurrency_limit(GPU_TAG, default_gpu_limit())
        else:
            ensure_tag_concurrency_limit(GPU_TAG, gpu_limit, replace=True)
        deployments = [spec.to_runner_deployment() for spec in specs]
        logger.info(
            "serving %d deployments on %s (UI: %s); data under %s",
            len(deployments),
            api_url,
            api_url.removesuffix("/api"),
            data_root,
        )
        serve(*deployments, limit=run_limit)

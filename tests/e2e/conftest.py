"""The embedded stack end to end: one ``explain-transfer serve`` process for the session.

The fixtures start the real command (``python -m flows.serve_cli``: a ``prefect server start``
subprocess on a free loopback port, the deployments of ``deployments/prefect.yaml`` served with
``prefect.serve``), trigger one miniature run of the weekly dataset deployment through
``run_deployment`` and share the finished run with the API and browser tests. These tests use
their own server, not the ``prefect_test_harness`` of tests/flows.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from deployments.serve import free_port

REPO = Path(__file__).resolve().parents[2]

#: The deployment the end-to-end run triggers (the weekly Kernel SHAP dataset regeneration).
BUILD_DEPLOYMENT = "build-explanation-dataset/regenerate-weekly"

#: The deployment of the whole pipeline (scheduled nightly), triggered on the miniature config.
PIPELINE_DEPLOYMENT = "explain-transfer-pipeline/nightly-sweep"

#: Seconds allowed for the server to start and every deployment to register (a shared 2-core
#: machine takes ~30 s for the server alone).
STARTUP_TIMEOUT = 240


@dataclass
class Stack:
    """The running stack: where its API, UI, Prefect home and data are."""

    url: str
    out: Path
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    @property
    def data_root(self) -> Path:
        return self.out / "data"

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        """One call of the Prefect REST API (JSON bodies we write, no client defaults)."""
        response = httpx.request(method, f"{self.api_url}{path}", timeout=30.0, **kwargs)
        response.raise_for_status()
        return response.json()

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])


def _stop(process: subprocess.Popen[bytes], out: Path) -> None:
    if process.poll() is None:
        # SIGTERM lets the runner pause its schedules and the stack stop its server.
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    pid_file = out / "prefect-home" / "server.pid"
    if pid_file.exists():  # the stack died before stopping its server
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """``explain-transfer serve --port P --out DIR`` running until the end of the session."""
    from deployments.registry import load_deployment_specs

    out = tmp_path_factory.mktemp("serve-out")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "EXPLAIN_"))}
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        # The serving process's own Prefect profile lives in the test folder too.
        PREFECT_HOME=str(out / "client-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    log = out / "serve.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "flows.serve_cli", "--port", str(port), "--out", str(out)],
            cwd=REPO,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    running = Stack(url=f"http://127.0.0.1:{port}", out=out, process=process, log=log)
    expected = len(load_deployment_specs(env={"EXPLAIN_TRANSFER_DATA": str(out / "data")}))
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"serve exited with {process.returncode}:\n{running.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"deployments not registered in time:\n{running.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if len(running.api("POST", "/deployments/filter", json={})) >= expected:
                    break
            time.sleep(1.0)
        yield running
    finally:
        _stop(process, out)


def miniature_build_parameters(data_root: Path) -> dict[str, Any]:
    """A build of a few images on a 3x3 grid: seconds of labelling on a CPU."""
    return {
        "config": {
            "name": "shapes-x",
            "split": "val",
            "input_kind": "synthetic",
            "input_uri": "shapes",
            "synthetic_per_class": 2,
            "num_shards": 2,
            "output_uri": str(data_root / "xdata"),
            "label": {"grid_h": 3, "grid_w": 3, "budget": 40, "images_per_batch": 8},
        }
    }


@pytest.fixture(scope="session")
def build_run(stack: Stack) -> Any:
    """The flow run of one miniature build triggered on the served deployment, finished."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: stack.api_url}):
        run = run_deployment(
            BUILD_DEPLOYMENT,
            parameters=miniature_build_parameters(stack.data_root),
            timeout=300,
        )
    if not run.state or not run.state.is_final():
        pytest.fail(f"run {run.id} not finished: {run.state}\n{stack.log_tail()}")
    return run


@pytest.fixture(scope="session")
def pipeline_run(stack: Stack) -> Any:
    """The flow run of the whole pipeline (miniature config) on its served deployment, finished."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.pipeline import PipelineConfig

    config = PipelineConfig.miniature(str(stack.data_root / "miniature"))
    with temporary_settings(updates={PREFECT_API_URL: stack.api_url}):
        run = run_deployment(
            PIPELINE_DEPLOYMENT, parameters={"config": config.to_dict()}, timeout=900
        )
    if not run.state or not run.state.is_final():
        pytest.fail(f"run {run.id} not finished: {run.state}\n{stack.log_tail()}")
    return run

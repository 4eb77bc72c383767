"""Fault injection for the reliability tests: an S3 server that can fail, a slow proxy, workers.

Everything here is real: the S3 server is moto's own WSGI application served over loopback
(state lives in the process, so a restarted server still has its buckets), the proxy forwards
real TCP bytes, and workers are separate Python processes that can be SIGKILLed.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import BaseWSGIServer, make_server

from storage import Storage
from tasks.build_dataset import BuildConfig, LabelConfig
from tasks.data.readers import iter_webdataset

REPO_ROOT = Path(__file__).resolve().parents[2]


def start_cli(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """``explain-transfer ARGS`` started in a fresh interpreter, its output piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


WORKER = Path(__file__).with_name("worker.py")

FAKE_ACCESS_KEY = "AKIARELIABILITYTEST1"
FAKE_SECRET_KEY = "reliability-secret-must-never-leak-7f3a9c"


def build_config(output_uri: str, **changes: Any) -> BuildConfig:
    """A tiny synthetic build: 10 images of ``shapes``/val, 3x3 grid, budget 20, 2 shards."""
    fields: dict[str, Any] = dict(
        name="shapes-x",
        split="val",
        input_kind="synthetic",
        input_uri="shapes",
        synthetic_per_class=2,
        output_uri=output_uri,
        num_shards=2,
        device="cpu",
        label=LabelConfig(grid_h=3, grid_w=3, budget=20, images_per_batch=2),
    )
    fields.update(changes)
    return BuildConfig(**fields)


def dataset_samples(storage: Storage, name: str, split: str) -> list[dict[str, Any]]:
    """Every sample a reader sees: complete shards only, bad shards counted, never yielded."""
    return list(iter_webdataset(storage, name, split, validate=False))


def shap_of(sample: dict[str, Any]) -> np.ndarray:
    """The ``shap.npy`` field of a sample."""
    return np.load(io.BytesIO(sample["shap.npy"]), allow_pickle=False)


def aws_env(endpoint_url: str, **extra: str) -> dict[str, str]:
    """Environment variables that point boto3 at ``endpoint_url`` with the fake credentials."""
    return {
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/nonexistent/aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
        **extra,
    }


def run_worker(args: Iterable[str], env: dict[str, str], timeout: float = 120) -> int:
    """Run ``worker.py`` with ``args`` in a fresh interpreter; return its exit status.

    A negative status is the signal that ended it (``-9`` for SIGKILL).
    """
    import torch

    # Bit-identical results need the same number of torch threads in both processes (float
    # sums are split by thread); an earlier test or library may have changed OMP_NUM_THREADS.
    full_env = {
        **os.environ,
        **env,
        "PYTHONPATH": str(REPO_ROOT),
        "TORCH_NUM_THREADS": str(torch.get_num_threads()),
    }
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        full_env.pop(name, None)
    completed = subprocess.run(
        [sys.executable, str(WORKER), *args],
        env=full_env,
        cwd=REPO_ROOT,
        timeout=timeout,
        capture_output=True,
        text=True,
    )
    if completed.returncode not in (0, -9):
        raise AssertionError(f"worker failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
    return completed.returncode


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FaultyS3Server:
    """moto's S3 over loopback that can be stopped, restarted and told to fail requests.

    Unlike ``ThreadedMotoServer.stop``, :meth:`stop` also closes the listening socket, so clients
    get "connection refused" (a real outage) instead of a connection that is never served.

    Attributes:
        port: the fixed port, kept across restarts.
        failures: requests answered with a 500 so far, by name.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.failures: dict[str, int] = {}
        self._fail_rules: list[tuple[str, Callable[[dict[str, Any]], bool], int]] = []
        self._lock = threading.Lock()
        self._app = DomainDispatcherApplication(create_backend_app)
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail(self, name: str, match: Callable[[dict[str, Any]], bool], times: int = 1) -> None:
        """Answer the next ``times`` requests whose WSGI environ ``match`` es with HTTP 500."""
        with self._lock:
            self._fail_rules.append((name, match, times))

    def _wsgi(self, environ: dict[str, Any], start_response: Callable) -> Any:
        with self._lock:
            for i, (name, match, times) in enumerate(self._fail_rules):
                if times > 0 and match(environ):
                    self._fail_rules[i] = (name, match, times - 1)
                    self.failures[name] = self.failures.get(name, 0) + 1
                    # Drain the body so the client sees a clean HTTP response, not a reset.
                    length = int(environ.get("CONTENT_LENGTH") or 0)
                    environ["wsgi.input"].read(length)
                    body = (
                        b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InternalError"
                        b"</Code><Message>injected fault</Message></Error>"
                    )
                    start_response(
                        "500 Internal Server Error",
                        [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))],
                    )
                    return [body]
        return self._app(environ, start_response)

    def start(self) -> None:
        """Serve on :attr:`port` (again, after :meth:`stop`)."""
        deadline = time.monotonic() + 10
        while True:
            try:
                self._server = make_server(
                    "127.0.0.1", self.port, self._wsgi, True, request_handler=MotoRequestHandler
                )
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the listening socket: new connections are refused."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None


class SlowProxy:
    """A TCP proxy on 127.0.0.1 that forwards bytes in small chunks, sleeping before each.

    Args:
        target_port: the port to forward to on 127.0.0.1.
        delay: seconds slept before forwarding each chunk (both directions).
        chunk: bytes per chunk.
    """

    def __init__(self, target_port: int, delay: float, chunk: int = 64 * 1024) -> None:
        self.target_port = target_port
        self.delay = delay
        self.chunk = chunk
        self.bytes_forwarded = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while not self._closed.is_set():
                data = source.recv(self.chunk)
                if not data:
                    break
                time.sleep(self.delay)
                sink.sendall(data)
                self.bytes_forwarded += len(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed.set()
        self._listener.close()


def find_secrets(texts: dict[str, bytes], *secrets: str) -> list[str]:
    """Names of the texts that contain any of ``secrets`` (as UTF-8 bytes)."""
    needles = [secret.encode() for secret in secrets]
    return sorted(name for name, data in texts.items() if any(n in data for n in needles))


def plan_file(tmp_path: Path, plan_dict: dict[str, Any]) -> str:
    """Write a build plan as JSON for a worker process; return its path."""
    path = tmp_path / f"plan-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(plan_dict))
    return str(path)

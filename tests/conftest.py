"""Shared fixtures: a loopback S3 server (moto) and storage roots over local and S3."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

FAKE_ACCESS_KEY = "AKIATESTFAKEACCESSKEY"
FAKE_SECRET_KEY = "fake-secret-key-never-logged-0123456789"
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Env:
    """A fresh bucket on the loopback S3 server, with the credentials that reach it."""

    endpoint_url: str
    bucket: str
    access_key: str
    secret_key: str
    region: str

    def uri(self, prefix: str = "") -> str:
        """``s3://{bucket}/{prefix}``."""
        return f"s3://{self.bucket}/{prefix}".rstrip("/")

    def client(self) -> Any:
        """A boto3 S3 client for checks the Storage API does not expose (ETags, raw keys)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (a free port), for the whole session."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as patch:
        # Clients created outside s3_env (session-scoped fixtures) must never pick up a
        # developer's real credentials.
        patch.setenv("AWS_ACCESS_KEY_ID", FAKE_ACCESS_KEY)
        patch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET_KEY)
        patch.setenv("AWS_DEFAULT_REGION", REGION)
        # The server's per-request access log goes to the root logger from its own threads,
        # where an in-process CLI test may have left a handler on a stream capsys has closed:
        # keep it quiet (requests still show in a failing test's captured botocore log).
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture
def s3_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> S3Env:
    """Point the standard AWS configuration at the loopback server and create a fresh bucket."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(name, raising=False)
    # Keep a developer's ~/.aws files out of the tests.
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    env = S3Env(
        endpoint_url=moto_endpoint,
        bucket=f"test-{uuid.uuid4().hex[:16]}",
        access_key=FAKE_ACCESS_KEY,
        secret_key=FAKE_SECRET_KEY,
        region=REGION,
    )
    env.client().create_bucket(Bucket=env.bucket)
    return env


@pytest.fixture(params=["local", "s3"])
def storage_uri(request: pytest.FixtureRequest, tmp_path) -> str:
    """A fresh, empty storage root URI: a local folder, then a prefix in a fresh S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "storage-root")
    env: S3Env = request.getfixturevalue("s3_env")
    return env.uri("storage-root")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are skipped where torch sees no CUDA device (CI, these machines);
    ``benchmarks/gpu_check.sh`` runs them on a GPU with ``-m gpu``."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_tests:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in gpu_tests:
        item.add_marker(skip)

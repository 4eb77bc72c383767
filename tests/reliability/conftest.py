"""Fixtures of the reliability tests: a dedicated, fault-injecting S3 server on loopback."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import boto3
import pytest
from reliability_helpers import FaultyS3Server, aws_env


@dataclass
class S3Target:
    """A fresh bucket on a :class:`FaultyS3Server`, with the environment pointing at it."""

    server: FaultyS3Server
    bucket: str

    def uri(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}".rstrip("/")

    def client(self, endpoint_url: str | None = None):
        env = aws_env(endpoint_url or self.server.endpoint_url)
        return boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
        )

    def objects(self) -> dict[str, bytes]:
        """Every object in the bucket, by key."""
        client = self.client()
        listing = client.list_objects_v2(Bucket=self.bucket).get("Contents", [])
        return {
            item["Key"]: client.get_object(Bucket=self.bucket, Key=item["Key"])["Body"].read()
            for item in listing
        }


@pytest.fixture
def faulty_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Target]:
    """A dedicated moto S3 server (stoppable, fault-injecting) with a fresh bucket."""
    server = FaultyS3Server()
    server.start()
    for name, value in aws_env(server.endpoint_url).items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(name, raising=False)
    target = S3Target(server=server, bucket=f"rel-{uuid.uuid4().hex[:12]}")
    target.client().create_bucket(Bucket=target.bucket)
    try:
        yield target
    finally:
        server.stop()

"""Object-store failures become clear StorageErrors that name the URI and never a credential."""

from __future__ import annotations

import json
import logging
import socket
import time
import urllib.request

import boto3
import pytest

from storage import (
    AccessDeniedError,
    BucketNotFoundError,
    EndpointUnreachableError,
    StorageError,
    open_storage,
)


def _assert_no_secret(exc: BaseException, caplog: pytest.LogCaptureFixture, *secrets: str) -> None:
    texts = [str(exc), repr(exc), caplog.text]
    for secret in secrets:
        for text in texts:
            assert secret not in text


def _set_moto_auth(endpoint: str, initial_no_auth_actions: str) -> None:
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=initial_no_auth_actions.encode(),
        # Not form-encoded: moto reads the raw body.
        headers={"Content-Type": "text/plain"},
        method="POST",
    )
    with urllib.request.urlopen(request) as response:
        assert json.loads(response.read())["status"] == "ok"


def test_missing_bucket(s3_env, caplog):
    caplog.set_level(logging.DEBUG, logger="storage")
    storage = open_storage(f"s3://missing-{s3_env.bucket}/root")
    for call in (
        lambda: storage.write_bytes("k", b"x"),
        lambda: storage.read_bytes("k"),
        lambda: storage.exists("k"),
        lambda: storage.size("k"),
        lambda: storage.list(),
    ):
        with pytest.raises(BucketNotFoundError) as info:
            call()
        assert f"missing-{s3_env.bucket}" in str(info.value)
        _assert_no_secret(info.value, caplog, s3_env.secret_key, s3_env.access_key)


@pytest.fixture
def moto_iam_user(s3_env, monkeypatch):
    """Real credentials of an IAM user allowed s3:*, with moto's authentication switched on."""
    iam = boto3.client("iam", endpoint_url=s3_env.endpoint_url, region_name=s3_env.region)
    name = f"user-{s3_env.bucket}"
    iam.create_user(UserName=name)
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
    }
    iam.put_user_policy(UserName=name, PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    _set_moto_auth(s3_env.endpoint_url, "0")
    try:
        yield key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        _set_moto_auth(s3_env.endpoint_url, "inf")


def test_bad_credentials_are_access_denied_without_leaking_them(
    s3_env, moto_iam_user, monkeypatch, caplog
):
    caplog.set_level(logging.DEBUG, logger="storage")
    caplog.set_level(logging.INFO)
    access_key, secret_key = moto_iam_user
    uri = s3_env.uri("root")

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret_key)
    good = open_storage(uri)
    good.write_bytes("k", b"ok")  # the real key works, so the refusals below are about the keys
    assert good.read_bytes("k") == b"ok"

    wrong_secret = secret_key[::-1]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    with pytest.raises(AccessDeniedError, match="SignatureDoesNotMatch") as info:
        open_storage(uri).read_bytes("k")
    assert uri in str(info.value)
    _assert_no_secret(info.value, caplog, access_key, secret_key, wrong_secret)

    unknown_key = "AKIAUNKNOWNKEY123456"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", unknown_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret_key)
    for call in (
        lambda s: s.write_bytes("k2", b"x"),
        lambda s: s.exists("k"),
        lambda s: s.list(),
    ):
        with pytest.raises(AccessDeniedError) as info:
            call(open_storage(uri))
        _assert_no_secret(info.value, caplog, unknown_key, secret_key, access_key)


def test_bad_credentials_on_multipart_upload(s3_env, moto_iam_user, monkeypatch, tmp_path):
    access_key, secret_key = moto_iam_user
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-" + secret_key)
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * (9 * 1024 * 1024))
    with pytest.raises(AccessDeniedError) as info:
        open_storage(s3_env.uri("root")).upload_file(big, "big.bin")
    assert secret_key not in str(info.value)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_endpoint(s3_env, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="storage")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    storage = open_storage(s3_env.uri("root"), max_attempts=2, connect_timeout=0.5)
    start = time.monotonic()
    with pytest.raises(EndpointUnreachableError) as info:
        storage.read_bytes("k")
    assert time.monotonic() - start < 10
    assert "127.0.0.1" in str(info.value) and s3_env.bucket in str(info.value)
    _assert_no_secret(info.value, caplog, s3_env.secret_key, s3_env.access_key)


def test_endpoint_override_beats_environment(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    storage = open_storage(s3_env.uri("root"), endpoint_url=s3_env.endpoint_url)
    storage.write_bytes("k", b"1")
    assert storage.read_bytes("k") == b"1"


def test_all_errors_are_storage_errors():
    for error in (BucketNotFoundError, AccessDeniedError, EndpointUnreachableError):
        assert issubclass(error, StorageError)

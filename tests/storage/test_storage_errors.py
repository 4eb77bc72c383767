"""Storage failures become clear StorageErrors: they name the URI or path and the cause, never a
credential, and an object store that never answers is given up on within a deadline."""

from __future__ import annotations

import builtins
import errno
import json
import logging
import os
import pickle
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator

import boto3
import pytest

from storage import (
    AccessDeniedError,
    BucketNotFoundError,
    EndpointUnreachableError,
    LocalStorage,
    ObjectNotFoundError,
    StorageError,
    open_storage,
)
from storage.core import is_transient, worth_retrying
from storage.errors import (
    NoSpaceError,
    ReadOnlyStorageError,
    StorageOSError,
    StoragePermissionError,
)
from storage.s3 import DEFAULT_DEADLINE, RequestDeadline, S3Storage


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


@pytest.fixture
def black_hole() -> Iterator[str]:
    """A loopback TCP server that accepts every connection and never sends a byte."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


def test_a_request_to_an_endpoint_that_never_answers_ends_within_its_deadline(
    s3_env, black_hole, monkeypatch
):
    """Ten attempts allowed (AWS_MAX_ATTEMPTS's way), a 3 s deadline: botocore would take ten
    read timeouts and its backoffs; the request gives up within the deadline, saying so."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", black_hole)
    storage = S3Storage.from_uri(s3_env.uri("root"), max_attempts=10, deadline=3)
    start = time.monotonic()
    with pytest.raises(EndpointUnreachableError) as info:
        storage.exists("k")
    elapsed = time.monotonic() - start
    # Within the deadline and a second of this process's own work (ten read timeouts and
    # botocore's backoffs would be over 30 s).
    assert elapsed <= 4.0, elapsed
    message = str(info.value)
    assert f"cannot check {s3_env.uri('root')}/k: endpoint {black_hole} unreachable" in message
    assert "at most 3 s per request, EXPLAIN_TRANSFER_STORAGE_DEADLINE" in message
    assert "ReadTimeoutError" in message and " attempt" in message

    # The same through the environment variable, as the command line reads it.
    monkeypatch.setenv("EXPLAIN_TRANSFER_STORAGE_DEADLINE", "2")
    storage = open_storage(s3_env.uri("root"), max_attempts=10)  # the client: not the request
    start = time.monotonic()
    with pytest.raises(EndpointUnreachableError, match="at most 2 s per request"):
        storage.read_bytes("k")
    elapsed = time.monotonic() - start
    assert elapsed <= 3.0, elapsed


def test_the_timeouts_follow_the_deadline_and_longer_ones_set_are_kept_and_said(monkeypatch):
    for name in (
        "EXPLAIN_TRANSFER_STORAGE_DEADLINE",
        "EXPLAIN_TRANSFER_S3_CONNECT_TIMEOUT",
        "EXPLAIN_TRANSFER_S3_READ_TIMEOUT",
    ):
        monkeypatch.delenv(name, raising=False)
    default = RequestDeadline.resolve()
    assert (default.deadline, default.connect_timeout, default.read_timeout) == (45, 5, 15)
    assert default.bound == 45 and DEFAULT_DEADLINE <= 45
    short = RequestDeadline.resolve(deadline=5)
    assert (short.connect_timeout, short.read_timeout, short.bound) == (1.25, 1.875, 5)

    monkeypatch.setenv("EXPLAIN_TRANSFER_S3_READ_TIMEOUT", "60")
    slow = RequestDeadline.resolve()
    assert (slow.read_timeout, slow.bound) == (60, 65)
    assert "at most 65 s per request" in slow.describe()
    assert "longer than the 45 s deadline" in slow.describe()

    monkeypatch.setenv("EXPLAIN_TRANSFER_STORAGE_DEADLINE", "soon")
    with pytest.raises(ValueError, match="EXPLAIN_TRANSFER_STORAGE_DEADLINE must be a number"):
        RequestDeadline.resolve()


def test_quick_failures_are_still_retried_as_configured_within_the_deadline(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    storage = S3Storage.from_uri(s3_env.uri("root"), max_attempts=4, deadline=45)
    with pytest.raises(EndpointUnreachableError, match=r"\(4 attempts in \d+\.\d s;"):
        storage.read_bytes("k")


@pytest.mark.parametrize(
    ("code", "kind", "words"),
    [
        (errno.ENOSPC, NoSpaceError, "No space left on device"),
        (errno.EDQUOT, NoSpaceError, "Disk quota exceeded"),
        (errno.EROFS, ReadOnlyStorageError, "Read-only file system"),
        (errno.EACCES, StoragePermissionError, "Permission denied"),
        (errno.EIO, StorageOSError, os.strerror(errno.EIO)),
    ],
)
def test_an_os_error_of_a_local_write_is_a_storage_error_naming_path_and_cause(
    tmp_path, monkeypatch, code, kind, words
):
    """The volume fails at the fsync before the rename (where a full disk with delayed
    allocation reports it): the error names the file and the cause, nothing is left behind."""
    storage = LocalStorage(tmp_path / "root")
    storage.write_bytes("a/old.bin", b"old")

    def failing_fsync(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(kind) as info:
        storage.write_bytes("a/b.bin", b"x" * 1000)
    error = info.value
    assert str(error) == f"cannot write {tmp_path / 'root' / 'a' / 'b.bin'}: {words}"
    assert isinstance(error, StorageError) and isinstance(error, OSError)
    assert (error.errno, error.filename) == (code, str(tmp_path / "root" / "a" / "b.bin"))
    assert sorted(p.name for p in (tmp_path / "root" / "a").iterdir()) == ["old.bin"]
    assert is_transient(error)  # a reader fails the unit rather than quarantine the object
    assert worth_retrying(error) == (kind is StorageOSError)
    # Prefect and Dask pickle a task's exception: it comes back whole.
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is kind and str(again) == str(error) and again.errno == code
    assert repr(again) == f"{kind.__name__}({str(error)!r})"


def test_a_file_deleted_after_its_listing_is_named_with_its_cause(tmp_path):
    storage = LocalStorage(tmp_path)
    storage.write_bytes("images/a.png", b"png")
    assert storage.list() == ["images/a.png"]
    (tmp_path / "images" / "a.png").unlink()
    for call in (storage.read_bytes, storage.size, storage.open_read):
        with pytest.raises(ObjectNotFoundError) as info:
            call("images/a.png")
        assert "No such file or directory" in str(info.value)
        assert str(tmp_path / "images" / "a.png") in str(info.value)
        assert is_transient(info.value) and not worth_retrying(info.value)


def test_a_folder_the_listing_cannot_read_fails_it_instead_of_being_skipped(tmp_path, monkeypatch):
    storage = LocalStorage(tmp_path)
    storage.write_bytes("a/1.png", b"1")
    storage.write_bytes("b/2.png", b"2")
    real_scandir = os.scandir

    def scandir(path: object = ".") -> object:
        if os.fspath(path) == str(tmp_path / "b"):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(StoragePermissionError) as info:
        storage.list()
    assert str(info.value) == f"cannot list {tmp_path / 'b'}: Permission denied"


def test_the_command_line_reports_the_storage_error_behind_prefect_or_a_task_group():
    from flows.cli_errors import error_lines, reported_error

    full = NoSpaceError("write", "/out/x.tar", errno.ENOSPC, "No space left on device")
    assert reported_error(full) is full
    group = getattr(builtins, "ExceptionGroup", None)  # Python 3.11+
    if group is not None:
        assert reported_error(group("tasks", [RuntimeError("other"), full])) is full
    try:
        try:
            raise full
        except NoSpaceError as exc:
            from prefect.exceptions import CrashedRun

            raise CrashedRun("the flow run crashed") from exc
    except CrashedRun as wrapped:
        assert reported_error(wrapped) is full
    assert reported_error(KeyError("a bug")) is None  # keeps its traceback
    assert error_lines(full) == ["error: cannot write /out/x.tar: No space left on device"]
    plain = OSError(errno.ENOSPC, "No space left on device", "/tmp/x")
    assert error_lines(plain) == ["error: /tmp/x: No space left on device"]

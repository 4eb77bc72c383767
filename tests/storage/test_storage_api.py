"""The Storage API behaves the same on a local folder and on a loopback S3 server."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pytest

from storage import ObjectNotFoundError, PathOutsideRootError, open_storage
from storage.local import LocalStorage
from storage.s3 import S3Storage


def test_open_storage_picks_backend_by_uri(tmp_path, s3_env):
    assert isinstance(open_storage(str(tmp_path)), LocalStorage)
    from_file_uri = open_storage(f"file://{tmp_path}/x")
    assert isinstance(from_file_uri, LocalStorage)
    assert from_file_uri.uri == f"{tmp_path}/x"
    s3 = open_storage(s3_env.uri("a/b"))
    assert isinstance(s3, S3Storage)
    assert s3.uri == f"s3://{s3_env.bucket}/a/b"
    with pytest.raises(ValueError, match="credentials"):
        open_storage(f"s3://key:secret@{s3_env.bucket}/x")
    with pytest.raises(ValueError, match="scheme"):
        open_storage("gs://bucket/x")


def test_bytes_round_trip_and_metadata(storage_uri):
    storage = open_storage(storage_uri)
    assert not storage.exists("a/b.bin")
    storage.write_bytes("a/b.bin", b"\x00payload\xff")
    assert storage.exists("a/b.bin")
    assert storage.read_bytes("a/b.bin") == b"\x00payload\xff"
    assert storage.size("a/b.bin") == 9
    storage.write_bytes("a/b.bin", b"replaced")
    assert storage.read_bytes("a/b.bin") == b"replaced"
    assert storage.url("a/b.bin") == storage_uri.rstrip("/") + "/a/b.bin"
    storage.delete("a/b.bin")
    assert not storage.exists("a/b.bin")
    storage.delete("a/b.bin")  # deleting a missing object is not an error


def test_missing_object_is_object_not_found_and_file_not_found(storage_uri, tmp_path):
    storage = open_storage(storage_uri)
    for call in (
        lambda: storage.read_bytes("nope"),
        lambda: storage.size("nope"),
        lambda: storage.open_read("nope"),
        lambda: storage.download_file("nope", tmp_path / "out"),
        lambda: storage.local_copy("nope").__enter__(),
    ):
        with pytest.raises(ObjectNotFoundError) as info:
            call()
        assert isinstance(info.value, FileNotFoundError)
        assert "nope" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_json_and_parquet_round_trip(storage_uri):
    storage = open_storage(storage_uri)
    obj = {"b": [1, 2.5, None], "a": {"nested": "é"}}
    storage.write_json("meta/config.json", obj)
    assert storage.read_json("meta/config.json") == obj
    table = pa.table({"name": ["x", "y"], "value": pa.array([1, 2], type=pa.int64())})
    storage.write_parquet("meta/table.parquet", table)
    assert storage.read_parquet("meta/table.parquet").equals(table)


def test_file_upload_download_and_local_copy(storage_uri, tmp_path):
    storage = open_storage(storage_uri)
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(4096))
    storage.upload_file(source, "files/source.bin")
    target = tmp_path / "down" / "copy.bin"
    storage.download_file("files/source.bin", target)
    assert target.read_bytes() == source.read_bytes()
    with storage.local_copy("files/source.bin") as path:
        assert path.read_bytes() == source.read_bytes()
        copied = path
    if isinstance(storage, LocalStorage):
        assert copied == storage.root / "files" / "source.bin" and copied.exists()
    else:
        assert not copied.exists(), "the temporary download must be removed"


def test_streaming_read(storage_uri):
    storage = open_storage(storage_uri)
    data = os.urandom(300_000)
    storage.write_bytes("stream.bin", data)
    chunks = []
    with storage.open_read("stream.bin") as stream:
        while chunk := stream.read(65536):
            chunks.append(chunk)
    assert len(chunks) >= 5
    assert b"".join(chunks) == data


def test_list_is_sorted_recursive_and_prefix_filtered(storage_uri):
    storage = open_storage(storage_uri)
    for key in ["b/2.txt", "a/1.txt", "a/sub/3.txt", "ab.txt", "c.txt"]:
        storage.write_bytes(key, key.encode())
    assert storage.list() == ["a/1.txt", "a/sub/3.txt", "ab.txt", "b/2.txt", "c.txt"]
    assert storage.list("a/") == ["a/1.txt", "a/sub/3.txt"]
    assert storage.list("a") == ["a/1.txt", "a/sub/3.txt", "ab.txt"]
    assert storage.list("a/sub/3") == ["a/sub/3.txt"]
    assert storage.list("zzz") == []


@pytest.mark.slow
def test_list_more_than_one_page(storage_uri):
    storage = open_storage(storage_uri)
    keys = [f"many/{i:05d}.txt" for i in range(1050)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda key: storage.write_bytes(key, b"x"), keys))
    storage.write_bytes("other.txt", b"y")
    assert storage.list("many/") == keys


def test_child_is_rooted_under_parent(storage_uri):
    storage = open_storage(storage_uri)
    child = storage.child("datasets/dom")
    child.write_bytes("x.bin", b"1")
    assert storage.read_bytes("datasets/dom/x.bin") == b"1"
    assert child.list() == ["x.bin"]
    assert child.uri == storage.uri + "/datasets/dom"


@pytest.mark.parametrize("key", ["../escape", "a/../../escape", "/abs/key", "s3://other/key", ""])
def test_keys_outside_root_are_refused(storage_uri, key):
    storage = open_storage(storage_uri)
    with pytest.raises(PathOutsideRootError):
        storage.write_bytes(key, b"x")
    with pytest.raises(PathOutsideRootError):
        storage.exists(key)
    if key:
        with pytest.raises(PathOutsideRootError):
            storage.child(key)


def test_symlink_escaping_local_root_is_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside")
    storage = open_storage(str(root))
    with pytest.raises(PathOutsideRootError):
        storage.write_bytes("link/file", b"x")
    assert not (tmp_path / "outside" / "file").exists()


def test_keys_are_normalised_alike(storage_uri):
    storage = open_storage(storage_uri)
    storage.write_bytes("a//./b.txt", b"1")
    assert storage.list() == ["a/b.txt"]
    assert storage.read_bytes("a/b.txt") == b"1"


def test_completion_markers(storage_uri):
    storage = open_storage(storage_uri)
    assert storage.completed() == set()
    assert not storage.is_complete("unit-000001")
    storage.mark_complete("unit-000001", {"samples": 3})
    storage.mark_complete("unit-000000")
    assert storage.is_complete("unit-000001")
    assert storage.completed() == {"unit-000000", "unit-000001"}
    assert storage.completion_info("unit-000001") == {"samples": 3}
    assert storage.list("_completions/") == [
        "_completions/unit-000000.json",
        "_completions/unit-000001.json",
    ]
    storage.clear_complete("unit-000001")
    assert storage.completed() == {"unit-000000"}


def test_multipart_upload_of_large_file(storage_uri, tmp_path, request):
    storage = open_storage(storage_uri)
    data = os.urandom(9 * 1024 * 1024 + 123)
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    storage.upload_file(source, "big/file.bin")
    storage.write_bytes("big/bytes.bin", data)
    assert storage.size("big/file.bin") == len(data)
    assert storage.read_bytes("big/file.bin") == data
    assert storage.read_bytes("big/bytes.bin") == data
    if isinstance(storage, S3Storage):
        client = request.getfixturevalue("s3_env").client()
        for key in ("big/file.bin", "big/bytes.bin"):
            etag = client.head_object(Bucket=storage.bucket, Key=storage.prefix + key)["ETag"]
            assert etag.strip('"').endswith("-2"), f"{key} was not a 2-part multipart upload"


def test_concurrent_reader_never_sees_a_partial_object(storage_uri, tmp_path):
    storage = open_storage(storage_uri)
    size = 9 * 1024 * 1024
    versions = [bytes([fill]) * size for fill in (0x41, 0x42, 0x43)]
    sources = []
    for i, version in enumerate(versions):
        path = tmp_path / f"v{i}.bin"
        path.write_bytes(version)
        sources.append(path)
    done = threading.Event()
    seen: list[str] = []
    bad: list[str] = []

    def reader() -> None:
        while not done.is_set():
            try:
                data = storage.read_bytes("shared/object.bin")
            except ObjectNotFoundError:
                seen.append("missing")
                continue
            if data in versions:
                seen.append(chr(data[0]))
            else:
                bad.append(f"partial object: {len(data)} bytes")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i, source in enumerate(sources):
            if i % 2:
                storage.write_bytes("shared/object.bin", source.read_bytes())
            else:
                storage.upload_file(source, "shared/object.bin")
    finally:
        done.set()
        thread.join()
    final = storage.read_bytes("shared/object.bin")
    assert final == versions[-1]
    assert not bad, bad[:3]
    assert len(seen) > 1
    if isinstance(storage, LocalStorage):
        assert not [p for p in storage.root.rglob("*") if p.name.endswith(".partial")]


def test_local_partial_files_are_not_listed(tmp_path):
    storage = open_storage(str(tmp_path))
    storage.write_bytes("a.txt", b"1")
    (tmp_path / ".b.txt.x1y2.partial").write_bytes(b"half")
    assert storage.list() == ["a.txt"]


def test_open_read_is_a_binary_stream(storage_uri):
    storage = open_storage(storage_uri)
    storage.write_bytes("s.bin", b"abcdef")
    with storage.open_read("s.bin") as stream:
        assert stream.read(2) == b"ab"
        assert stream.read() == b"cdef"


def test_done_units_is_is_done_for_many_units_with_one_listing(storage_uri):
    storage = open_storage(storage_uri)
    for unit in ("u0", "u1", "u2", "u3"):
        storage.write_bytes(unit, b"x")
    storage.publish_done("u0", "fp", samples=1)
    storage.publish_done("u1", "other inputs")
    storage.publish_done("u2", "fp")
    storage.delete("u2")  # marked, but its output is gone
    units = ["u0", "u1", "u2", "u3", "u4"]
    done = storage.done_units(units, "fp", lambda unit: (unit,))
    assert done == {"u0": {"fingerprint": "fp", "samples": 1}}
    assert list(done) == [u for u in units if storage.is_done(u, "fp", u)]
    assert storage.completion_infos(["u1", "u0"]) == [
        {"fingerprint": "other inputs"},
        {"fingerprint": "fp", "samples": 1},
    ]
    with pytest.raises(ObjectNotFoundError):
        storage.completion_infos(["u0", "u4"])
    storage.write_json_many([(f"many/{i}.json", {"i": i}) for i in range(20)])
    assert storage.read_json_many([f"many/{i}.json" for i in range(20)]) == [
        {"i": i} for i in range(20)
    ]


def test_s3_server_errors_left_after_retries_are_transient_and_others_are_not(s3_env):
    import botocore.exceptions
    from botocore.stub import Stubber

    from storage import AccessDeniedError, EndpointUnreachableError
    from storage.core import TransientStorageError, is_transient

    # One attempt: every stubbed answer is what is left after botocore's retries.
    storage = open_storage(s3_env.uri("t"), max_attempts=1)
    with Stubber(storage._client) as stub:
        stub.add_client_error("get_object", service_error_code="SlowDown", http_status_code=503)
        stub.add_client_error(
            "get_object", service_error_code="InternalError", http_status_code=500
        )
        stub.add_client_error("head_object", service_error_code="", http_status_code=502)
        stub.add_client_error("get_object", service_error_code="AccessDenied", http_status_code=403)
        for call, expected in (
            (lambda: storage.read_bytes("a"), "SlowDown"),
            (lambda: storage.read_bytes("a"), "InternalError"),
            (lambda: storage.exists("a"), "502"),
        ):
            with pytest.raises(TransientStorageError, match=expected) as info:
                call()
            assert is_transient(info.value) and f"s3://{s3_env.bucket}/t/a" in str(info.value)
        with pytest.raises(AccessDeniedError) as denied:
            storage.read_bytes("a")
        assert not is_transient(denied.value)

    class CutBody:
        """A body whose connection is reset after the first bytes."""

        def __init__(self) -> None:
            self.reads = 0

        def read(self, amt=None):
            self.reads += 1
            if self.reads > 1:
                raise botocore.exceptions.ResponseStreamingError(error="connection reset")
            return b"head"

        def close(self) -> None:
            pass

    with Stubber(storage._client) as stub:
        stub.add_response(
            "get_object", {"Body": CutBody()}, {"Bucket": s3_env.bucket, "Key": "t/a"}
        )
        with storage.open_read("a") as stream:
            assert stream.read(4) == b"head"
            with pytest.raises(EndpointUnreachableError) as cut:
                stream.read(4)
    assert is_transient(cut.value) and f"cannot read s3://{s3_env.bucket}/t/a" in str(cut.value)

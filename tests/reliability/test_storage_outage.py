"""Scenario 2: the object store goes away, slows down or fails a request; nothing is lost."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time

import pytest
from reliability_helpers import (
    FAKE_ACCESS_KEY,
    FAKE_SECRET_KEY,
    SlowProxy,
    build_config,
    dataset_samples,
)

from storage import EndpointUnreachableError, open_storage
from storage.layout import shard_name
from storage.shards import ShardWriter, complete_shards, read_shard
from tasks.build_dataset import finalize_build, label_shard, plan_build

RETRY_LOG = "Retry needed, retrying request"


def test_outage_is_retried_or_fails_clearly_and_a_rerun_loses_nothing(
    faulty_s3, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="botocore.retries")
    plan = plan_build(build_config(faulty_s3.uri("out")))
    dataset = open_storage(plan.dataset_uri)
    server = faulty_s3.server

    def outage(seconds: float | None):
        """A progress hook that takes the endpoint down once every image is labelled.

        The next request is then the shard's upload, whatever the machine's load (an outage
        started after the first batch could end before a slow labeller touched storage again).
        """
        state = {"fired": False}

        def hook(done: int, total: int) -> None:
            if done == total and not state["fired"]:
                state["fired"] = True
                server.stop()
                if seconds is not None:
                    threading.Timer(seconds, server.start).start()

        return hook

    # A 2 s outage while shard 0 is labelled: botocore's standard retries (with backoff)
    # outlast it and the shard is published whole.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "10")
    start = time.monotonic()
    outcome = label_shard(plan, 0, progress=outage(2.0))
    assert outcome.samples == 5 and time.monotonic() - start >= 2.0
    assert caplog.text.count(RETRY_LOG) >= 1
    assert [s["__key__"] for s in read_shard(dataset, plan.shard_key(0))] == [
        f"shapes-val-{i:06d}" for i in range(5)
    ]

    # An outage longer than the retries: the shard fails with a clear error naming the URI.
    caplog.clear()
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    with pytest.raises(EndpointUnreachableError) as info:
        label_shard(plan, 1, progress=outage(None))
    message = str(info.value)
    assert f"{plan.dataset_uri}/" in message and server.endpoint_url in message
    assert "unreachable after retries" in message
    assert caplog.text.count(RETRY_LOG) >= 2  # 3 attempts: 2 retries before giving up
    for text in (message, repr(info.value), caplog.text):
        assert FAKE_ACCESS_KEY not in text and FAKE_SECRET_KEY not in text

    server.start()
    assert complete_shards(dataset, "shapes-x", "val") == [plan.shard_key(0)]
    assert [label_shard(plan, i).skipped for i in range(2)] == [True, False]
    summary = finalize_build(plan)
    keys = [s["__key__"] for s in dataset_samples(dataset, "shapes-x", "val")]
    assert sorted(keys) == [f"shapes-val-{i:06d}" for i in range(10)]
    assert summary["samples"] == 10 and summary["missing"] == []


def _write_shard(storage, key: str, payloads: list[bytes]) -> str:
    with ShardWriter(storage, key) as writer:
        for index, payload in enumerate(payloads):
            writer.write({"__key__": f"{index:06d}", "bin": payload, "cls": index})
    assert writer.sha256 is not None
    return writer.sha256


def test_slow_endpoint_completes_and_a_stalled_one_times_out(faulty_s3) -> None:
    proxy = SlowProxy(faulty_s3.server.port, delay=0.02, chunk=16 * 1024)
    try:
        slow = open_storage(
            faulty_s3.uri("slow"), endpoint_url=proxy.endpoint_url, read_timeout=5, max_attempts=3
        )
        payloads = [os.urandom(100_000) for _ in range(3)]
        key = shard_name("slow", "train", 0)
        start = time.monotonic()
        sha = _write_shard(slow, key, payloads)
        samples = list(read_shard(slow, key))
        elapsed = time.monotonic() - start
        assert [s["bin"] for s in samples] == payloads
        # The bytes really went through the delaying proxy, and it slowed them down.
        assert proxy.bytes_forwarded > 2 * sum(map(len, payloads)) and elapsed > 0.5
        assert slow.completion_info(key)["sha256"] == sha
    finally:
        proxy.close()

    stalled = SlowProxy(faulty_s3.server.port, delay=3.0)
    try:
        storage = open_storage(
            faulty_s3.uri("slow"),
            endpoint_url=stalled.endpoint_url,
            read_timeout=0.5,
            max_attempts=2,
        )
        start = time.monotonic()
        with pytest.raises(EndpointUnreachableError, match="ReadTimeoutError"):
            storage.read_bytes(key)
        assert time.monotonic() - start < 15
    finally:
        stalled.close()


def test_a_5xx_on_one_multipart_part_is_retried_and_the_object_is_intact(faulty_s3) -> None:
    def is_upload_part(environ: dict) -> bool:
        return environ["REQUEST_METHOD"] == "PUT" and "partNumber=" in environ.get(
            "QUERY_STRING", ""
        )

    faulty_s3.server.fail("UploadPart", is_upload_part, times=1)
    # 5 MiB parts (the S3 minimum) and a 12 MiB shard: three parts, the first one fails once.
    storage = open_storage(faulty_s3.uri("multipart"), multipart_threshold=5 * 1024 * 1024)
    payloads = [os.urandom(4 * 1024 * 1024) for _ in range(3)]
    key = shard_name("big", "train", 0)
    sha = _write_shard(storage, key, payloads)

    assert faulty_s3.server.failures == {"UploadPart": 1}
    head = faulty_s3.client().head_object(Bucket=faulty_s3.bucket, Key=f"multipart/{key}")
    assert head["ETag"].strip('"').endswith("-3")  # it really was a 3-part upload
    stored = storage.read_bytes(key)
    assert hashlib.sha256(stored).hexdigest() == sha
    # read_shard checks the bytes against the completion marker's size and sha256.
    assert [s["bin"] for s in read_shard(storage, key)] == payloads

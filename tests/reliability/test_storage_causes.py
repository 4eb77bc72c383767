"""Storage failing under a running command: one ``error:`` line naming the path and the cause.

Each scenario runs the real command line in a fresh interpreter (``python -m flows.cli``) and
breaks its storage the way the world does: an object store that accepts connections and never
answers, an output volume that fills up, turns read-only or refuses the user in the middle of
labelling, an input image deleted between planning and labelling, an object store that
throttles every attempt to write a shard. Each checks: exit status 2; the last stderr line is
one ``error:`` line naming the path (or URI) and the cause in rsync's and git's words; when it
came; nothing half-written is marked complete; and, where the cause can be removed, that the
same command then completes with nothing lost or duplicated.

The volume faults are injected at the OS boundary of the command's process
(``os_faults/sitecustomize.py``): the tests run as root, where ``chmod`` takes nothing away, and
CI may not mount a small tmpfs. The fault starts once the first shard's completion marker is
published, so the run has planned, labelled and published one shard, and fails on the second.

The commands share one Prefect API started for the module (``PREFECT_API_URL``, as with
``prefect server``), which saves each run the private API's start; their logs are the same
(``$PREFECT_HOME/cli-runs/...`` during the run, ``{out}/logs/`` after).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from reliability_helpers import REPO_ROOT, FaultyS3Server, aws_env, dataset_samples
from test_cli_fast_errors import EXIT_WITHIN, TimedRun, _png, cli_env, run_timed, slowdown

from storage import open_storage
from storage.shards import complete_shards, read_shard

FAULTS = Path(__file__).with_name("os_faults")
#: The test's deadline per storage request (the default is 45 s).
DEADLINE = 5.0
#: The issue's bound on an idle machine for a line the argument checks print.
ERROR_WITHIN = 3.0
#: An idle bound for a build that fails mid-labelling, from the start to its error line: the
#: interpreter, planning and two shards, plus Prefect's retries of the failed task (2 s and
#: 10 s) and of finalizing (the same) where the volume refuses every write.
BUILD_WITHIN = 90.0

NAME, SPLIT = "shapes-x", "val"
SHARD_0, SHARD_1 = f"{NAME}-{SPLIT}-000000.tar", f"{NAME}-{SPLIT}-000001.tar"
LABEL = {"label": {"grid_h": 3, "grid_w": 3, "images_per_batch": 2}}


@pytest.fixture(scope="module")
def prefect_api_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One Prefect API (the one the command line starts for itself) for the module's runs."""
    from flows.cli_prefect import _start_server, _stop, _wait_healthy

    home = tmp_path_factory.mktemp("prefect-api")
    process, url = _start_server(home, home / "server.log")
    try:
        _wait_healthy(process, url, home / "server.log")
        yield url
    finally:
        _stop(process)


def _build_argv(tmp: Path, out: str, *input_args: str) -> list[str]:
    config = tmp / "build.json"
    config.write_text(json.dumps({"synthetic_per_class": 2, **LABEL}))
    inputs = list(input_args) or ["--input-kind", "synthetic", "--input", "shapes"]
    argv = ["build-dataset", "--config", str(config), "--name", NAME, "--split", SPLIT]
    return [*argv, *inputs, "--budget", "20", "--shards", "2", "--out", out]


def _env(tmp: Path, api_url: str, **extra: str) -> dict[str, str]:
    return cli_env(tmp, PREFECT_API_URL=api_url, **extra)


def _fault_env(out: Path, code: str, log: Path) -> dict[str, str]:
    """The output volume fails with ``code`` once the first shard is published."""
    return {
        "PYTHONPATH": f"{FAULTS}{os.pathsep}{REPO_ROOT}",
        "OS_FAULT_DIR": str(out),
        "OS_FAULT_ERRNO": code,
        "OS_FAULT_AFTER": f"_completions/{SHARD_0}.json",
        "OS_FAULT_LOG": str(log),
    }


def _last_line_is_the_error(run: TimedRun, *needles: str) -> tuple[float, str]:
    """Status 2, the last stderr line one ``error:`` line holding every needle; (when, line)."""
    assert run.returncode == 2, (run.returncode, run.stderr[-3000:])
    assert run.lines, run.stderr
    at, line = run.lines[-1]
    assert line.startswith("error: "), f"the last line is not the error: {run.stderr[-3000:]!r}"
    assert len(run.error_lines()) == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    for needle in needles:
        assert needle in line, line
    return at, line


def _assert_exits_after(run: TimedRun, at: float, factor: float) -> None:
    assert run.exited - at <= EXIT_WITHIN * factor, (
        f"the process exited {run.exited - at:.2f} s after its error line, over "
        f"{EXIT_WITHIN * factor:.2f} s"
    )


def _version(out: Path) -> Path:
    [version] = (out / NAME).glob("v-*")
    return version


def _only_whole_shards_are_complete(out: Path, complete: list[str]) -> dict[str, str]:
    """Exactly ``complete`` carry a marker, each vouches for its whole tar, nothing partial
    lies anywhere under ``out``; returns each complete shard's sha256."""
    version = _version(out)
    storage = open_storage(version)
    assert complete_shards(storage, NAME, SPLIT) == complete
    for shard in {SHARD_0, SHARD_1} - set(complete):
        assert not storage.exists(shard), f"{shard} was published without its marker"
    digests = {}
    for shard in complete:
        # read_shard checks the bytes' size and sha256, and the sample count, against the marker.
        assert list(read_shard(storage, shard))
        digests[shard] = storage.completion_info(shard)["sha256"]
    partial = [str(p) for p in out.rglob("*") if p.name.endswith(".partial")]
    assert partial == [], partial
    return digests


def _nothing_lost_or_duplicated(run: TimedRun, keys: list[str]) -> None:
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout)
    assert summary["missing"] == [] and summary["complete"] == [SHARD_0, SHARD_1]
    assert summary["samples"] == len(keys)
    samples = dataset_samples(open_storage(summary["dataset_uri"]), NAME, SPLIT)
    assert [s["__key__"] for s in samples] == keys


#: The sample keys of the synthetic input (``shapes``/val, 2 per class).
SYNTHETIC_KEYS = [f"shapes-{SPLIT}-{i:06d}" for i in range(10)]


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


def test_an_endpoint_that_never_answers_is_one_line_within_the_deadline(
    black_hole: str, tmp_path: Path
) -> None:
    factor = slowdown(tmp_path)
    env = cli_env(tmp_path, **aws_env(black_hole), EXPLAIN_TRANSFER_STORAGE_DEADLINE=str(DEADLINE))
    run = run_timed(
        ["build-dataset", "--name", NAME, "--input", "shapes", "--out", "s3://bucket/x"],
        tmp_path,
        env,
        timeout=120,
    )
    at, line = _last_line_is_the_error(
        run, f"endpoint {black_hole} unreachable", "s3://bucket/x/", "ReadTimeoutError"
    )
    assert f"at most {DEADLINE:g} s per request" in line
    assert len(run.lines) == 1, run.stderr
    # The request gave up within the deadline; the line came after the argument checks'
    # own bound, plus that deadline.
    assert at <= DEADLINE + ERROR_WITHIN * factor, f"{at:.1f} s: {line}"
    _assert_exits_after(run, at, factor)
    assert not (tmp_path / "prefect-home").exists()  # found before any Prefect API started
    print(f"\nblack hole: error line {at:.1f} s after the start: {line}")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("code", "cause"),
    [
        ("ENOSPC", "No space left on device"),
        ("EROFS", "Read-only file system"),
        ("EACCES", "Permission denied"),
    ],
)
def test_an_output_volume_failing_mid_labelling_is_one_line_naming_path_and_cause(
    code: str, cause: str, prefect_api_url: str, tmp_path: Path
) -> None:
    """Full, read-only or refused after the first shard: the second shard and the manifest
    fail; the line names the file and the cause; the full log stays in the Prefect home, and
    a line says where. Freed (for the full disk), the same command completes the dataset."""
    factor = slowdown(tmp_path)
    out, faults = tmp_path / "out", tmp_path / "faults.log"
    argv = _build_argv(tmp_path, str(out))
    env = _env(tmp_path, prefect_api_url, **_fault_env(out, code, faults))
    started = time.time()
    run = run_timed(argv, tmp_path, env)
    at, line = _last_line_is_the_error(run, f"{_version(out)}/", f": {cause}")
    first_fault = float(faults.read_text().split()[0])
    assert at <= BUILD_WITHIN * factor, f"{at:.1f} s: {line}"
    _assert_exits_after(run, at, factor)

    # The log could not go to {out}/logs: it is where the line before the error says.
    home = tmp_path / "prefect-home" / "cli-runs"
    [run_log] = home.glob("*/run.log")
    assert run.lines[-2][1] == (
        f"full log: {run_log} (not moved: cannot create {out / 'logs'}: {cause})"
    ), run.stderr[-2000:]
    assert f": {cause}" in run_log.read_text()
    assert not (out / "logs").exists()

    digests = _only_whole_shards_are_complete(out, [SHARD_0])
    print(
        f"\n{code}: error line {at:.1f} s after the start, {started + at - first_fault:.1f} s "
        f"after the first refused call: {line}"
    )
    if code != "ENOSPC":
        return

    tar = _version(out) / SHARD_0
    stamp = tar.stat().st_mtime_ns
    run = run_timed(argv, tmp_path, _env(tmp_path, prefect_api_url))
    _nothing_lost_or_duplicated(run, SYNTHETIC_KEYS)
    # The shard published before the disk filled up was kept, not labelled again.
    assert tar.stat().st_mtime_ns == stamp
    assert _only_whole_shards_are_complete(out, [SHARD_0, SHARD_1])[SHARD_0] == digests[SHARD_0]
    assert len(list((out / "logs").glob("*-run.log"))) == 1


def _image_folder(root: Path) -> list[str]:
    """Two classes of three 32x32 PNGs; their sorted keys."""
    colours = {"a": (200, 30, 30), "b": (30, 30, 200)}
    for name, (r, g, b) in colours.items():
        for i in range(3):
            _png(root / name / f"{i}.png", (r, g + 40 * i, b))
    return sorted(f"{name}/{i}.png" for name in colours for i in range(3))


@pytest.mark.slow
def test_an_input_deleted_between_planning_and_labelling_is_one_line_and_restored_completes(
    prefect_api_url: str, tmp_path: Path
) -> None:
    """The image is really deleted (no injection) once the plan is published: the shard that
    lists it fails, naming the file, instead of quarantining it under a version whose listing
    vouches for it; the other shard is complete. Put back, the same command finishes."""
    factor = slowdown(tmp_path)
    images, out = tmp_path / "images", tmp_path / "out"
    keys = _image_folder(images)
    argv = _build_argv(tmp_path, str(out), "--input-kind", "imagefolder", "--input", str(images))
    env = _env(tmp_path, prefect_api_url)
    runs: list[TimedRun] = []
    worker = threading.Thread(target=lambda: runs.append(run_timed(argv, tmp_path, env)))
    worker.start()
    deleted, saved = _delete_once_planned(out, images, worker)
    worker.join()
    [run] = runs
    at, line = _last_line_is_the_error(
        run, f"cannot read {deleted}: No such file or directory", "1 of 2 shards failed"
    )
    assert at <= BUILD_WITHIN * factor, f"{at:.1f} s: {line}"
    _assert_exits_after(run, at, factor)
    summary = json.loads(run.stdout)  # the summary first, on stdout
    assert summary["missing"] == [SHARD_1] and summary["quarantined"] == 0
    digests = _only_whole_shards_are_complete(out, [SHARD_0])
    print(f"\ndeleted input: error line {at:.1f} s after the start: {line}")

    deleted.write_bytes(saved)
    run = run_timed(argv, tmp_path, env)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout)
    assert found["version"] == summary["version"]  # the same listing: the same version
    assert found["samples"] == len(keys) and found["quarantined"] == 0
    samples = dataset_samples(open_storage(found["dataset_uri"]), NAME, SPLIT)
    assert len(samples) == len({s["__key__"] for s in samples}) == len(keys)
    assert _only_whole_shards_are_complete(out, [SHARD_0, SHARD_1])[SHARD_0] == digests[SHARD_0]


def _delete_once_planned(out: Path, images: Path, worker: threading.Thread) -> tuple[Path, bytes]:
    """Wait for the plan's marker, delete the last input of the second shard; (path, bytes)."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and worker.is_alive():
        markers = list(out.glob(f"{NAME}/v-*/_completions/plan.json"))
        if markers:
            version = markers[0].parents[1]
            plan = json.loads((version / "plan" / f"{SHARD_1[: -len('.tar')]}.json").read_text())
            # A unit of an image folder is "{class_id}:{key}:{path}".
            path = images / plan["units"][-1].split(":", 2)[2]
            saved = path.read_bytes()
            path.unlink()
            return path, saved
        time.sleep(0.01)
    raise AssertionError("the build never published its plan")


class ThrottlingS3Server(FaultyS3Server):
    """moto's S3 that answers the requests ``throttle`` picks ``503 SlowDown``, as S3 does."""

    def __init__(self) -> None:
        super().__init__()
        self.throttle: Callable[[dict[str, Any]], bool] | None = None
        self.throttled = 0

    def _wsgi(self, environ: dict[str, Any], start_response: Callable) -> Any:
        if self.throttle is not None and self.throttle(environ):
            self.throttled += 1
            environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            body = (
                b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
                b"<Message>Please reduce your request rate.</Message></Error>"
            )
            start_response(
                "503 Slow Down",
                [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))],
            )
            return [body]
        return super()._wsgi(environ, start_response)


@pytest.mark.slow
def test_s3_throttling_every_attempt_is_one_line_and_the_rerun_completes(
    prefect_api_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every PUT of the second shard's tar is answered 503 SlowDown: botocore's retries and
    the task's are spent, the line names the object and the service's answer, the first shard
    is complete. Once the store stops throttling, the same command finishes."""
    factor = slowdown(tmp_path)
    server = ThrottlingS3Server()
    server.start()
    try:
        bucket = f"rel-{uuid.uuid4().hex[:12]}"
        env = _env(tmp_path, prefect_api_url, **aws_env(server.endpoint_url))
        for name, value in aws_env(server.endpoint_url).items():
            monkeypatch.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_MAX_ATTEMPTS"):
            monkeypatch.delenv(name, raising=False)
        import boto3

        boto3.client("s3").create_bucket(Bucket=bucket)
        server.throttle = lambda e: (
            e["REQUEST_METHOD"] == "PUT" and e["PATH_INFO"].endswith(f"/{SHARD_1}")
        )
        out = f"s3://{bucket}/x"
        argv = _build_argv(tmp_path, out)
        run = run_timed(argv, tmp_path, env)
        at, line = _last_line_is_the_error(
            run, f"{out}/{NAME}/v-", f"/{SHARD_1}: the service failed after retries", "SlowDown"
        )
        assert at <= BUILD_WITHIN * factor, f"{at:.1f} s: {line}"
        _assert_exits_after(run, at, factor)
        assert server.throttled >= 3  # botocore's 3 attempts, at least once
        summary = json.loads(run.stdout)
        storage = open_storage(summary["dataset_uri"])
        assert complete_shards(storage, NAME, SPLIT) == [SHARD_0]
        assert not storage.exists(SHARD_1)
        digest = hashlib.sha256(storage.read_bytes(SHARD_0)).hexdigest()
        print(f"\nSlowDown: error line {at:.1f} s after the start: {line}")

        server.throttle = None
        run = run_timed(argv, tmp_path, env)
        _nothing_lost_or_duplicated(run, SYNTHETIC_KEYS)
        assert hashlib.sha256(storage.read_bytes(SHARD_0)).hexdigest() == digest
    finally:
        server.stop()

"""The command line as an adversarial user meets it: one-line errors, no leaks, no hangs.

Commands run as a user runs them, in a fresh interpreter (``python -m flows.cli``), with a time
limit that turns a hang into a failure. Expected failures must print ``error:`` lines only (no
traceback, no pydantic URL), exit with status 2 and write nothing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from reliability_helpers import (
    FAKE_ACCESS_KEY,
    FAKE_SECRET_KEY,
    REPO_ROOT,
    aws_env,
    start_cli,
)

from storage import EndpointUnreachableError, open_storage
from storage.s3 import DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT

#: A progress bar's redraw (tqdm, on a terminal) or a progress line (off one, flows.progress).
PROGRESS = re.compile(r"\d+/\d+ \[[^\]]*\]$|: \d+/\d+ \w+ \(\d+%\), [\d:]+ elapsed")
SESSION_TOKEN = "FwoGZXIvYXdzEXAMPLESESSIONTOKENmustneverbeprinted0123456789"


def cli_env(cwd: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """A command's environment: no AWS or Prefect API settings of ours, a private Prefect
    home under ``cwd``, no AWS config files or instance metadata, then ``env``."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PREFECT_API"))},
        "PYTHONPATH": str(REPO_ROOT),
        "PREFECT_HOME": str(cwd / "prefect-home"),
        "AWS_CONFIG_FILE": "/nonexistent/aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
        "AWS_EC2_METADATA_DISABLED": "true",
        **(env or {}),
    }


def run_cli(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``explain-transfer ARGS`` in a fresh interpreter; a run past ``timeout`` fails the test."""
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=cwd,
        env=cli_env(cwd, env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Status 2, ``error:`` lines only on stderr, each needle in them; returns stderr."""
    err = result.stderr
    assert result.returncode == 2, (result.returncode, err[-3000:])
    # Progress bars (tqdm redraws them on stderr) are not messages.
    lines = [line for line in err.splitlines() if line.strip() and not PROGRESS.search(line)]
    assert lines and all(line.startswith("error: ") for line in lines), err[-3000:]
    assert "Traceback" not in err and "pydantic" not in err and "errors.pydantic.dev" not in err
    for needle in needles:
        assert needle in err, err
    return err


BUILD = ["build-dataset", "--name", "shapes-x", "--input-kind", "synthetic", "--input", "shapes"]


@pytest.mark.slow
def test_config_errors_are_one_line_per_field(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli([*BUILD, "--budget", "-5", "--shards", "0", "--out", str(out)], tmp_path)
    err = assert_one_line_error(result, "label.budget: must be >= 2 (got -5)")
    assert "num_shards: must be >= 1 (got 0)" in err and len(err.strip().splitlines()) == 2

    config = tmp_path / "demo.json"
    config.write_text(json.dumps({"epochs": 0, "colour": "red"}))
    result = run_cli(["demo", "--config", str(config), "--out", str(out)], tmp_path)
    err = assert_one_line_error(result, "epochs: must be >= 1 (got 0)", "colour: unknown field")
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("[1, 2]", "must be a JSON object of fields, got a list"),
        ('{"label": null}', "label: must be an object (got null)"),
        ('{"label": [3]}', "label: must be an object (got [3])"),
        ("{not json", "cannot read config"),
    ],
)
def test_malformed_json_configs_are_one_line(tmp_path: Path, content: str, needle: str) -> None:
    config = tmp_path / "build.json"
    config.write_text(content)
    result = run_cli([*BUILD, "--config", str(config), "--out", str(tmp_path / "o")], tmp_path)
    assert_one_line_error(result, needle)
    assert not (tmp_path / "o").exists()


def test_out_pointing_at_a_file_fails_before_compute(tmp_path: Path) -> None:
    target = tmp_path / "a-file"
    target.write_text("keep me")
    result = run_cli([*BUILD, "--budget", "60", "--out", str(target / "sub")], tmp_path)
    assert_one_line_error(result, "is a file, not a folder")
    assert target.read_text() == "keep me"


def test_image_size_that_the_model_does_not_take_fails_before_compute(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli([*BUILD, "--image-size", "64", "--out", str(out)], tmp_path)
    assert_one_line_error(result, "image size 64 does not match model tiny-vit-56", "56x56")
    assert not out.exists()


def test_unreachable_dask_scheduler_fails_before_compute(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "out"
    argv = [*BUILD, "--dask-address", f"tcp://127.0.0.1:{port}", "--out", str(out)]
    result = run_cli(argv, tmp_path, timeout=60)
    assert_one_line_error(result, f"cannot reach the Dask scheduler at tcp://127.0.0.1:{port}")
    assert not out.exists()


def test_s3_without_credentials_or_bucket_is_one_line(faulty_s3, tmp_path: Path) -> None:
    endpoint = {
        "AWS_ENDPOINT_URL": faulty_s3.server.endpoint_url,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    result = run_cli([*BUILD, "--out", faulty_s3.uri("x")], tmp_path, env=endpoint)
    assert_one_line_error(result, "no usable credentials")

    env = aws_env(faulty_s3.server.endpoint_url)
    result = run_cli([*BUILD, "--out", "s3://no-such-bucket-here/x"], tmp_path, env=env)
    assert_one_line_error(result, "bucket not found")
    assert faulty_s3.objects() == {}


def test_verbose_never_prints_credentials(faulty_s3, tmp_path: Path) -> None:
    env = aws_env(faulty_s3.server.endpoint_url, AWS_SESSION_TOKEN=SESSION_TOKEN)
    result = run_cli(["-v", *BUILD, "--out", "s3://no-such-bucket-here/x"], tmp_path, env=env)
    assert result.returncode == 2
    assert " DEBUG " in result.stderr  # -v did turn debug logging on
    for secret in (FAKE_ACCESS_KEY, FAKE_SECRET_KEY, SESSION_TOKEN):
        assert secret not in result.stderr + result.stdout


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """A loopback TCP server that accepts connections and never sends a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
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


def test_an_endpoint_that_never_answers_fails_instead_of_hanging(
    silent_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in aws_env(silent_endpoint).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("EXPLAIN_TRANSFER_S3_READ_TIMEOUT", "1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    storage = open_storage("s3://bucket/prefix")
    outcome: list[BaseException] = []

    def probe() -> None:
        try:
            storage.exists("key")
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the request hung past its read timeout and retries"
    assert isinstance(outcome[0], EndpointUnreachableError), outcome
    assert "ReadTimeout" in str(outcome[0])

    # The same through the command line: one line, status 2.
    env = {**aws_env(silent_endpoint), "EXPLAIN_TRANSFER_S3_READ_TIMEOUT": "1"}
    result = run_cli([*BUILD, "--out", "s3://bucket/x"], tmp_path, env=env, timeout=60)
    assert_one_line_error(result, "unreachable")

    # Without any setting, every request is still bounded.
    monkeypatch.delenv("EXPLAIN_TRANSFER_S3_READ_TIMEOUT")
    config = open_storage("s3://bucket/prefix")._client.meta.config
    assert (config.connect_timeout, config.read_timeout) == (
        DEFAULT_CONNECT_TIMEOUT,
        DEFAULT_READ_TIMEOUT,
    )


@pytest.mark.slow
def test_two_runs_at_once_on_a_busy_machine_print_no_traceback(tmp_path: Path) -> None:
    """A miniature demo and an export start together on one fresh Prefect home, while two
    processes keep both cores busy: each gets its own temporary API, both succeed, and the
    console shows no traceback (the server logs are in files under each output)."""
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PREFECT_API"))},
        "PYTHONPATH": str(REPO_ROOT),
        "PREFECT_HOME": str(tmp_path / "shared-prefect-home"),
    }
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        commands = {
            "demo": ["demo", "--miniature", "--out", str(tmp_path / "demo")],
            "export": ["export", "--domain", "glyphs", "--out", str(tmp_path / "export")],
        }
        running = {name: start_cli(argv, tmp_path, full_env) for name, argv in commands.items()}
        outputs = {name: process.communicate(timeout=1500) for name, process in running.items()}
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    for name, (stdout, stderr) in outputs.items():
        assert running[name].returncode == 0, (name, stderr[-3000:])
        for text in ("Traceback", "database is locked", "OperationalError"):
            assert text not in stdout + stderr, (name, stderr[-3000:])
        logs = tmp_path / name / "logs"
        assert len(list(logs.glob("*-server.log"))) == 1 and list(logs.glob("*-run.log"))
    assert f"all outputs under {tmp_path / 'demo'} (" in outputs["demo"][0]
    assert f"full logs under {tmp_path / 'demo' / 'logs'}" in outputs["demo"][0]
    # Each run had its own home; the databases went with the runs.
    assert not list((tmp_path / "shared-prefect-home").rglob("prefect.db"))


def _children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while being read
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_sigterm_stops_the_run_with_its_server_keeps_its_logs_and_the_same_command_resumes(
    tmp_path: Path,
) -> None:
    """A scheduler's SIGTERM in the middle of a flow: one error line, status 143, the private
    Prefect API stopped (not left as an orphan), the run's logs under the output, the completed
    stages untouched by the rerun, which finishes the run."""
    out = tmp_path / "demo"
    argv = ["demo", "--miniature", "--out", str(out)]
    process = start_cli(argv, tmp_path, cli_env(tmp_path))
    try:
        # Inside the pipeline's flow: the export is complete and a fine-tuning has begun.
        deadline = time.monotonic() + 300
        while not (out / "models").is_dir() or not any((out / "models").iterdir()):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the run never reached its fine-tuning"
            time.sleep(0.2)
        done = {
            path: path.stat().st_mtime_ns
            for path in out.rglob("*")
            if "_completions" in path.parts and path.is_file()
        }
        server = _children(process.pid)
        assert server, "no private Prefect API was running"
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "error: terminated (SIGTERM)" in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert not [pid for pid in server if _alive(pid)], "the Prefect API outlived the run"
    logs = out / "logs"
    assert list(logs.glob("*-run.log")) and list(logs.glob("*-server.log"))
    assert done, "nothing was complete before the signal"

    rerun = run_cli(argv, tmp_path, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"all outputs under {out} (" in rerun.stdout
    assert {path: path.stat().st_mtime_ns for path in done} == done

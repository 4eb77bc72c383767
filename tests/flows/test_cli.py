"""The ``explain-transfer`` command line runs the same flows, and refuses bad input clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds

from flows.cli import main


def test_build_dataset_command_writes_the_shards(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "build.json"
    config.write_text(json.dumps({"synthetic_per_class": 1, "label": {"grid_h": 3, "grid_w": 3}}))
    argv = ["build-dataset", "--config", str(config), "--name", "shapes-x", "--split", "val"]
    argv += ["--input-kind", "synthetic", "--input", "shapes", "--budget", "30", "--shards", "2"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0

    summary = json.loads(capsys.readouterr().out)
    assert summary["missing"] == [] and summary["samples"] == summary["inputs"] == 5
    shards = sorted(Path(summary["dataset_uri"]).glob("shapes-x-val-*.tar"))
    samples = list(wds.WebDataset([str(s) for s in shards], shardshuffle=False))
    assert len(shards) == 2 and len(samples) == 5
    assert all("shap.npy" in s and "png" in s for s in samples)


def test_build_dataset_decodes_on_the_device_when_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--decode device`` with JPEG input (here the device is the CPU): the version records it
    and differs from the host-decoded one, the stored images stay the original JPEG bytes."""
    import io

    import numpy as np
    from PIL import Image

    folder = tmp_path / "folder"
    originals = {}
    for i, name in enumerate(["a/one.jpg", "a/two.jpg", "b/three.jpg", "b/four.jpg"]):
        pixels = np.random.default_rng(i).integers(0, 256, (60, 80, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(buffer.getvalue())
        originals[name.rsplit(".", 1)[0]] = buffer.getvalue()
    argv = ["build-dataset", "--name", "jpegs-x", "--split", "val", "--input-kind"]
    argv += ["imagefolder", "--input", str(folder), "--budget", "30", "--shards", "1"]
    config = tmp_path / "build.json"
    config.write_text(json.dumps({"label": {"grid_h": 3, "grid_w": 3}, "device": "cpu"}))
    argv += ["--config", str(config)]
    uris = {}
    for decode in ("host", "device"):
        assert main([*argv, "--decode", decode, "--out", str(tmp_path / decode)]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["missing"] == [] and summary["samples"] == 4
        uris[decode] = Path(summary["dataset_uri"])
    assert uris["host"].name != uris["device"].name  # another version
    recorded = json.loads((uris["device"] / "config.json").read_text())
    assert recorded["config"]["decode"] == "device"
    shards = sorted(uris["device"].glob("jpegs-x-val-*.tar"))
    samples = list(wds.WebDataset([str(s) for s in shards], shardshuffle=False))
    assert {s["__key__"]: s["jpg"] for s in samples} == originals


def test_bad_configuration_is_a_clear_error_and_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["build-dataset", "--name", "x", "--input-kind", "synthetic", "--input", "shapes"]
    assert main([*argv, "--budget", "10", "--out", str(tmp_path)]) == 2
    assert "budget 10 is not larger than the number of players 49" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_pretrain_command_on_fresh_images_writes_the_base_model(tmp_path: Path) -> None:
    """The shipped base's recipe (fresh images rendered by a loader worker) runs to the end under
    the command's orchestrator: its worker once died at exit and failed the finished run. Run as
    the command itself, in its own process, as users run it."""
    config = tmp_path / "pretrain.json"
    config.write_text(
        json.dumps({"fresh_steps": 6, "batch_size": 8, "warmup_steps": 2, "val_per_class": 2})
    )
    argv = ["pretrain", "--config", str(config), "--out", str(tmp_path / "out")]
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", *argv], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    uri = done.stdout.strip().splitlines()[-1]
    assert uri.endswith("model.safetensors") and Path(uri).stat().st_size > 0
    sidecar = json.loads(Path(uri).with_suffix(".json").read_text())
    assert sidecar["metrics"]["steps"] == 6


REMOTE = "tcp://10.1.2.3:8786"  # a scheduler on another machine (nothing is contacted)


def _build_argv(tmp_path: Path, address: str) -> list[str]:
    """A build of 5 images on a 3x3 grid into ``tmp_path/out``, on the Dask cluster ``address``."""
    config = tmp_path / "build.json"
    config.write_text(json.dumps({"synthetic_per_class": 1, "label": {"grid_h": 3, "grid_w": 3}}))
    argv = ["build-dataset", "--config", str(config), "--name", "shapes-x", "--split", "val"]
    argv += ["--input-kind", "synthetic", "--input", "shapes", "--budget", "30", "--shards", "2"]
    return [*argv, "--out", str(tmp_path / "out"), "--dask-address", address]


def test_a_remote_dask_cluster_needs_a_prefect_api_its_workers_reach(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its workers would report every shard to their own loopback: refused in one line, before
    the private API, the scheduler connection or any output."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    out = tmp_path / "out"
    # No PREFECT_API_URL: the command would start its private API on 127.0.0.1.
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(_build_argv(tmp_path, REMOTE)) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == (
        f"error: workers of the Dask scheduler {REMOTE} (not on loopback) cannot reach this "
        "run's private Prefect API on 127.0.0.1: set PREFECT_API_URL to a Prefect server they "
        "reach (e.g. http://PREFECT-HOST:4200/api; docs/orchestration.md), or use a scheduler "
        "on this machine at tcp://127.0.0.1:PORT"
    )
    # A PREFECT_API_URL on loopback (this test's API, `explain-transfer serve`) is no better.
    assert main(_build_argv(tmp_path, REMOTE)) == 2
    assert "cannot reach the Prefect API at http://127.0.0.1:" in capsys.readouterr().err
    # The shipped real-run config names a remote cluster: it is refused the same way.
    real = Path(__file__).resolve().parents[2] / "configs" / "imagenet-vit-b-32.json"
    assert main(["run", "--config", str(real), "--out", str(out)]) == 2
    assert "tcp://scheduler:8786 (not on loopback)" in capsys.readouterr().err
    assert not out.exists()


def test_an_explicit_prefect_api_url_is_what_a_remote_cluster_reports_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings
    from prefect_dask import DaskTaskRunner

    from flows.cli_checks import check_dask_api
    from flows.cli_prefect import prefect_api
    from flows.runners import RunnerConfig, check_workers_reach_api, make_task_runner

    remote = RunnerConfig(kind="dask", address=REMOTE)
    api = "http://prefect.internal:4200/api"
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    environment = os.environ.get("PREFECT_API_URL")
    with temporary_settings(updates={PREFECT_API_URL: api}):
        check_dask_api(remote)
        runner = make_task_runner(remote)
        assert isinstance(runner, DaskTaskRunner) and runner.address == REMOTE
        # The command uses that API as it is: no private one, nothing rewritten.
        with prefect_api(None) as logs:
            assert get_current_settings().api.url == api
            assert logs.server_log is None
            assert os.environ.get("PREFECT_API_URL") == environment
    # A scheduler on loopback has its workers here: any API of this machine, the private one
    # included, is reachable.
    for address in ("tcp://127.0.0.1:8786", "tcp://localhost:8786", "tcp://[::1]:8786"):
        check_workers_reach_api(RunnerConfig(kind="dask", address=address), None)
    check_workers_reach_api(RunnerConfig(kind="dask"), None)  # a LocalCluster of this run


@pytest.mark.slow
def test_a_loopback_dask_cluster_labels_with_the_private_api(tmp_path: Path) -> None:
    """An existing cluster on 127.0.0.1 and no PREFECT_API_URL: the command's private API is
    what the workers report to, and the build completes. Run as the command itself."""
    from distributed import LocalCluster

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "home")
    with LocalCluster(
        n_workers=1, threads_per_worker=1, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        done = subprocess.run(
            [sys.executable, "-m", "flows.cli", *_build_argv(tmp_path, cluster.scheduler_address)],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["missing"] == [] and summary["samples"] == 5
    assert len(list(Path(summary["dataset_uri"]).glob("shapes-x-val-*.tar"))) == 2


_AS_PROGRAM = """
import atexit, sys, threading, time
from flows import cli

def late():
    time.sleep(0.2)
    print("thread done", flush=True)

atexit.register(lambda: print("atexit ran", flush=True))
threading.Thread(target=late).start()
sys.argv = ["explain-transfer", *sys.argv[1:]]
cli.main()
print("not reached")
"""


@pytest.mark.parametrize(
    ("argv", "status"),
    [
        (["results", "--out", "no-such-run"], 2),  # an expected failure: one error line
        (["no-such-command"], 2),  # argparse's own exit
        (["--help"], 0),
    ],
)
def test_the_program_ends_with_its_status_after_its_threads_and_atexit_handlers(
    tmp_path: Path, argv: list[str], status: int
) -> None:
    """Run as the program, main() ends the process itself (os._exit: no C++ static destructors,
    whose native thread pools aborted finished demos with SIGABRT), but only after what the
    interpreter's shutdown would have done first: its non-daemon threads end, atexit runs."""
    done = subprocess.run(
        [sys.executable, "-c", _AS_PROGRAM, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == status, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert "thread done" in lines and lines[-1] == "atexit ran"
    assert "not reached" not in lines

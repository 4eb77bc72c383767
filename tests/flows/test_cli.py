"""The ``explain-transfer`` command line runs the same flows, and refuses bad input clearly."""

from __future__ import annotations

import json
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


def test_bad_configuration_is_a_clear_error_and_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["build-dataset", "--name", "x", "--input-kind", "synthetic", "--input", "shapes"]
    assert main([*argv, "--budget", "10", "--out", str(tmp_path)]) == 2
    assert "budget 10 is not larger than the number of players 49" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


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

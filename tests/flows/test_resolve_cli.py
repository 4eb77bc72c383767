"""``explain-transfer datasets resolve``: a version solved again from its games, as a flow run of
the command's own Prefect API, into the labels ``resolve_samples`` gives; mistakes in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from xdata_helpers import build_small_xdata

from storage import open_storage
from tasks.build_dataset import (
    LabelConfig,
    resolve_samples,
)
from tasks.data.readers import iter_webdataset

REPO = Path(__file__).resolve().parents[2]


def _cli(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "home")}
    env = {k: v for k, v in env.items() if not k.startswith("PREFECT_API")}
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "-q", *argv],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )


def _source(tmp_path: Path) -> str:
    label = LabelConfig(grid_h=3, grid_w=3, budget=40, images_per_batch=5)
    return build_small_xdata(str(tmp_path / "x"), label).dataset_uri


@pytest.mark.slow
def test_resolve_writes_the_new_version_and_a_rerun_finds_it_done(tmp_path: Path) -> None:
    source = _source(tmp_path)
    done = _cli(tmp_path, "datasets", "resolve", source, "--shrinkage", "0", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["samples"] == 10 and summary["missing"] == [] and summary["failed"] == []
    assert summary["resolved_from"] == source
    target = open_storage(summary["dataset_uri"])
    written = {s["__key__"]: s["shap.npy"] for s in iter_webdataset(target, "shapes-x", "val")}
    samples = list(iter_webdataset(open_storage(source), "shapes-x", "val"))
    expected = resolve_samples(samples, LabelConfig(grid_h=3, grid_w=3, budget=40, shrinkage=0.0))
    assert written == {s["__key__"]: s["shap.npy"] for s in expected}
    # The run's log is where build-dataset puts its own: under the X-data root.
    assert any((tmp_path / "x" / "logs").glob("*-run.log"))

    again = _cli(tmp_path, "datasets", "resolve", source, "--shrinkage", "0")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{summary['version']}: 10 samples in 2 shards" in again.stdout


def test_resolve_mistakes_are_one_line(tmp_path: Path) -> None:
    cases = [
        (["datasets", "resolve", str(tmp_path / "nope"), "--shrinkage", "0"], "No such file"),
        (["datasets", "resolve", str(tmp_path), "--shrinkage", "2"], "must be in [0, 1], got 2.0"),
        (["datasets", "resolve", str(tmp_path)], "config.json: No such file or directory"),
    ]
    for argv, needle in cases:
        done = _cli(tmp_path, *argv)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines


@pytest.mark.slow
def test_extend_writes_a_larger_budget_version_and_refuses_a_smaller_one(tmp_path: Path) -> None:
    source = _source(tmp_path)
    done = _cli(tmp_path, "datasets", "extend", source, "--budget", "80", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["samples"] == 10 and summary["missing"] == [] and summary["failed"] == []
    assert summary["extended_from"] == source
    recorded = open_storage(summary["dataset_uri"]).read_json("config.json")
    assert recorded["config"]["label"]["budget"] == 80
    assert recorded["extended_from"]["uri"] == source
    again = _cli(tmp_path, "datasets", "extend", source, "--budget", "80")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{summary['version']}: 10 samples in 2 shards" in again.stdout
    assert f"(extended from {source})" in again.stdout
    shown = _cli(tmp_path, "datasets", "show", summary["dataset_uri"])
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert f"derived:        extended from {source}" in shown.stdout, shown.stdout

    smaller = _cli(tmp_path, "datasets", "extend", source, "--budget", "30")
    lines = smaller.stderr.strip().splitlines()
    assert smaller.returncode == 2 and len(lines) == 1, smaller.stderr
    assert "an extension needs a larger budget, got 30" in lines[0]
    bad_device = _cli(tmp_path, "datasets", "extend", source, "--budget", "90", "--device", "tpu")
    lines = bad_device.stderr.strip().splitlines()
    assert bad_device.returncode == 2 and len(lines) == 1, bad_device.stderr
    assert lines[0].startswith("error:") and "device" in lines[0], lines

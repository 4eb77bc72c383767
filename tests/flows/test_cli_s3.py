"""Every command-line location option takes an ``s3://`` URI and never turns it into a path.

Each command runs in-process against the loopback S3 server (moto) and the session's Prefect
API, from an empty working folder: whatever it writes must land in the bucket, and nothing may
appear locally (the old ``demo`` wrote into a folder named ``s3:``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from flows.cli import main
from storage import open_storage

if TYPE_CHECKING:
    from conftest import S3Env


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty current folder; the CLI's private Prefect homes go elsewhere."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    return work


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    # Python's "--- Logging error ---" report (a traceback each) comes from a Prefect console
    # handler that an earlier in-process command left on a closed capture stream, not from
    # this command; any other traceback is a failure.
    text = out + err
    assert text.count("Traceback") == text.count("--- Logging error ---"), err[-3000:]
    return out


def _keys(env: S3Env, prefix: str) -> list[str]:
    return open_storage(env.uri(prefix)).list()


@pytest.mark.slow
def test_every_location_option_round_trips_an_s3_uri(
    s3_env: S3Env, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = s3_env.uri("data")
    _run(["export", "--domain", "shapes", "--out", data, "--train", "2", "--val", "1"], capsys)
    assert "shapes-train-000000.tar" in _keys(s3_env, "data")

    # --config as an s3:// URI too.
    open_storage(s3_env.uri("configs")).write_json(
        "pretrain.json", {"per_class": 2, "val_per_class": 1, "epochs": 1, "batch_size": 8}
    )
    out = _run(
        ["pretrain", "--config", s3_env.uri("configs/pretrain.json"), "--out", s3_env.uri("m")],
        capsys,
    )
    base = out.strip().splitlines()[-1]
    assert base.startswith(f"s3://{s3_env.bucket}/m/") and base.endswith(".safetensors")

    build = ["build-dataset", "--name", "shapes-x", "--split", "train", "--input-kind"]
    build += ["webdataset", "--input", data, "--input-name", "shapes", "--checkpoint", base]
    open_storage(s3_env.uri("configs")).write_json(
        "build.json", {"label": {"grid_h": 3, "grid_w": 3, "images_per_batch": 4}}
    )
    build += ["--config", s3_env.uri("configs/build.json"), "--budget", "20", "--shards", "1"]
    summary = json.loads(_run([*build, "--out", s3_env.uri("xdata")], capsys))
    assert summary["dataset_uri"].startswith(f"s3://{s3_env.bucket}/xdata/shapes-x/")
    assert summary["samples"] == 10 and summary["missing"] == []

    models = {}
    for mode, source, name in (("P", data, "shapes"), ("X", summary["dataset_uri"], None)):
        open_storage(s3_env.uri("configs")).write_json(
            f"ft-{mode}.json", {"grid": 3, "max_steps": 2, "batch_size": 8, "data_name": name}
        )
        argv = ["finetune", "--config", s3_env.uri(f"configs/ft-{mode}.json"), "--domain"]
        argv += ["shapes", "--mode", mode, "--base", base, "--data", source, "--epochs", "1"]
        result = json.loads(_run([*argv, "--out", s3_env.uri("runs")], capsys))
        models[mode] = result["uri"]
        assert models[mode].startswith(f"s3://{s3_env.bucket}/runs/")

    argv = ["vector", "--source", "shapes", "--theta-x", models["X"], "--theta-p", models["P"]]
    vector = json.loads(_run([*argv, "--out", s3_env.uri("vec")], capsys))
    assert vector["uri"].startswith(f"s3://{s3_env.bucket}/vec/")
    assert any(k.endswith(".safetensors") for k in _keys(s3_env, "vec"))

    assert not any(workdir.iterdir()), "a command wrote into the working folder"


@pytest.mark.slow
def test_demo_and_sweep_write_to_s3_and_print_the_uri(
    s3_env: S3Env, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _run(["demo", "--miniature", "--out", s3_env.uri("mini")], capsys)
    assert f"all outputs under {s3_env.uri('mini')} (" in out
    keys = _keys(s3_env, "mini")
    for part in ("data/", "models/", "xdata/", "vectors/", "sweeps/miniature/"):
        assert any(k.startswith(part) for k in keys), part

    # sweep --config s3://...: the demo's sweep again, under another name.
    mini = open_storage(s3_env.uri("mini"))
    config = mini.read_json("sweeps/miniature/summary.json")["config"]
    config["name"] = "again"
    mini.write_json("again.json", config)
    _run(["sweep", "--config", s3_env.uri("mini/again.json")], capsys)
    assert any(k.startswith("sweeps/again/") for k in mini.list())
    assert not any(workdir.iterdir()), "a command wrote into the working folder"

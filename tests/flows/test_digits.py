"""A real dataset nobody here made: scikit-learn's handwritten digits as a target domain.

The example script exports them as an ImageFolder; the parent flow (miniature settings) runs
with the synthetic ``shapes`` source and the digits as a carved ImageFolder target.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from flows.cli import main
from flows.pipeline import PipelineConfig
from storage import open_file, open_storage
from tasks.data.readers import iter_webdataset
from tasks.model.loading import load_sem

pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[2]


def _digits_example():
    spec = importlib.util.spec_from_file_location("digits_example", ROOT / "examples" / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_export_is_an_image_folder_of_the_real_scans(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    example = _digits_example()
    assert example.export_digits(tmp_path / "d", size=32, limit_per_class=3) == 30
    folders = sorted(p.name for p in (tmp_path / "d").iterdir() if p.is_dir())
    assert folders == [str(d) for d in range(10)]
    names = json.loads((tmp_path / "d" / "classes.json").read_text())
    assert names["0"] == "zero" and names["9"] == "nine"
    # The first scan of the dataset is a 0: its upsampled image is dark where the ink was.
    from PIL import Image

    first = np.asarray(Image.open(tmp_path / "d" / "0" / "digit-0000.png").convert("L"))
    ink = load_digits().images[0]
    assert first.shape == (32, 32)
    assert first[::4, ::4][ink > 12].mean() < first[::4, ::4][ink == 0].mean() - 100


@pytest.mark.slow
def test_pipeline_runs_with_digits_as_a_carved_image_folder_target(tmp_path: Path) -> None:
    example = _digits_example()
    folder = tmp_path / "digits-data"
    example.export_digits(folder, size=56, limit_per_class=6)
    digits = {
        "name": "digits",
        "kind": "imagefolder",
        "uri": str(folder),
        "class_names_file": str(folder / "classes.json"),
        "templates": ["a photo of the digit {}."],
        "carve": {"fractions": {"train": 0.5, "val": 0.25, "test": 0.25}, "seed": 0},
    }
    # References of one image per class; accuracy on every carved val and test image.
    # The target trains its own number of epochs, the source's P and X the configured ones.
    config = PipelineConfig.miniature(
        str(tmp_path / "out"),
        targets=(digits,),
        reference_images={"val": 10, "test": 10},
        target_epochs=2,
    )
    config_file = tmp_path / "pipeline.json"
    config_file.write_text(
        json.dumps({k: v for k, v in config.to_dict().items() if k != "out_uri"})
    )
    # The CLI's `run` takes the config file: the miniature settings, digits as the target.
    assert main(["run", "--config", str(config_file), "--out", str(tmp_path / "out")]) == 0

    data = open_storage(tmp_path / "out" / "data" / "digits")
    carved = {
        split: sorted(s["__key__"] for s in iter_webdataset(data, "digits", split))
        for split in ("train", "val", "test")
    }
    assert sum(len(v) for v in carved.values()) == 60
    assert all(carved.values())
    sweep = json.loads((tmp_path / "out" / "sweeps" / "miniature" / "summary.json").read_text())
    info = sweep["targets"]["digits"]
    assert info["related"] is True
    rows = open_file(str(tmp_path / "out" / "sweeps" / "miniature" / "results.parquet"))
    table = rows[0].read_parquet(rows[1]).to_pylist()
    sem = [r for r in table if r["target"] == "digits" and r["method"] == "sem"]
    assert {r["lambda"] for r in sem} == {0.0, 1.0}
    assert all(r["accuracy_images"] == len(carved[r["split"]]) for r in sem)
    assert all(r["images"] <= 10 < r["accuracy_images"] for r in sem)
    # theta_T's head is the digits' own: "zero" .. "nine" with the spec's prompts.
    (theta_t,) = (tmp_path / "out" / "models").glob("digits-P-*/model.safetensors")
    loaded = load_sem(str(theta_t), device="cpu")
    assert loaded.class_names[:3] == ["zero", "one", "two"]
    assert loaded.sidecar["config"]["templates"] == ["a photo of the digit {}."]
    assert loaded.sidecar["config"]["epochs"] == 2
    for mode in ("P", "X"):
        (source,) = (tmp_path / "out" / "models").glob(f"shapes-{mode}-*/model.safetensors")
        assert load_sem(str(source), device="cpu").sidecar["config"]["epochs"] == 1

"""The real architecture, proven small: the whole parent flow with open_clip ViT-B-32 at 224 px.

Random initialisation (a vanilla ``open_clip.create_model("ViT-B-32")`` saved as the base), an
ImageFolder source of three drawn classes and a synthetic target drawn at 224 px, a handful of
images per split, one epoch, the smallest Kernel SHAP budget a 7x7 grid allows (50 > 49 players)
and two lambdas, on CPU. It checks what the small default model cannot: 7x7 cells that are
exactly the 32-px ViT patches (token-space masking), and checkpoints that a vanilla open_clip
ViT-B-32 loads strictly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

import tasks.build_dataset.stage as build_stage
from flows.pipeline import PipelineConfig, explain_transfer_pipeline
from storage import open_file, open_storage
from tasks.build_dataset import LabelConfig

SIZE = 224


def _drawn_image_folder(root: Path, per_split: dict[str, int]) -> Path:
    """``root/{split}/{ring,block,wedge}/*.png``: one dark shape at a random place, 224 px."""
    rng = np.random.default_rng(0)
    for split, count in per_split.items():
        for name in ("ring", "block", "wedge"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                image = Image.new(
                    "RGB", (SIZE, SIZE), tuple(int(v) for v in rng.integers(150, 255, 3))
                )
                draw = ImageDraw.Draw(image)
                x, y = (int(v) for v in rng.integers(10, SIZE - 90, 2))
                box = (x, y, x + 80, y + 80)
                if name == "ring":
                    draw.ellipse(box, outline=(20, 20, 20), width=12)
                elif name == "block":
                    draw.rectangle(box, fill=(20, 20, 20))
                else:
                    draw.polygon([(x, y + 80), (x + 40, y), (x + 80, y + 80)], fill=(20, 20, 20))
                image.save(folder / f"{name}-{i}.png")
    return root


def _vanilla_vit_b_32() -> torch.nn.Module:
    return open_clip.create_model("ViT-B-32", pretrained=None)


@pytest.mark.slow
def test_vit_b_32_runs_the_whole_pipeline_and_its_checkpoints_load_into_open_clip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    base = tmp_path / "vit-b-32-random.safetensors"
    save_file({k: v.contiguous() for k, v in _vanilla_vit_b_32().state_dict().items()}, base)
    source = _drawn_image_folder(tmp_path / "drawn", {"train": 2, "val": 1, "test": 1})

    # Every labelling result, the one-shot (references) and the overlapped stream (X-dataset
    # shards) alike, passes through `_labelled_samples` on its way to a sample.
    maskings: list[str] = []
    labelled_samples = build_stage._labelled_samples

    def recording_labelled_samples(request, result, **kwargs):
        maskings.append(result.masking)
        return labelled_samples(request, result, **kwargs)

    monkeypatch.setattr(build_stage, "_labelled_samples", recording_labelled_samples)

    config = PipelineConfig(
        out_uri=str(tmp_path / "out"),
        source={"name": "drawn", "kind": "imagefolder", "uri": str(source)},
        targets=({"name": "glyphs", "kind": "synthetic", "image_size": SIZE},),
        model_name="ViT-B-32",
        base=str(base),
        per_class={"train": 1, "val": 1, "test": 1},
        image_size=SIZE,
        epochs=1,
        batch_size=4,
        label=LabelConfig(budget=50, top_k=0, images_per_batch=8, forward_batch_size=128),
        reference_budget=50,
        num_shards=1,
        lambdas=(0.0, 1.0),
        kernel_shap_budgets=(50,),
        auc_steps=4,
        sweep_name="vit-b-32",
        device="cpu",
        # A random-init ViT-B-32 after one epoch on a handful of images is at chance: the test
        # proves the architecture's path, not its accuracy.
        min_target_accuracy=0.0,
    )
    result = explain_transfer_pipeline(config)

    # Every labelling (source X-dataset, target references) masked on the 7x7 patch tokens.
    assert maskings and set(maskings) == {"token"}
    x_meta = open_storage(result["x_dataset"]).read_json("classes.json")
    assert x_meta["class_names"] == ["block", "ring", "wedge"]

    checkpoints = [result["theta_p"], result["theta_x"], *(t["model"] for t in result["targets"])]
    for uri in checkpoints:
        state = load_file(uri)
        vanilla = _vanilla_vit_b_32()
        vanilla.load_state_dict(state, strict=True)
        assert vanilla.visual.conv1.weight.shape == (768, 3, 32, 32)
    # The models were trained: theta_X moved away from theta_P, and the vector is their difference.
    theta_p, theta_x = load_file(result["theta_p"]), load_file(result["theta_x"])
    vector = load_file(result["vector"])
    assert vector and set(vector) <= set(theta_p)
    key = "visual.conv1.weight"
    # Vectors are stored in float64 (the difference of two float32 checkpoints, exact).
    assert torch.equal(vector[key], theta_x[key].double() - theta_p[key].double())
    assert float(vector[key].norm()) > 0

    sweep = result["sweep"]
    rows = open_file(sweep["table_uri"])[0].read_parquet(open_file(sweep["table_uri"])[1])
    rows = rows.to_pylist()
    sem = [
        r for r in rows if r["method"] == "sem" and r["split"] == "test" and r["role"] == "target"
    ]
    assert sorted(r["lambda"] for r in sem) == [0.0, 1.0]
    # The source's theta_X, scored in domain at lambda 0 only.
    [source] = [r for r in rows if r["method"] == "sem" and r["role"] == "source"]
    assert source["target"] == "drawn" and source["lambda"] == 0.0 and source["split"] == "test"
    assert all(r["images"] == 5 and 0.0 <= r["accuracy"] <= 1.0 for r in sem)
    assert all(np.isfinite(r["pearson"]) for r in sem)

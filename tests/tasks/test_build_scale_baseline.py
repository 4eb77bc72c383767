"""The dataset-mean baseline is estimated over the whole input, not its first images."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

import tasks.build_dataset.inputs as inputs
from storage import open_storage
from storage.layout import shard_name
from storage.shards import ShardWriter
from tasks.build_dataset import BuildConfig, LabelConfig, label_shard, plan_build
from tasks.build_dataset.inputs import MEAN_SAMPLE_RULE, mean_sample
from tasks.data.export import write_class_names

RED, BLUE = (255, 0, 0), (0, 0, 255)
#: Images per class: more than the 256 the mean used to be taken from, all of class 0 first.
PER_CLASS = 300


def _png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _image_folder(root: Path) -> str:
    """Class ``a`` (red) sorts first and fills the first 300 positions; class ``b`` is blue."""
    folder = open_storage(str(root / "folder"))
    red, blue = _png(RED), _png(BLUE)
    for i in range(PER_CLASS):
        folder.write_bytes(f"a/{i:04d}.png", red)
        folder.write_bytes(f"b/{i:04d}.png", blue)
    return folder.uri


def _webdataset(root: Path, per_shard: int = 100) -> str:
    """The same images as WebDataset shards, in class order (a shard holds one colour)."""
    store = open_storage(str(root / "shards"))
    write_class_names(store, ["a", "b"])
    samples = [
        {"__key__": f"{name}/{i:04d}", "png": _png(colour), "cls": cls}
        for cls, (name, colour) in enumerate((("a", RED), ("b", BLUE)))
        for i in range(PER_CLASS)
    ]
    for index in range(len(samples) // per_shard):
        with ShardWriter(store, shard_name("colours", "train", index)) as writer:
            for sample in samples[index * per_shard : (index + 1) * per_shard]:
                writer.write(sample)
    return store.uri


def _config(root: Path, **changes) -> BuildConfig:
    fields = dict(
        name="colours-x",
        input_kind="imagefolder",
        output_uri=str(root / "xdata"),
        label=LabelConfig(budget=60, top_k=0),
        num_shards=1,
        device="cpu",
    )
    fields.update(changes)
    return BuildConfig(**fields)


@pytest.mark.parametrize("sample_size", [64, 2048])
def test_the_mean_mixes_every_class_when_the_first_images_are_all_one_class(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sample_size: int
) -> None:
    """64: a systematic sample of 600 images; 2048: more than the input, so every image."""
    monkeypatch.setattr(inputs, "MEAN_SAMPLE_SIZE", sample_size)
    folder = _image_folder(tmp_path)
    shards = _webdataset(tmp_path)
    means = {}
    for kind, uri, extra in (
        ("imagefolder", folder, {}),
        ("webdataset", shards, {"input_name": "colours"}),
    ):
        plan = plan_build(_config(tmp_path, input_kind=kind, input_uri=uri, **extra))
        red, green, blue = plan.baseline_mean
        # The first 256 images alone would give pure red (1, 0, 0).
        assert red == pytest.approx(0.5, abs=0.03) and blue == pytest.approx(0.5, abs=0.03)
        assert green == pytest.approx(0.0, abs=1e-6)
        stored = open_storage(plan.dataset_uri).read_json("config.json")
        assert stored["baseline_mean"] == plan.baseline_mean
        assert stored["baseline_mean_sample"]["rule"] == MEAN_SAMPLE_RULE
        assert stored["baseline_mean_sample"]["images"] == min(sample_size, 2 * PER_CLASS)
        # Deterministic: planning again draws the same sample, so the same mean and version.
        again = plan_build(_config(tmp_path, input_kind=kind, input_uri=uri, **extra))
        assert (again.baseline_mean, again.version) == (plan.baseline_mean, plan.version)
        means[kind] = plan.baseline_mean
    if sample_size > 2 * PER_CLASS:
        assert means["imagefolder"] == means["webdataset"] == [0.5, 0.0, 0.5]


def test_mean_sample_is_systematic_seeded_and_reads_shard_heads() -> None:
    # 1,000 single-image units, 100 positions: one every 10, from a seeded offset.
    chosen = mean_sample([1] * 1000, 100, seed=0)
    assert len(chosen) == 100 and all(count == 1 for _, count in chosen)
    gaps = {b - a for (a, _), (b, _) in zip(chosen, chosen[1:], strict=False)}
    assert gaps <= {9, 10, 11}
    assert mean_sample([1] * 1000, 100, seed=0) == chosen
    assert mean_sample([1] * 1000, 100, seed=1) != chosen
    # WebDataset runs of 50: the positions in a run are taken from its head, 5 per run.
    runs = mean_sample([50] * 20, 100, seed=0)
    assert runs == [(index, 5) for index in range(20)]
    # Fewer images than the sample: all of them.
    assert mean_sample([3, 0, 2], 100, seed=0) == [(0, 3), (2, 2)]


def test_the_sweep_scores_insertion_and_deletion_against_the_build_s_mean(tmp_path: Path) -> None:
    """A reference built on the two-colour input stores the mixed mean; the sweep uses it."""
    from tasks.sweep.evaluation import split_baseline
    from tasks.sweep.inputs import load_reference

    plan = plan_build(
        _config(
            tmp_path,
            input_kind="webdataset",
            input_uri=_webdataset(tmp_path),
            input_name="colours",
            max_per_class=2,
        )
    )
    assert plan.baseline_mean == [0.5, 0.0, 0.5]
    label_shard(plan, 0)
    data = load_reference(plan.dataset_uri)
    assert data.baseline_mean == plan.baseline_mean
    images = torch.zeros(2, 3, 56, 56)
    baseline = split_baseline(data, "mean")(images)
    assert torch.allclose(baseline[:, 0, 0], torch.tensor([0.5, 0.0, 0.5]))

"""Domains as data: specs, checks before compute, carving, and materialising them as shards."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.pipeline import PipelineConfig, check_domains
from storage import open_storage
from storage.shards import ShardWriter, complete_shards, read_shard
from tasks.data.domains import DomainSpec, SplitCarving, check_domain, export_domain
from tasks.data.readers import iter_webdataset, read_class_names

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _png(path: Path, seed: int, size: int = 20) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _image_folder(root: Path, classes: dict[str, int], splits: tuple[str, ...] = ()) -> Path:
    """``root[/split]/{wnid}/img-{i}.png``: ``count`` images per class (per split if given)."""
    seed = 0
    for split in splits or ("",):
        for wnid, count in classes.items():
            for i in range(count):
                seed += 1
                _png(root / split / wnid / f"img-{i:03d}.png", seed)
    return root


def test_carving_is_stable_per_file_and_follows_the_fractions() -> None:
    carve = SplitCarving(fractions={"train": 0.6, "val": 0.1, "test": 0.3}, seed=3)
    keys = [f"c{i % 7}/img-{i:05d}" for i in range(6000)]
    splits = [carve.split_of(k) for k in keys]
    counts = Counter(splits)
    assert abs(counts["train"] / 6000 - 0.6) < 0.03 and abs(counts["test"] / 6000 - 0.3) < 0.03
    # A file's split depends on its key and the seed only, not on the other files.
    assert [carve.split_of(k) for k in reversed(keys)] == splits[::-1]
    reseeded = SplitCarving(fractions=carve.fractions, seed=4)
    assert sum(reseeded.split_of(k) != s for k, s in zip(keys, splits, strict=True)) > 1000


def test_image_folder_with_split_folders_maps_class_ids_by_folder_name(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "folder", {"n01": 2, "n02": 3}, ("train", "val", "test"))
    # The test split lacks n01: its n02 must still be class 1, not class 0.
    for path in (root / "test" / "n01").iterdir():
        path.unlink()
    (root / "test" / "n01").rmdir()
    names = tmp_path / "names.txt"
    names.write_text("n01 tench, Tinca tinca\nn02 goldfish\n")
    spec = DomainSpec(name="fish", kind="imagefolder", uri=str(root), class_names_file=str(names))
    plan = check_domain(spec)
    assert plan.class_names == ("tench", "goldfish")
    out = open_storage(tmp_path / "data" / "fish")
    shards = export_domain(plan, out, per_class={}, image_size=32, seed=0)
    assert set(shards) == {"train", "val", "test"}
    test = list(iter_webdataset(out, "fish", "test"))
    assert [s["cls"] for s in test] == [1, 1, 1]
    train = list(iter_webdataset(out, "fish", "train"))
    assert sorted(s["cls"] for s in train) == [0, 0, 1, 1, 1]
    # Original bytes are kept, and the head's classes and prompts are stored beside the shards.
    key = train[0]["__key__"]
    assert train[0]["png"] == (root / "train" / f"{key}.png").read_bytes()
    assert read_class_names(out) == ["tench", "goldfish"]
    info = out.read_json("classes.json")
    assert info["templates"] == list(spec.templates) and info["related"] is True


def test_carved_image_folder_covers_every_file_once_and_caps_per_class(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "one", {"a": 30, "b": 30})
    carve = {"fractions": {"train": 0.5, "val": 0.25, "test": 0.25}, "seed": 0}
    spec = DomainSpec(name="ab", kind="imagefolder", uri=str(root), carve=carve)
    plan = check_domain(spec)
    everything = [f for split in plan.units.values() for f in split]
    assert len(everything) == len(set(everything)) == 60
    for split, files in plan.units.items():
        assert all(
            carve_split == split for carve_split in (spec.carve.split_of(f[1]) for f in files)
        )

    capped = check_domain(spec.model_copy(update={"per_class": {"train": 4}}))
    assert Counter(f[2] for f in capped.units["train"]) == {0: 4, 1: 4}
    assert set(capped.units["train"]) <= set(plan.units["train"])
    assert capped.units["val"] == plan.units["val"]


def test_webdataset_domain_is_reexported_with_markers_and_its_classes(tmp_path: Path) -> None:
    foreign = open_storage(tmp_path / "foreign")
    for split, count in (("train", 5), ("val", 2), ("test", 3)):
        # Foreign shards: plain tars without completion markers, as another tool writes them.
        with ShardWriter(foreign, f"cars-{split}-000000.tar") as writer:
            for i in range(count):
                _png(tmp_path / "tmp.png", i)
                png = (tmp_path / "tmp.png").read_bytes()
                writer.write({"__key__": f"{split}{i}", "png": png, "cls": i % 2, "txt": "x"})
    for marker in [k for k in foreign.list() if "complet" in k or k.endswith(".json")]:
        foreign.delete(marker)
    foreign.write_json("classes.json", ["sedan", "truck"])

    spec = DomainSpec(name="cars", kind="webdataset", uri=str(tmp_path / "foreign"))
    plan = check_domain(spec)
    out = open_storage(tmp_path / "data" / "cars")
    export_domain(plan, out, per_class={}, image_size=32, seed=0)
    assert plan.class_names == ("sedan", "truck")
    assert len(complete_shards(out, "cars", "train")) == 1
    samples = list(read_shard(out, complete_shards(out, "cars", "test")[0]))
    assert [s["cls"] for s in samples] == [0, 1, 0] and all("txt" not in s for s in samples)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"kind": "imagefolder", "uri": "{tmp}/nowhere"}, "no images in split 'train' folder"),
        ({"kind": "imagefolder", "uri": "{tmp}/flat"}, "no images in split 'train' folder"),
        (
            {"kind": "imagefolder", "uri": "{tmp}/flat", "carve": {}, "class_names": ["x"]},
            "1 class names for 2 class folders",
        ),
        (
            {
                "kind": "imagefolder",
                "uri": "{tmp}/flat",
                "carve": {},
                "class_names_file": "{tmp}/n.txt",
            },
            "has no name for 1 class folders",
        ),
        (
            {
                "kind": "imagefolder",
                "uri": "{tmp}/flat",
                "per_class": {"val": 1},
                "carve": {"fractions": {"train": 0.98, "val": 0.01, "test": 0.01}},
            },
            "split 'val' is empty",
        ),
        ({"kind": "webdataset", "uri": "{tmp}/flat"}, "no shards d-train-NNNNNN.tar"),
        ({"kind": "webdataset", "uri": "{tmp}/nowhere"}, "no shards under"),
    ],
)
def test_a_bad_spec_fails_in_one_line_before_any_compute(
    tmp_path: Path, spec: dict, message: str
) -> None:
    _image_folder(tmp_path / "flat", {"a": 2, "b": 1})
    (tmp_path / "n.txt").write_text("a apple\n")
    fields = json.loads(json.dumps(spec).replace("{tmp}", str(tmp_path)))
    with pytest.raises(ValueError, match=message) as info:
        check_domain(DomainSpec(name="d", **fields))
    assert "\n" not in str(info.value)


def test_unknown_builtin_and_misplaced_fields_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown synthetic domain 'stars'"):
        PipelineConfig(out_uri="x", source="stars")
    with pytest.raises(ValueError, match="needs uri"):
        DomainSpec(name="d", kind="imagefolder")
    with pytest.raises(ValueError, match="image_size is for synthetic"):
        DomainSpec(name="d", kind="imagefolder", uri="x", image_size=64)
    with pytest.raises(ValueError, match="two different specs"):
        PipelineConfig(
            out_uri="x",
            source="shapes",
            targets=({"name": "shapes", "kind": "synthetic", "related": False},),
        )


def test_shipped_configs_parse_and_the_default_is_the_embedded_default(tmp_path: Path) -> None:
    default = json.loads((CONFIGS / "embedded-default.json").read_text())
    assert PipelineConfig(**default) == PipelineConfig(out_uri=default["out_uri"])
    # The amortized configuration (docs/results.md): the default with four settings changed,
    # and the four it was measured with before the default took the game-consistency recipe.
    amortized = json.loads((CONFIGS / "amortized.json").read_text())
    changed = {
        k
        for k, v in PipelineConfig(**amortized).model_dump(mode="json").items()
        if v != default.get(k)
    }
    assert changed == {
        "out_uri",
        "per_class",
        "label",
        "x_loss",
        "target_epochs",
        "lr",
        "target_lr",
        "game_consistency",
        "source_kernel_shap_images",
    }, changed
    # The in-domain recipe (docs/results.md): the default's source with four times the training
    # images, labelled at a third of the budget; nothing else moves.
    in_domain = PipelineConfig(**json.loads((CONFIGS / "amortized-consistency.json").read_text()))
    changed = {k for k, v in in_domain.model_dump(mode="json").items() if v != default.get(k)}
    assert changed == {"out_uri", "source", "label", "sweep_name"}, changed
    assert in_domain.source_spec.per_class == {"train": 256, "val": 100, "test": 100}
    assert in_domain.label.budget == 50 and in_domain.per_class == {
        "train": 64,
        "val": 100,
        "test": 100,
    }
    # The nearest to both goals (docs/results.md): the default's 320 images labelled at budget
    # 400, the source's P and X at lr 4e-4 for 15 epochs; the targets and the sweep as they are.
    nearest = PipelineConfig(**json.loads((CONFIGS / "budget-400.json").read_text()))
    changed = {k for k, v in nearest.model_dump(mode="json").items() if v != default.get(k)}
    assert changed == {"out_uri", "label", "lr", "epochs", "eval_every", "sweep_name"}, changed
    assert nearest.label.budget == 400 and nearest.lr == 4e-4 and nearest.epochs == 15
    assert nearest.label.model_copy(update={"budget": 150}) == PipelineConfig(out_uri="x").label
    real = PipelineConfig(**json.loads((CONFIGS / "imagenet-vit-b-32.json").read_text()))
    assert real.model_name.startswith("ViT-B-32") and real.image_size == 224
    assert real.device == "cuda" and real.decode == "device"
    assert real.source_spec.kind == "imagefolder" and real.base.startswith("s3://")
    assert {t.kind for t in real.target_specs} == {"imagefolder", "webdataset"}
    # A mix of names and specs: every domain once, the source first.
    mixed = PipelineConfig(
        out_uri="x",
        source={"name": "fish", "kind": "imagefolder", "uri": str(tmp_path)},
        targets=("glyphs", {"name": "fish", "kind": "imagefolder", "uri": str(tmp_path)}),
    )
    assert [s.name for s in mixed.domain_specs()] == ["fish", "glyphs"]
    with pytest.raises(ValueError, match="domain 'fish': no images"):
        check_domains(mixed)

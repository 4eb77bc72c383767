"""The game kept beside each label (game.npz): small, read by plain webdataset, and solved again
without the model into the labels a fresh labelling with the same settings gives."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import webdataset as wds
from xdata_helpers import build_small_xdata

import tasks
from storage import open_storage
from storage.shards import complete_shards
from tasks.algorithms.games import CoalitionGame
from tasks.algorithms.kernel_shap import kernel_shap_explain, solve_games
from tasks.build_dataset import (
    LabelConfig,
    resolve_samples,
)
from tasks.data.readers import iter_webdataset
from tasks.model.vit import OpenCLIPClassifier


@pytest.fixture(scope="module")
def tiny_classifier() -> OpenCLIPClassifier:
    open_clip.add_model_config(Path(tasks.__file__).parent / "model" / "model_configs")
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-vit-56").eval()
    return OpenCLIPClassifier(model, torch.randn(5, model.visual.output_dim)).eval()


@pytest.mark.parametrize(
    ("sampler", "budget", "error_estimate"),
    [
        ("leverage", 60, False),
        ("leverage", 150, True),
        ("leverage", 400, True),
        ("kernel", 150, False),
    ],
)
def test_stored_games_solve_to_the_labels_bit_for_bit(
    tiny_classifier: OpenCLIPClassifier, sampler: str, budget: int, error_estimate: bool
) -> None:
    torch.manual_seed(1)
    images = torch.rand(5, 3, 56, 56)
    classes = torch.tensor([[0, 1], [1, 1], [2, 0], [3, 4], [4, 2]])
    result = kernel_shap_explain(
        tiny_classifier,
        images,
        classes,
        budget=budget,
        sampler=sampler,
        error_estimate=error_estimate,
        seed=[11, 12, 13, 14, 15],
    )
    encoded = [game.to_npz() for game in result.games]
    games = [CoalitionGame.from_npz(data) for data in encoded]
    phi, err = solve_games(games, error_estimate=error_estimate)
    assert torch.equal(phi, result.phi)
    assert (err is None) == (result.phi_err is None)
    if err is not None:
        assert torch.equal(err, result.phi_err)
    # Any subset solves to the same labels (a batched solve keeps images apart).
    assert torch.equal(solve_games(games[1:4])[0], result.phi[1:4])
    game = games[0]
    assert game.masks.shape == (budget - 2, 49) and game.values.shape == (budget - 2, 2)
    assert game.classes == (0, 1) and game.seed == 11 and game.sampler == sampler
    # The model's float32 values are stored in float32, losslessly: a few KB per image.
    assert np.load(io.BytesIO(encoded[0]))["values"].dtype == np.float32
    assert max(len(data) for data in encoded) < 4_000 + 25 * budget


def test_a_game_solved_with_another_shrinkage_is_a_fresh_labelling_with_it(
    tiny_classifier: OpenCLIPClassifier,
) -> None:
    torch.manual_seed(2)
    images, classes = torch.rand(3, 3, 56, 56), torch.tensor([0, 3, 4])
    # The default design is shrunk (None: 0.03 at most); the front-loaded one below 2P pairs is
    # solved by plain least squares (0).
    for budget, front_load, default, other in (
        (150, False, None, 0.0),
        (400, False, None, 0.0),
        (150, True, 0.0, 0.5),
    ):
        kept = kernel_shap_explain(
            tiny_classifier, images, classes, budget=budget, seed=[1, 2, 3], front_load=front_load
        )
        assert all(game.front_load == front_load for game in kept.games)
        for shrinkage in (default, other):
            fresh = kernel_shap_explain(
                tiny_classifier,
                images,
                classes,
                budget=budget,
                seed=[1, 2, 3],
                shrinkage=shrinkage,
                front_load=front_load,
            )
            again, _ = solve_games(kept.games, shrinkage=shrinkage)
            assert torch.equal(again[:, 0], fresh.phi)
            # the default reproduces the labels; another setting changes them
            assert torch.equal(fresh.phi, kept.phi) == (shrinkage == default)
    with pytest.raises(ValueError, match="shrinkage"):
        kernel_shap_explain(tiny_classifier, images, classes, sampler="kernel", shrinkage=0.5)


def test_a_damaged_game_is_refused_with_its_reason() -> None:
    game = CoalitionGame(
        masks=np.zeros((4, 6), dtype=bool),
        weights=np.ones(4),
        strata=np.zeros(2, dtype=np.int64),
        values=np.ones((4, 1)),
        v_empty=np.zeros(1),
        v_full=np.ones(1),
        classes=(0,),
        grid=(2, 3),
        budget=6,
        seed=0,
        sampler="leverage",
    )
    arrays = dict(np.load(io.BytesIO(game.to_npz())))
    assert CoalitionGame.from_npz(arrays).grid == (2, 3)
    with pytest.raises(ValueError, match="lacks values"):
        CoalitionGame.from_npz({k: v for k, v in arrays.items() if k != "values"})
    with pytest.raises(ValueError, match="inconsistent"):
        CoalitionGame.from_npz({**arrays, "weights": np.ones(3)})
    with pytest.raises(ValueError, match="games of one grid"):
        other = CoalitionGame(**{**game.__dict__, "budget": 8})
        solve_games([game, other])


def test_a_built_dataset_keeps_its_games_and_they_solve_to_its_labels(storage_uri: str) -> None:
    label = LabelConfig(grid_h=3, grid_w=3, budget=40, images_per_batch=3, error_estimate=True)
    plan = build_small_xdata(f"{storage_uri}/kept", label)
    dataset = open_storage(plan.dataset_uri)
    samples = list(iter_webdataset(dataset, "shapes-x", "val"))
    assert len(samples) == 10 and all("game.npz" in s for s in samples)

    # Plain webdataset decodes game.npz into its arrays, and a game reads from those too.
    url = dataset.url(complete_shards(dataset, "shapes-x", "val")[0])
    if not url.startswith("s3://"):  # webdataset reads s3:// through a shell pipe only
        decoded = next(iter(wds.WebDataset(url, shardshuffle=False).decode()))
        game = CoalitionGame.from_npz(decoded["game.npz"])
        assert game.masks.shape == (38, 9) and game.budget == 40

    # Solved again with the labelling's own settings: the same bytes.
    again = resolve_samples(samples, label)
    for old, new in zip(samples, again, strict=True):
        assert new["shap.npy"] == old["shap.npy"] and new["shap_err.npy"] == old["shap_err.npy"]
        assert new["json"]["relative_error"] == json.loads(old["json"])["relative_error"]
        assert new["game.npz"] == old["game.npz"] and new["png"] == old["png"]

    # Solved with another shrinkage: the labels of a fresh build with that shrinkage.
    plain = label.model_copy(update={"shrinkage": 0.0, "error_estimate": False})
    fresh_plan = build_small_xdata(f"{storage_uri}/fresh", plain)
    fresh = {
        s["__key__"]: s
        for s in iter_webdataset(open_storage(fresh_plan.dataset_uri), "shapes-x", "val")
    }
    resolved = resolve_samples(samples, plain)
    assert {s["__key__"] for s in resolved} == set(fresh)
    for sample in resolved:
        assert sample["shap.npy"] == fresh[sample["__key__"]]["shap.npy"]
        assert "shap_err.npy" not in sample and "relative_error" not in sample["json"]


def test_without_kept_games_only_the_model_can_label_again(tmp_path: Path) -> None:
    label = LabelConfig(grid_h=3, grid_w=3, budget=20, images_per_batch=5, keep_game=False)
    plan = build_small_xdata(str(tmp_path), label)
    samples = list(iter_webdataset(open_storage(plan.dataset_uri), "shapes-x", "val"))
    assert samples and not any("game.npz" in s for s in samples)
    assert LabelConfig(keep_game=False).fingerprint() != LabelConfig().fingerprint()
    with pytest.raises(ValueError, match="has no game.npz: it was labelled without keep_game"):
        resolve_samples(samples, label)


def test_a_version_is_solved_again_into_a_new_one_that_a_fresh_build_would_give(
    storage_uri: str,
) -> None:
    from tasks.build_dataset.resolve import finalize_resolve, plan_resolve, resolve_shard

    label = LabelConfig(grid_h=3, grid_w=3, budget=40, images_per_batch=4)
    source = build_small_xdata(f"{storage_uri}/out", label)
    plan = plan_resolve(source.dataset_uri, shrinkage=0.0, error_estimate=True)
    assert plan.dataset_uri.rsplit("/", 1)[0] == source.dataset_uri.rsplit("/", 1)[0]
    assert plan.version != source.version and len(plan.shards) == 2
    outcomes = [resolve_shard(plan, shard) for shard in plan.shards]
    assert [o["skipped"] for o in outcomes] == [False, False]
    summary = finalize_resolve(plan)
    assert summary["samples"] == 10 and summary["missing"] == []
    # A rerun resumes: nothing is solved twice.
    assert all(resolve_shard(plan, shard)["skipped"] for shard in plan.shards)

    target = open_storage(plan.dataset_uri)
    recorded = target.read_json("config.json")
    assert recorded["resolved_from"] == {"uri": source.dataset_uri, "version": source.version}
    assert recorded["config"]["label"]["shrinkage"] == 0.0
    resolved = {s["__key__"]: s for s in iter_webdataset(target, "shapes-x", "val")}

    fresh_label = label.model_copy(update={"shrinkage": 0.0, "error_estimate": True})
    fresh = build_small_xdata(f"{storage_uri}/fresh", fresh_label)
    expected = {
        s["__key__"]: s for s in iter_webdataset(open_storage(fresh.dataset_uri), "shapes-x", "val")
    }
    assert set(resolved) == set(expected)
    for key, sample in resolved.items():
        assert sample["shap.npy"] == expected[key]["shap.npy"]
        assert sample["shap_err.npy"] == expected[key]["shap_err.npy"]
        assert sample["game.npz"] == expected[key]["game.npz"]

    with pytest.raises(ValueError, match="nothing to solve again"):
        plan_resolve(source.dataset_uri, shrinkage=None, error_estimate=False)


def test_a_version_without_games_cannot_be_solved_again(tmp_path: Path) -> None:
    from tasks.build_dataset.resolve import plan_resolve

    label = LabelConfig(grid_h=3, grid_w=3, budget=20, images_per_batch=5, keep_game=False)
    source = build_small_xdata(str(tmp_path), label)
    with pytest.raises(ValueError, match="labelled without keep_game"):
        plan_resolve(source.dataset_uri, error_estimate=True)
    with pytest.raises(FileNotFoundError, match="is not an X-dataset version"):
        plan_resolve(str(tmp_path / "nope"), shrinkage=0.0)
    assert sorted(p.name for p in (tmp_path / "shapes-x").iterdir()) == [source.version]


def test_samples_of_different_games_are_solved_each_with_its_own(
    tiny_classifier: OpenCLIPClassifier,
) -> None:
    torch.manual_seed(3)
    images, classes = torch.rand(2, 3, 56, 56), torch.tensor([1, 2])
    results = [
        kernel_shap_explain(tiny_classifier, images, classes, budget=60, seed=[5, 6]),
        kernel_shap_explain(tiny_classifier, images, classes, budget=100, seed=[5, 6]),
        kernel_shap_explain(
            tiny_classifier, images, classes, budget=100, seed=[5, 6], front_load=True
        ),
    ]
    samples = [
        {"__key__": f"{r}-{i}", "game.npz": result.games[i].to_npz(), "json": {"budget": 0}}
        for r, result in enumerate(results)
        for i in range(2)
    ]
    resolved = resolve_samples(samples, LabelConfig(grid_h=7, grid_w=7))
    for sample, (r, i) in zip(resolved, [(r, i) for r in range(3) for i in range(2)], strict=True):
        phi = np.load(io.BytesIO(sample["shap.npy"]))
        assert np.array_equal(phi[0], results[r].phi[i].numpy())


def test_the_game_archive_is_a_plain_npz_with_numpys_own_member_bytes() -> None:
    import zipfile

    from tasks.algorithms.games import npz_bytes

    rng = np.random.default_rng(0)
    arrays = {
        "masks": np.packbits(rng.random((148, 49)) < 0.5, axis=1),
        "weights": rng.random(148),
        "values": rng.random((148, 2)).astype(np.float32),
        "scalar": np.int64(7),
        "flag": np.bool_(True),
        "name": np.str_("leverage"),
        "empty": np.zeros((0, 3), dtype=np.int16),
    }
    data = npz_bytes(arrays)
    archive = zipfile.ZipFile(io.BytesIO(data))
    assert archive.testzip() is None  # every member's CRC checks
    assert archive.namelist() == [f"{name}.npy" for name in arrays]
    reference = io.BytesIO()
    np.savez_compressed(reference, **arrays)
    theirs = zipfile.ZipFile(reference)
    for name in arrays:  # each member is the .npy that np.save writes, byte for byte
        assert archive.read(f"{name}.npy") == theirs.read(f"{name}.npy"), name
    loaded = np.load(io.BytesIO(data), allow_pickle=False)
    for name, array in arrays.items():
        assert loaded[name].dtype == np.asarray(array).dtype
        assert np.array_equal(loaded[name], array)
    assert npz_bytes(arrays) == data  # the same arrays, the same bytes
    assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_STORED, 8}

"""The game loss (FastSHAP / ViT-Shapley objective on game.npz): exact on enumerated games, and a
fine-tuning option that learns the attributions from the coalitions alone."""

from __future__ import annotations

import io
import itertools
import json
import math

import numpy as np
import pytest
import torch

from storage import open_storage
from storage.checkpoints import save_state_dict
from storage.layout import shard_name
from storage.shards import ShardWriter
from tasks.algorithms.games import CoalitionGame
from tasks.data.stream import Decoder, OrderedStream, list_split, stack_games
from tasks.data.synthetic import make_split
from tasks.explanation_losses import game_loss, pearson_per_image
from tasks.finetune import FinetuneConfig, finetune
from tasks.model import DEFAULT_MODEL, load_clip, load_sem

GRID = (2, 3)
PLAYERS = 6


def _enumerated_game(values_of: dict[tuple[int, ...], float]) -> CoalitionGame:
    """Every proper coalition of 6 players with its Shapley kernel weight."""
    masks, weights, values = [], [], []
    for size in range(1, PLAYERS):
        for members in itertools.combinations(range(PLAYERS), size):
            mask = np.zeros(PLAYERS, dtype=bool)
            mask[list(members)] = True
            masks.append(mask)
            weights.append((PLAYERS - 1) / (math.comb(PLAYERS, size) * size * (PLAYERS - size)))
            values.append([values_of[members]])
    return CoalitionGame(
        masks=np.array(masks),
        weights=np.array(weights),
        strata=None,
        values=np.array(values),
        v_empty=np.array([values_of[()]]),
        v_full=np.array([values_of[tuple(range(PLAYERS))]]),
        classes=(0,),
        grid=GRID,
        budget=2**PLAYERS,
        seed=0,
        sampler="kernel",
    )


def _exact_shapley(values_of: dict[tuple[int, ...], float]) -> np.ndarray:
    phi = np.zeros(PLAYERS)
    for i in range(PLAYERS):
        others = [j for j in range(PLAYERS) if j != i]
        for size in range(PLAYERS):
            for members in itertools.combinations(others, size):
                weight = math.factorial(size) * math.factorial(PLAYERS - size - 1)
                with_i = tuple(sorted((*members, i)))
                phi[i] += weight * (values_of[with_i] - values_of[members])
    return phi / math.factorial(PLAYERS)


def _all_coalitions() -> list[tuple[int, ...]]:
    return [c for s in range(PLAYERS + 1) for c in itertools.combinations(range(PLAYERS), s)]


def _loss(maps: np.ndarray, game: CoalitionGame) -> np.ndarray:
    """The loss of each map (one image each) against ``game``."""
    games = stack_games([game], GRID)
    label = torch.zeros(1, dtype=torch.long)
    attributions = torch.tensor(maps, dtype=torch.float64).reshape(len(maps), 1, 1, *GRID)
    return np.array([float(game_loss(a, label, games)) for a in attributions])


def test_on_an_additive_game_the_loss_is_zero_at_its_values_and_any_positive_affine_map() -> None:
    rng = np.random.default_rng(0)
    phi = rng.normal(size=PLAYERS)
    game = _enumerated_game({c: 1.5 + phi[list(c)].sum() for c in _all_coalitions()})
    maps = np.stack([phi, 3 * phi - 2, -phi, rng.normal(size=PLAYERS)])
    losses = _loss(maps, game)
    assert losses[0] == pytest.approx(0, abs=1e-5) and losses[1] == pytest.approx(0, abs=1e-5)
    assert losses[2] == pytest.approx(4, abs=1e-5)  # the opposite map: cosine -1
    assert 0 < losses[3] < 4


def test_on_any_game_with_every_coalition_the_loss_is_linear_in_the_pearson_with_shapley() -> None:
    rng = np.random.default_rng(1)
    values_of = {c: float(rng.normal()) + 0.8 * len(c) for c in _all_coalitions()}
    game = _enumerated_game(values_of)
    phi = _exact_shapley(values_of)
    maps = np.concatenate([phi[None], rng.normal(size=(20, PLAYERS))])
    losses = _loss(maps, game)
    pearson = np.array([np.corrcoef(m, phi)[0, 1] for m in maps])
    # loss = 2 (1 - c r): one constant c for every map, the largest cosine at the Shapley values
    c = (1 - losses / 2) / pearson
    assert np.allclose(c, c[0], atol=1e-5), c
    assert 0 < c[0] <= 1
    assert losses.argmin() == 0


def _additive_game(
    phi: np.ndarray, rng: np.random.Generator, coalitions: int, label: int
) -> CoalitionGame:
    """``coalitions`` random coalitions of the game ``v(S) = 0.3 + sum_{i in S} phi_i``."""
    players = phi.size
    masks = rng.random((coalitions, players)) < rng.random((coalitions, 1))
    values = 0.3 + masks.astype(np.float64) @ phi.ravel()
    game = CoalitionGame(
        masks=masks,
        weights=np.ones(coalitions),
        strata=None,
        values=values[:, None],
        v_empty=np.array([0.3]),
        v_full=np.array([0.3 + phi.sum()]),
        classes=(label,),
        grid=phi.shape,
        budget=coalitions + 2,
        seed=0,
        sampler="kernel",
    )
    return game


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An X-dataset whose games are additive with the object mask (7x7) as their values."""
    import torch.nn.functional as F
    from PIL import Image

    root = tmp_path_factory.mktemp("game-loss")
    rng = np.random.default_rng(0)
    storage = open_storage(str(root / "x"))
    samples = list(make_split("shapes", "train", seed=0, per_class=7))
    with ShardWriter(storage, shard_name("shapes", "train", 0)) as writer:
        for sample in samples:
            mask = np.asarray(Image.open(io.BytesIO(sample["mask.png"])), np.float32) / 255
            pooled = F.adaptive_avg_pool2d(torch.from_numpy(mask)[None, None], (7, 7))[0, 0]
            phi = pooled.numpy().astype(np.float64)
            game = _additive_game(phi, rng, coalitions=120, label=int(sample["cls"]))
            # shap.npy holds noise, so only the game can teach the object mask.
            noise = rng.normal(size=(1, 7, 7)).astype(np.float32)
            buffer = io.BytesIO()
            np.save(buffer, noise)
            writer.write(
                {
                    "__key__": sample["__key__"],
                    "png": sample["png"],
                    "cls": sample["cls"],
                    "shap.npy": buffer.getvalue(),
                    "game.npz": game.to_npz(),
                    "json": json.dumps({"classes": [sample["cls"]]}).encode(),
                }
            )
    torch.manual_seed(0)
    base = open_storage(str(root / "base"))
    save_state_dict(base, "base.safetensors", load_clip(DEFAULT_MODEL).state_dict(), {})
    return {"x": str(root / "x"), "base": base.url("base.safetensors")}


def _config(paths: dict[str, str], **overrides) -> FinetuneConfig:
    fields = {
        "domain": "shapes",
        "mode": "X",
        "base": paths["base"],
        "data": paths["x"],
        "epochs": 2,
        "batch_size": 8,
        "lr": 5e-4,
        "beta": 2.0,
    }
    return FinetuneConfig(**{**fields, **overrides})


def test_fine_tuning_on_the_games_alone_learns_their_shapley_values(data, tmp_path) -> None:
    storage = open_storage(str(tmp_path / "out"))
    split = list_split(data["x"], "train")
    decoder = Decoder(56, targets="require", games=True, grid=(7, 7))
    [train] = OrderedStream(split, decoder, batch_size=35).loader()
    # The values of an additive game are its coefficients: the object mask.
    truth = torch.stack(
        [
            torch.linalg.lstsq(
                train.games.coalitions[i], (train.games.values[i] - train.games.v_empty[i])[:, None]
            ).solution[:, 0]
            for i in range(35)
        ]
    ).reshape(35, 7, 7)
    agreement = {}
    for loss in ("labels", "game"):
        result = finetune(_config(data, x_loss=loss), storage, f"ft-{loss}")
        model = load_sem(storage.url(result["key"])).sem
        with torch.no_grad():
            _, maps = model(train.images)
        label_maps = maps[torch.arange(35), train.labels]
        agreement[loss] = float(pearson_per_image(label_maps, truth).mean())
    assert agreement["game"] > agreement["labels"] + 0.3, agreement
    assert agreement["game"] > 0.4, agreement


def test_the_default_loss_keeps_earlier_models_fingerprints(data) -> None:
    labels = _config(data)
    assert labels.resume_fingerprint() == _config(data, x_loss="labels").resume_fingerprint()
    assert _config(data, x_loss="game").resume_fingerprint() != labels.resume_fingerprint()


def test_the_game_loss_on_a_dataset_without_games_is_refused_before_training(
    data, tmp_path
) -> None:
    plain = open_storage(str(tmp_path / "plain"))
    [sample] = list(make_split("shapes", "train", seed=0, per_class=1))[:1]
    with ShardWriter(plain, shard_name("shapes", "train", 0)) as writer:
        writer.write(
            {
                "__key__": sample["__key__"],
                "png": sample["png"],
                "cls": sample["cls"],
                "shap.npy": _npy(np.zeros((1, 7, 7), np.float32)),
            }
        )
    out = open_storage(str(tmp_path / "out"))
    with pytest.raises(ValueError, match="has no game.npz"):
        finetune(_config(data, data=str(tmp_path / "plain"), x_loss="game"), out, "ft-bad")
    assert out.list() == []


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()

"""The game-consistency term: theta_X's values on its labels' coalitions stay the labelled model's.

The values of a kept coalition are recomputed with autograd on exactly as the labeller computed
them (token and pixel masking, every baseline, logit and probability), the term is zero at the
labelled model, and fine-tuning with it keeps the trained model's game nearer the labelled one.
"""

from __future__ import annotations

import pytest
import torch
from xdata_helpers import build_small_xdata

from storage import open_storage
from storage.checkpoints import save_state_dict
from tasks.algorithms.kernel_shap import coalition_values, kernel_shap_explain
from tasks.build_dataset import LabelConfig
from tasks.data.stream import stack_games
from tasks.explanation_losses import LabelledGame, consistency_loss
from tasks.finetune import FinetuneConfig, finetune, training_stream
from tasks.model import DEFAULT_MODEL, SelfExplainingCLIP, load_clip, load_sem


@pytest.fixture(scope="module")
def sem() -> SelfExplainingCLIP:
    torch.manual_seed(0)
    clip = load_clip(DEFAULT_MODEL)
    head = torch.nn.functional.normalize(torch.randn(5, clip.visual.output_dim), dim=-1)
    return SelfExplainingCLIP(clip, head, grid=(7, 7)).eval()


@pytest.mark.parametrize(
    ("masking", "baseline", "output"),
    [
        ("token", "mean-tensor", "logit"),
        ("pixel", "mean-tensor", "logit"),
        ("token", "zero", "prob"),
        ("pixel", "blur", "logit"),
    ],
)
def test_the_values_of_kept_coalitions_are_the_labellers(sem, masking, baseline, output) -> None:
    torch.manual_seed(2)
    images = torch.rand(3, 3, 56, 56)
    classes = torch.tensor([0, 3, 4])
    base = torch.tensor([0.3, 0.5, 0.7]) if baseline == "mean-tensor" else baseline
    result = kernel_shap_explain(
        sem.as_classifier(),
        images,
        classes,
        budget=40,
        baseline=base,
        output=output,
        masking=masking,
        seed=[1, 2, 3],
    )
    games = stack_games(result.games, (7, 7))
    values = coalition_values(
        sem.as_classifier(),
        images,
        classes,
        games.coalitions,
        baseline=base,
        grid=(7, 7),
        output=output,
        masking=masking,
    )
    real = games.weights > 0
    assert real.sum() == 3 * 38
    torch.testing.assert_close(values[real], games.values[real], rtol=1e-5, atol=1e-5)


def test_a_grid_that_no_token_grid_divides_is_masked_in_pixels(sem) -> None:
    images = torch.rand(2, 3, 56, 56)
    coalitions = torch.ones(2, 3, 4 * 4)
    full = coalition_values(
        sem.as_classifier(), images, torch.tensor([1, 2]), coalitions, grid=(4, 4)
    )
    with torch.no_grad():
        expected = sem.predict(images)[torch.arange(2), torch.tensor([1, 2])]
    torch.testing.assert_close(full, expected[:, None].expand(2, 3), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="players"):
        coalition_values(sem.as_classifier(), images, torch.tensor([1, 2]), coalitions)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A real X-dataset labelled (with its games) by a saved tiny model, and that model."""
    root = tmp_path_factory.mktemp("consistency")
    torch.manual_seed(0)
    storage = open_storage(str(root / "base"))
    save_state_dict(storage, "base.safetensors", load_clip(DEFAULT_MODEL).state_dict(), {})
    base = storage.url("base.safetensors")
    label = LabelConfig(budget=60, keep_game=True)
    plan = build_small_xdata(str(root / "x"), label, checkpoint=base)
    return {"x": plan.dataset_uri, "base": base}


def _config(paths: dict[str, str], **overrides) -> FinetuneConfig:
    fields = {
        "domain": "shapes",
        "mode": "X",
        "base": paths["base"],
        "data": paths["x"],
        "split": "val",
        "epochs": 3,
        "batch_size": 5,
        "lr": 1e-3,
        "loader_workers": 0,
        "device": "cpu",
    }
    return FinetuneConfig(**{**fields, **overrides})


def _mean_consistency(uri: str, paths: dict[str, str]) -> float:
    """The term of the model at ``uri`` over every kept coalition of the X-dataset."""
    config = _config(paths, game_consistency=1.0, batch_size=10)
    stream = training_stream(config)
    stream.set_epoch(0)
    [batch] = list(stream.loader())
    model = load_sem(uri, domain="shapes").sem.eval()
    with torch.no_grad():
        return float(
            consistency_loss(
                model,
                batch.images,
                batch.labels,
                batch.games,
                LabelledGame.of_dataset(paths["x"]),
                coalitions=batch.games.coalitions.shape[1],
                generator=torch.Generator().manual_seed(0),
            )
        )


def test_the_term_is_zero_at_the_labelled_model_and_keeps_the_trained_game_near_it(
    labelled, tmp_path
) -> None:
    recorded = LabelledGame.of_dataset(labelled["x"])
    assert recorded.output == "logit" and recorded.grid == (7, 7)
    assert isinstance(recorded.baseline, torch.Tensor) and recorded.baseline.shape == (3,)
    assert _mean_consistency(labelled["base"], labelled) < 1e-9

    storage = open_storage(str(tmp_path / "out"))
    drift = {}
    for weight in (0.0, 10.0):
        result = finetune(_config(labelled, game_consistency=weight), storage, f"w{weight:g}")
        drift[weight] = _mean_consistency(storage.url(result["key"]), labelled)
    # Without the term the labels' explanation loss moves the game; with it, far less.
    assert drift[0.0] > 0.05, drift
    assert drift[10.0] < 0.5 * drift[0.0], drift


def test_the_term_without_kept_games_is_refused_before_training(tmp_path) -> None:
    root = tmp_path / "x"
    plan = build_small_xdata(str(root), LabelConfig(budget=60, keep_game=False))
    config = FinetuneConfig(
        domain="shapes", mode="X", data=plan.dataset_uri, split="val", game_consistency=1.0
    )
    with pytest.raises(ValueError, match="game.npz"):
        training_stream(config)


def _fingerprint(**fields) -> str:
    return FinetuneConfig(domain="shapes", mode="X", data="x", **fields).resume_fingerprint()


def test_the_default_keeps_earlier_models_fingerprints() -> None:
    # The fingerprints of these configs before the term existed (and so every model's folder).
    assert _fingerprint() == "21058915a1fd5ee6"
    assert _fingerprint(x_loss="game", lr=3e-4) == "02eaee952137cc17"
    assert _fingerprint(consistency_coalitions=9) == _fingerprint()
    assert _fingerprint(game_consistency=1.0) != _fingerprint()
    assert _fingerprint(game_consistency=1.0, consistency_coalitions=2) != _fingerprint(
        game_consistency=1.0
    )

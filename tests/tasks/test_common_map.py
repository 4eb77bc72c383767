"""``common_map``: theta_X's explanation loss also on the map along the head's common direction.

The term is the same loss on the mean of the class maps, added with its weight (for the label
loss and for the game loss); at weight 0 nothing changes, fingerprints included; only the
source's theta_X gets the setting.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from flows.pipeline import _finetune_config
from flows.pipeline_config import PipelineConfig, check_domains
from tasks.data.stream import GameBatch
from tasks.explanation_losses import explanation_loss, explanation_term, game_loss
from tasks.finetune import FinetuneConfig


def _maps_whose_label_map_fits_and_whose_mean_does_not() -> tuple[torch.Tensor, torch.Tensor]:
    """Two images, 3 classes, 2x2 maps: each label class's map is its target; the other two
    classes' maps are minus twice the target, so the mean of the three is minus the target."""
    targets = torch.tensor([[[1.0, 2.0], [3.0, 5.0]], [[4.0, 0.0], [1.0, 2.0]]])
    maps = -2 * targets[:, None].repeat(1, 3, 1, 1)
    labels = torch.tensor([0, 2])
    maps[0, 0], maps[1, 2] = targets[0], targets[1]
    return maps, labels, targets


def test_the_term_is_the_label_loss_on_the_mean_of_the_class_maps() -> None:
    maps, labels, targets = _maps_whose_label_map_fits_and_whose_mean_does_not()
    batch = SimpleNamespace(targets=targets, games=None)
    plain = explanation_term(maps, labels, batch, torch.device("cpu"))
    assert plain == pytest.approx(0.0, abs=1e-6)
    assert explanation_term(maps, labels, batch, torch.device("cpu"), common_map=0.0) == plain
    with_term = explanation_term(maps, labels, batch, torch.device("cpu"), common_map=0.5)
    # The mean map is minus the target: standardised, the squared difference is 4 per cell.
    assert with_term == pytest.approx(0.5 * 4.0, rel=1e-5)
    common = explanation_loss(maps.mean(1, keepdim=True), torch.zeros(2, dtype=torch.long), targets)
    assert with_term == pytest.approx(float(plain + 0.5 * common), rel=1e-6)


def test_the_term_uses_the_game_loss_when_theta_x_trains_on_games() -> None:
    maps, labels, _ = _maps_whose_label_map_fits_and_whose_mean_does_not()
    generator = torch.Generator().manual_seed(0)
    coalitions = (torch.rand(2, 6, 4, generator=generator) > 0.5).float()
    games = GameBatch(
        coalitions,
        torch.rand(2, 6, generator=generator),
        torch.randn(2, 6, generator=generator),
        torch.zeros(2),
        torch.ones(2),
    )
    batch = SimpleNamespace(targets=None, games=games)
    got = explanation_term(maps, labels, batch, torch.device("cpu"), "game", common_map=2.0)
    zeros = torch.zeros(2, dtype=torch.long)
    expected = game_loss(maps, labels, games) + 2.0 * game_loss(
        maps.mean(1, keepdim=True), zeros, games
    )
    assert got == pytest.approx(float(expected), rel=1e-6)


def test_the_field_leaves_earlier_fingerprints_and_reaches_only_the_source_x() -> None:
    def fingerprint(**fields) -> str:
        return FinetuneConfig(domain="shapes", mode="X", data="x", **fields).resume_fingerprint()

    assert fingerprint(common_map=0.0) == fingerprint() == "21058915a1fd5ee6"
    assert fingerprint(common_map=0.3) != fingerprint()
    config = PipelineConfig(out_uri="x", common_map=0.3)
    plans = check_domains(config)
    source_x = _finetune_config(config, plans["shapes"], "X", "base", "data")
    source_p = _finetune_config(config, plans["shapes"], "P", "base", "data")
    target = _finetune_config(config, plans["glyphs"], "P", "base", "data", target=True)
    assert (source_x.common_map, source_p.common_map, target.common_map) == (0.3, 0.0, 0.0)
    with pytest.raises(ValueError):
        PipelineConfig(out_uri="x", common_map=-1)

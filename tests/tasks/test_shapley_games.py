"""The accuracy benchmark's 49-player games have the Shapley values it claims, and its
Regression MSR is exact when the budget covers every coalition (so the comparison is fair)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.bench_shapley_accuracy import (
    bagnet_game,
    local_poly_game,
    regression_msr,
    table_game,
)
from tasks.algorithms.leverage_shap import (
    sample_leverage_coalitions,
    solve_leverage_shap,
)


def _all(players: int) -> np.ndarray:
    codes = np.arange(2**players)
    return (codes[:, None] >> np.arange(players)) & 1 == 1


@pytest.mark.parametrize("make", [bagnet_game, local_poly_game])
def test_exact_values_of_the_spatial_games_match_enumeration(make):
    game, exact = make(seed=3, side=3)  # 9 players: enumerable
    _, enumerated = table_game(game(_all(9)), 9)
    np.testing.assert_allclose(exact, enumerated, rtol=0, atol=1e-9)


def test_regression_msr_is_exact_at_full_budget():
    game, exact = local_poly_game(seed=1, side=3)
    phi = regression_msr(game, 9, 2**9, seed=0)
    np.testing.assert_allclose(phi, exact, rtol=0, atol=1e-6)


def test_the_default_design_is_exact_on_pairwise_games_from_2p_plus_2():
    # Front-loaded: at 2P + 2 evaluations the sizes-1 stratum is enumerated, which pins down
    # the Shapley values of any game of pairwise interactions (the mean of each cell's first
    # and last marginal contribution), and the stratum of sizes 2 sampled on top (150) keeps it.
    rng = np.random.default_rng(0)
    players = 49
    linear = rng.normal(size=players)
    pairs = [(rng.choice(players, 2, replace=False), rng.normal()) for _ in range(100)]
    exact = linear.copy()
    for (i, j), w in pairs:
        exact[[i, j]] += w / 2

    def game(z: np.ndarray) -> np.ndarray:
        return z @ linear + sum(w * (z[:, i] & z[:, j]) for (i, j), w in pairs)

    def solve(budget: int, seed: int) -> np.ndarray:
        generator = torch.Generator().manual_seed(seed)
        masks, weights, _ = sample_leverage_coalitions(players, budget - 2, generator)
        ends = game(np.stack([np.zeros(players, bool), np.ones(players, bool)]))
        values = torch.from_numpy(game(masks.numpy()).astype(np.float64))[None, :, None]
        v0 = torch.tensor([[ends[0]]], dtype=torch.float64)
        v1 = torch.tensor([[ends[1]]], dtype=torch.float64)
        phi = solve_leverage_shap(masks[None], weights[None], values, v0, v1)[0]
        return phi[0, :, 0].numpy()

    for seed in range(3):
        for budget in (100, 150):
            np.testing.assert_allclose(solve(budget, seed), exact, rtol=0, atol=1e-8)

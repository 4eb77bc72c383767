"""The label-quality benchmark's smoothed solve is the labeller's solve at penalty 0, keeps
efficiency, and leaves a game whose Shapley values are spatially constant exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.label_quality import grid_laplacian, smoothed_solve
from tasks.algorithms.games import CoalitionGame
from tasks.algorithms.kernel_shap import solve_games
from tasks.algorithms.leverage_shap import sample_leverage_coalitions

GRID = (4, 4)
PLAYERS = GRID[0] * GRID[1]


def _games(value_of, budget: int = 60, n: int = 3) -> list[CoalitionGame]:
    games = []
    for seed in range(n):
        generator = torch.Generator().manual_seed(seed)
        masks, weights, strata = sample_leverage_coalitions(PLAYERS, budget - 2, generator)
        z = masks.numpy()
        ends = value_of(np.stack([np.zeros(PLAYERS, bool), np.ones(PLAYERS, bool)]), seed)
        games.append(
            CoalitionGame(
                masks=z,
                weights=weights.numpy(),
                strata=strata.numpy(),
                values=value_of(z, seed)[:, None],
                v_empty=ends[:1],
                v_full=ends[1:],
                classes=(0,),
                grid=GRID,
                budget=budget,
                seed=seed,
                sampler="leverage",
            )
        )
    return games


def _interacting(z: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    linear = rng.normal(size=PLAYERS)
    return z @ linear + 0.5 * (z[:, 0] & z[:, 5]) - 0.8 * (z[:, 3] & z[:, 7] & z[:, 9])


def test_the_laplacian_of_a_grid_sums_to_zero_and_counts_neighbours():
    lap = grid_laplacian(*GRID)
    np.testing.assert_allclose(lap.sum(dim=1).numpy(), 0.0)
    degrees = torch.diagonal(lap).numpy().reshape(GRID)
    assert degrees[0, 0] == 2 and degrees[0, 1] == 3 and degrees[1, 1] == 4


def test_penalty_zero_is_the_labellers_solve():
    games = _games(_interacting)
    labels = solve_games(games)[0][:, 0].reshape(len(games), -1).double()
    np.testing.assert_allclose(smoothed_solve(games, 0.0).numpy(), labels.numpy(), atol=1e-5)


@pytest.mark.parametrize("mu", [0.1, 1.0])
def test_a_smoothed_solve_keeps_efficiency(mu):
    games = _games(_interacting)
    phi = smoothed_solve(games, mu).numpy()
    totals = np.array([g.v_full[0] - g.v_empty[0] for g in games])
    np.testing.assert_allclose(phi.sum(axis=1), totals, atol=1e-9)
    assert not np.allclose(phi, smoothed_solve(games, 0.0).numpy(), atol=1e-3)


def test_a_spatially_constant_additive_game_stays_exact_under_any_penalty():
    def constant(z: np.ndarray, seed: int) -> np.ndarray:
        return (1.0 + seed) * z.sum(axis=1).astype(np.float64)

    games = _games(constant)
    for mu in (0.0, 0.3, 3.0):
        phi = smoothed_solve(games, mu).numpy()
        np.testing.assert_allclose(phi, np.repeat([[1.0], [2.0], [3.0]], PLAYERS, 1), atol=1e-9)

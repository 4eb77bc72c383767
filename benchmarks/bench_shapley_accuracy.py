"""Accuracy per evaluation of Shapley estimators on games whose Shapley values are known exactly.

Games (49 players, a 7x7 grid of image cells, unless said otherwise):
- ``poly49``: random linear + pairwise + triple terms (49 of each order) over any players; an
  interaction over the set T with weight w gives each member w / |T|, so the exact values are
  analytic.
- ``bagnet49``: a BagNet-like image model: the logit is the sum over the 49 3x3 cell windows
  (clipped at the border) of a small random MLP of the window's cell features, an absent cell
  replaced by the mean feature (the baseline). The features are those of a smooth random image
  (neighbouring cells alike). Interactions are local and of every order up to 9; exact by
  enumerating each window's coalitions (at most 512) and adding the windows' Shapley values.
- ``local49``: spatial polynomial: linear terms, a pairwise term for every pair of neighbouring
  cells and a triple term for every L-shaped triple of a 2x2 block (interactions as in images:
  between neighbours); analytic like ``poly49``.
- ``vit16`` and ``conv16`` (``--small``): 16 players, a tiny open_clip ViT and a small conv net,
  exact by enumerating all 65,536 coalitions.

Every estimator sees the game as a function of coalitions and is charged every evaluation,
empty and full included. Error: ``||phi - exact|| / ||exact||``, median over games and seeds;
cost: the estimator's own CPU time per call (wall time less the time spent in the game).

Run from the repository root: ``python -m benchmarks.bench_shapley_accuracy``.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

from tasks.algorithms.kernel_shap import sample_coalitions, solve_kernel_shap
from tasks.algorithms.leverage_shap import (
    default_shrinkage,
    sample_leverage_coalitions,
    solve_leverage_shap,
)
from tasks.model.vit import OpenCLIPClassifier

BUDGETS = (50, 75, 100, 150, 200, 300)
OURS = "ours: leverage, uniform design, shrunk solve (default)"
FRONT = "ours: outer strata first below 2P pairs (front_load)"
SHAP = "shap.KernelExplainer (l1_reg=False)"
MSR = "Regression MSR (re-implemented, tree proxy)"
Game = Callable[[np.ndarray], np.ndarray]  # bool [K, P] -> float [K]


def poly_game(players: int, seed: int) -> tuple[Game, np.ndarray]:
    """Random linear + pairwise + triple terms and the exact Shapley values."""
    rng = np.random.default_rng(seed)
    terms = [((i,), rng.normal()) for i in range(players)]
    for order in (2, 3):
        terms += [
            (tuple(rng.choice(players, order, replace=False)), rng.normal()) for _ in range(players)
        ]
    exact = np.zeros(players)
    for members, weight in terms:
        exact[list(members)] += weight / len(members)

    def game(z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, dtype=bool)
        out = np.zeros(len(z))
        for members, weight in terms:
            out += weight * z[:, list(members)].all(axis=1)
        return out

    return game, exact


def _terms_game(
    players: int, terms: list[tuple[tuple[int, ...], float]]
) -> tuple[Game, np.ndarray]:
    """A game that is a sum of weighted unanimity terms, and its exact Shapley values."""
    exact = np.zeros(players)
    for members, weight in terms:
        exact[list(members)] += weight / len(members)
    index = [np.asarray(members) for members, _ in terms]
    weight = np.asarray([w for _, w in terms])

    def game(z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, dtype=bool)
        return np.stack([z[:, m].all(axis=1) for m in index], axis=1) @ weight

    return game, exact


def local_poly_game(seed: int, side: int = 7) -> tuple[Game, np.ndarray]:
    """Linear terms, neighbour pairs and the L-shaped triples of every 2x2 block of cells."""
    rng = np.random.default_rng(seed)
    cell = np.arange(side * side).reshape(side, side)
    terms = [((i,), rng.normal()) for i in range(side * side)]
    pairs = [
        (int(a), int(b)) for a, b in zip(cell[:, :-1].ravel(), cell[:, 1:].ravel(), strict=True)
    ]
    pairs += [(int(a), int(b)) for a, b in zip(cell[:-1].ravel(), cell[1:].ravel(), strict=True)]
    terms += [(p, rng.normal()) for p in pairs]
    for r in range(side - 1):
        for c in range(side - 1):
            block = [cell[r, c], cell[r, c + 1], cell[r + 1, c], cell[r + 1, c + 1]]
            drop = int(rng.integers(4))
            terms.append((tuple(int(b) for j, b in enumerate(block) if j != drop), rng.normal()))
    return _terms_game(side * side, terms)


def _smooth_field(rng: np.random.Generator, side: int, channels: int) -> np.ndarray:
    """``[side, side, channels]`` a smooth random image at cell resolution (neighbours alike)."""
    coarse = rng.normal(size=(3, 3, channels))
    grid = np.linspace(0, 2, side)
    lo = np.minimum(grid.astype(int), 1)
    t = (grid - lo)[:, None]
    rows = coarse[lo] * (1 - t)[:, :, None] + coarse[lo + 1] * t[:, :, None]
    field = rows[:, lo] * (1 - t)[None] + rows[:, lo + 1] * t[None]
    return field + 0.3 * rng.normal(size=field.shape)


def bagnet_game(seed: int, side: int = 7, features: int = 6, hidden: int = 16):
    """Sum over 3x3 cell windows of a random MLP of the window's features, exact per window."""
    rng = np.random.default_rng(seed)
    x = _smooth_field(rng, side, features).reshape(side * side, features)
    baseline = x.mean(axis=0)
    w1 = rng.normal(size=(9 * features, hidden)) * 1.5 / math.sqrt(9 * features)
    b1 = rng.normal(size=hidden) * 0.5
    w2 = rng.normal(size=hidden) * 2.0 / math.sqrt(hidden)
    cell = np.arange(side * side).reshape(side, side)
    windows, tables = [], []
    players = side * side
    for r in range(side):
        for c in range(side):
            slots = [(r + dr, c + dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)]
            inside = [j for j, (a, b) in enumerate(slots) if 0 <= a < side and 0 <= b < side]
            members = np.asarray([cell[slots[j]] for j in inside])
            codes = np.arange(2 ** len(members))
            present = (codes[:, None] >> np.arange(len(members))) & 1 == 1
            inputs = np.tile(baseline, (len(codes), 9, 1))
            inputs[:, inside] = np.where(present[:, :, None], x[members][None], baseline)
            tables.append(np.tanh(inputs.reshape(len(codes), -1) @ w1 + b1) @ w2)
            windows.append(members)
    exact = np.zeros(players)
    for members, values in zip(windows, tables, strict=True):
        _, local = table_game(values, len(members))
        exact[members] += local
    powers = [1 << np.arange(len(m)) for m in windows]

    def game(z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, dtype=bool)
        out = np.zeros(len(z))
        for members, values, power in zip(windows, tables, powers, strict=True):
            out += values[z[:, members] @ power]
        return out

    return game, exact


def table_game(values: np.ndarray, players: int) -> tuple[Game, np.ndarray]:
    """A game given by the values of all ``2 ** P`` coalitions (bit i = player i) and its
    exact Shapley values."""
    sizes = np.array([bin(i).count("1") for i in range(2**players)])
    weights = np.array(
        [
            math.factorial(s) * math.factorial(players - s - 1) / math.factorial(players)
            for s in range(players)
        ]
    )
    exact = np.zeros(players)
    index = np.arange(2**players)
    for i in range(players):
        without = index[(index >> i) & 1 == 0]
        exact[i] = (weights[sizes[without]] * (values[without | (1 << i)] - values[without])).sum()
    powers = 1 << np.arange(players)

    def game(z: np.ndarray) -> np.ndarray:
        return values[(np.asarray(z, dtype=bool) * powers).sum(axis=1)]

    return game, exact


def all_coalitions(players: int) -> Tensor:
    index = torch.arange(2**players)
    return (index.unsqueeze(1) >> torch.arange(players)) & 1 == 1


def vit_games(count: int, seed: int) -> list[tuple[Game, np.ndarray]]:
    """Tiny ViT (4x4 tokens), token masking with a mean baseline, the top class."""
    torch.manual_seed(seed)
    visual = VisionTransformer(
        image_size=32, patch_size=8, width=64, layers=3, heads=4, mlp_ratio=2.0, output_dim=32
    ).eval()
    with torch.no_grad():
        for p in visual.parameters():
            if p.dim() > 1:
                p.mul_(2.0)
    model = OpenCLIPClassifier(visual, torch.randn(5, 32), logit_scale=10.0).eval()
    images = torch.randn(count, 3, 32, 32)
    masks = all_coalitions(16)
    games = []
    with torch.inference_mode():
        tokens = model.embed_patches(images)
        base = model.embed_patches(images.mean(dim=(0, 2, 3)).view(1, 3, 1, 1).expand(1, 3, 32, 32))
        for i in range(count):
            cls = int(model(images[i : i + 1]).argmax())
            values = torch.cat(
                [
                    model.forward_from_patches(torch.where(m.unsqueeze(-1), tokens[i], base[0]))[
                        :, cls
                    ]
                    for m in masks.split(8192)
                ]
            )
            games.append(table_game(values.double().numpy(), 16))
    return games


def conv_games(count: int, seed: int) -> list[tuple[Game, np.ndarray]]:
    """Small random conv net, 16 px images, 4x4 cells of 4x4 pixels, zero baseline."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2),
        nn.GELU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 16),
        nn.Tanh(),
        nn.Linear(16, 3),
    ).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1:
                p.mul_(3.0)
    images = torch.rand(count, 3, 16, 16)
    cells = (torch.arange(16) // 4).unsqueeze(1) * 4 + (torch.arange(16) // 4).unsqueeze(0)
    masks = all_coalitions(16)
    games = []
    with torch.inference_mode():
        for i in range(count):
            values = torch.cat(
                [
                    net(torch.where(m[:, cells].unsqueeze(1), images[i], 0.0))[:, i % 3]
                    for m in masks.split(8192)
                ]
            )
            games.append(table_game(values.double().numpy(), 16))
    return games


def _ends(game: Game, players: int) -> tuple[Tensor, Tensor]:
    ends = game(np.stack([np.zeros(players, bool), np.ones(players, bool)]))
    return torch.tensor([[ends[0]]], dtype=torch.float64), torch.tensor(
        [[ends[1]]], dtype=torch.float64
    )


def ours_leverage(game: Game, players: int, budget: int, seed: int) -> np.ndarray:
    masks, weights, _ = sample_leverage_coalitions(
        players, budget - 2, torch.Generator().manual_seed(seed)
    )
    v0, v1 = _ends(game, players)
    values = torch.from_numpy(game(masks.numpy()))[None, :, None]
    return solve_leverage_shap(masks[None], weights[None], values, v0, v1)[0][0, :, 0].numpy()


def ours_front_loaded(game: Game, players: int, budget: int, seed: int) -> np.ndarray:
    """The design of ``front_load=True``: outer strata first below 2P pairs, plain solve."""
    masks, weights, _ = sample_leverage_coalitions(
        players, budget - 2, torch.Generator().manual_seed(seed), front_load=True
    )
    v0, v1 = _ends(game, players)
    values = torch.from_numpy(game(masks.numpy()))[None, :, None]
    shrinkage = default_shrinkage(players, budget - 2, front_load=True)
    phi = solve_leverage_shap(masks[None], weights[None], values, v0, v1, shrinkage=shrinkage)
    return phi[0][0, :, 0].numpy()


def ours_kernel(game: Game, players: int, budget: int, seed: int) -> np.ndarray:
    masks, weights = sample_coalitions(players, budget - 2, torch.Generator().manual_seed(seed))
    v0, v1 = _ends(game, players)
    values = torch.from_numpy(game(masks.numpy()))[None, :, None]
    return solve_kernel_shap(masks[None], weights[None], values, v0, v1)[0, :, 0].numpy()


def shap_kernel(game: Game, players: int, budget: int, seed: int) -> np.ndarray:
    import shap

    explainer = shap.KernelExplainer(lambda z: game(z > 0.5), np.zeros((1, players)))
    np.random.seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(
            explainer.shap_values(
                np.ones((1, players)), nsamples=budget - 2, l1_reg=False, silent=True
            )
        ).reshape(-1)


def _captum_forward(game: Game):
    return lambda x: torch.from_numpy(game(x.detach().numpy() > 0.5))


def captum_kernel(game: Game, players: int, budget: int, seed: int) -> np.ndarray:
    from captum.attr import KernelShap

    torch.manual_seed(seed)
    phi = KernelShap(_captum_forward(game)).attribute(
        torch.ones(1, players, dtype=torch.float64),
        baselines=torch.zeros(1, players, dtype=torch.float64),
        n_samples=budget,
        perturbations_per_eval=budget,
    )
    return phi[0].numpy()


def captum_permutation(game: Game, players: int, budget: int, seed: int) -> np.ndarray | None:
    from captum.attr import ShapleyValueSampling

    permutations = (budget - 1) // players  # each permutation: P evaluations, plus the empty one
    if permutations < 1:
        return None
    torch.manual_seed(seed)
    phi = ShapleyValueSampling(_captum_forward(game)).attribute(
        torch.ones(1, players, dtype=torch.float64),
        baselines=torch.zeros(1, players, dtype=torch.float64),
        n_samples=permutations,
        perturbations_per_eval=players,
    )
    return phi[0].numpy()


def _shapiq(cls, **kwargs):
    def run(game: Game, players: int, budget: int, seed: int) -> np.ndarray | None:
        approximator = cls(n=players, random_state=seed, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                values = approximator.approximate(budget, lambda z: game(np.atleast_2d(z)))
            except Exception:  # an approximator that refuses a budget is reported as n/a
                return None
        return np.array([values[(i,)] for i in range(players)])

    return run


def _msr_size_weights(players: int) -> np.ndarray:
    """Regression MSR's sampling mass per coalition size for a non-linear proxy (Witter et al.).

    Per coalition ``D(s) = sqrt(p_{s-1}^2 s + p_s^2 (n - s))`` with the Shapley coefficients
    ``p_k = k! (n - k - 1)! / n!``; per size ``D(s) C(n, s)``, normalised.
    """
    n = players
    log_p = np.array(
        [math.lgamma(k + 1) + math.lgamma(n - k) - math.lgamma(n + 1) for k in range(n)]
    )
    log_mass = np.empty(n + 1)
    for s in range(n + 1):
        terms = ([2 * log_p[s - 1] + math.log(s)] if s > 0 else []) + (
            [2 * log_p[s] + math.log(n - s)] if s < n else []
        )
        top = max(terms)
        log_d = 0.5 * (top + math.log(sum(math.exp(t - top) for t in terms)))
        log_mass[s] = log_d + math.lgamma(n + 1) - math.lgamma(s + 1) - math.lgamma(n - s + 1)
    mass = np.exp(log_mass - log_mass.max())
    return mass / mass.sum()


def regression_msr(game: Game, players: int, budget: int, seed: int) -> np.ndarray | None:
    """Regression MSR (Witter et al., NeurIPS 2025; shapiq's ``RegressionMSR``), re-implemented.

    shapiq 1.4.1, the newest release on the package index, has no ``RegressionMSR``; this
    follows its published algorithm (the single-fit, all-samples variant shapiq ships): paired
    coalitions from the paper's size distribution (shapiq's ``CoalitionSampler``, border sizes
    enumerated when covered), a gradient-boosted tree proxy fitted on all of them (sklearn's
    ``GradientBoostingRegressor`` with its defaults, in place of XGBoost, which is not installed),
    the proxy's exact Shapley values (``shap.TreeExplainer``, interventional, the empty
    coalition as the background), and the Horvitz-Thompson correction of the proxy's residuals.
    """
    import shap
    from shapiq.approximator.sampling import CoalitionSampler
    from sklearn.ensemble import GradientBoostingRegressor

    sampler = CoalitionSampler(
        players, _msr_size_weights(players), pairing_trick=True, random_state=seed
    )
    sampler.sample(budget)
    z = sampler.coalitions_matrix.astype(bool)
    values = game(z)
    sizes = z.sum(axis=1)
    empty = np.flatnonzero(sizes == 0)
    if not len(empty):
        return None
    v0 = values[empty[0]]
    y = values - v0
    proxy = GradientBoostingRegressor(random_state=seed).fit(z.astype(np.float64), y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explainer = shap.TreeExplainer(
            proxy, data=np.zeros((1, players)), feature_perturbation="interventional"
        )
        phi = np.asarray(explainer.shap_values(np.ones((1, players)), check_additivity=False))[0]
    residual = y - proxy.predict(z.astype(np.float64))
    residual = residual - residual[empty[0]]
    p = np.array(
        [
            math.exp(math.lgamma(k + 1) + math.lgamma(players - k) - math.lgamma(players + 1))
            for k in range(players)
        ]
    )
    p_below = np.concatenate(([0.0], p))[sizes]
    p_above = np.concatenate((p, [0.0]))[sizes]
    d = sampler.sampling_adjustment_weights * residual
    correction = (d * p_below) @ z - (d * p_above) @ ~z
    return phi + correction


def methods(captum: bool = True) -> dict[str, Callable]:
    table = {
        OURS: ours_leverage,
        FRONT: ours_front_loaded,
        "ours: kernel (shap's scheme)": ours_kernel,
        SHAP: shap_kernel,
    }
    if captum:
        table["captum KernelShap"] = captum_kernel
        table["captum ShapleyValueSampling"] = captum_permutation
    try:
        from shapiq.approximator import (
            SVARM,
            KernelSHAP,
            OwenSamplingSV,
            PermutationSamplingSV,
            StratifiedSamplingSV,
            UnbiasedKernelSHAP,
            kADDSHAP,
        )
    except ImportError:
        logging.warning("shapiq is not installed: its approximators are left out")
        return table
    table[MSR] = regression_msr
    table["shapiq KernelSHAP"] = _shapiq(KernelSHAP, pairing_trick=True)
    table["shapiq kADDSHAP (k=2)"] = _shapiq(kADDSHAP, max_order=2, pairing_trick=True)
    table["shapiq UnbiasedKernelSHAP"] = _shapiq(UnbiasedKernelSHAP, pairing_trick=True)
    table["shapiq SVARM"] = _shapiq(SVARM, pairing_trick=True)
    table["shapiq PermutationSamplingSV"] = _shapiq(PermutationSamplingSV)
    table["shapiq StratifiedSamplingSV"] = _shapiq(StratifiedSamplingSV)
    table["shapiq OwenSamplingSV"] = _shapiq(OwenSamplingSV)
    return table


class _TimedGame:
    """A game that adds up the time spent inside it (so an estimator's own cost is known)."""

    def __init__(self, game: Game) -> None:
        self.game, self.seconds = game, 0.0

    def __call__(self, z: np.ndarray) -> np.ndarray:
        start = time.process_time()
        try:
            return self.game(z)
        finally:
            self.seconds += time.process_time() - start


def evaluate(games, players: int, budgets, seeds: int, captum: bool = True):
    """``(median error, estimator CPU ms per call)`` per method and budget."""
    errors_of: dict[str, dict[int, float]] = {}
    cost_of: dict[str, dict[int, float]] = {}
    for name, method in methods(captum).items():
        errors_of[name], cost_of[name] = {}, {}
        for budget in budgets:
            errors, cpu = [], []
            for g, (game, exact) in enumerate(games):
                for seed in range(seeds):
                    timed = _TimedGame(game)
                    start = time.process_time()
                    phi = method(timed, players, budget, 1000 * g + seed)
                    if phi is None:
                        break
                    cpu.append(time.process_time() - start - timed.seconds)
                    errors.append(np.linalg.norm(phi - exact) / np.linalg.norm(exact))
            errors_of[name][budget] = float(np.median(errors)) if errors else math.nan
            cost_of[name][budget] = 1e3 * float(np.median(cpu)) if cpu else math.nan
        logging.info("  %s done", name)
    return errors_of, cost_of


def _fmt(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    return f"{x:.3g}" if x < 1000 else f"{x:.1e}"


def _best_shapiq(table: dict[str, dict[int, float]], budget: int) -> tuple[str, float]:
    """The most accurate shapiq approximator (Regression MSR included) at one budget."""
    rows = [
        (name, row[budget])
        for name, row in table.items()
        if (name.startswith("shapiq") or name == MSR) and not math.isnan(row[budget])
    ]
    return min(rows, key=lambda r: r[1]) if rows else ("n/a", math.nan)


def markdown(title: str, table: dict[str, dict[int, float]], cost, budgets) -> str:
    lines = [
        f"**{title}**",
        "",
        "| method | " + " | ".join(map(str, budgets)) + " | CPU ms / call at 150 |",
    ]
    lines.append("|---" * (len(budgets) + 2) + "|")
    cost_budget = 150 if 150 in budgets else budgets[-1]
    for name, row in table.items():
        cells = " | ".join(_fmt(row[b]) for b in budgets)
        lines.append(f"| {name} | {cells} | {_fmt(cost[name][cost_budget])} |")
    if OURS in table and SHAP in table:
        ratios = " | ".join(_fmt(table[OURS][b] / table[SHAP][b]) for b in budgets)
        lines.append(f"| *ours / shap (goal <= 0.8)* | {ratios} | |")
        best = [_best_shapiq(table, b) for b in budgets]
        ratios = " | ".join(
            _fmt(table[OURS][b] / e) for b, (_, e) in zip(budgets, best, strict=True)
        )
        lines.append(f"| *ours / best shapiq (goal <= 1)* | {ratios} | |")
        names = " | ".join(n.removeprefix("shapiq ").split(" (")[0] for n, _ in best)
        lines.append(f"| *best shapiq* | {names} | |")
    return "\n".join(lines)


def labeller_cost(images: int = 32, budget: int = 150, repeats: int = 3) -> str:
    """Per-image time of the labeller's sampling + solve (the part that is not the model) for
    both samplers, next to the model time of the same evaluations on the tiny ViT of
    ``tiny-vit-56`` (token masking), measured back to back so that both see the same load."""
    from tasks.algorithms.kernel_shap import kernel_shap_explain

    open_clip.add_model_config(
        Path(__file__).resolve().parents[1] / "tasks" / "model" / "model_configs"
    )
    torch.manual_seed(0)
    clip = open_clip.create_model("tiny-vit-56").eval()
    model = OpenCLIPClassifier(clip, torch.randn(10, clip.visual.output_dim)).eval()
    x = torch.randn(images, 3, 56, 56)
    classes = torch.zeros(images, dtype=torch.long)
    lines = [
        "| sampler | sampling + solve (ms / image) | model (ms / image) | ratio |",
        "|---|---|---|---|",
    ]
    for sampler in ("leverage", "kernel"):
        best_solve, best_model = math.inf, math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            for i in range(images):
                generator = torch.Generator().manual_seed(i)
                if sampler == "leverage":
                    masks, weights, _ = sample_leverage_coalitions(49, budget - 2, generator)
                else:
                    masks, weights = sample_coalitions(49, budget - 2, generator)
            values = torch.randn(images, len(masks), 2, dtype=torch.float64)
            ends = torch.randn(images, 2, dtype=torch.float64)
            stacked_m, stacked_w = masks.expand(images, -1, -1), weights.expand(images, -1)
            if sampler == "leverage":
                solve_leverage_shap(stacked_m, stacked_w, values, ends, ends + 1)
            else:
                solve_kernel_shap(stacked_m, stacked_w, values, ends, ends + 1)
            best_solve = min(best_solve, (time.perf_counter() - start) / images)
            start = time.perf_counter()
            kernel_shap_explain(model, x, classes, budget=budget, sampler=sampler)
            best_model = min(best_model, (time.perf_counter() - start) / images - best_solve)
        lines.append(
            f"| {sampler} | {1e3 * best_solve:.1f} | {1e3 * best_model:.1f} | "
            f"{100 * best_solve / best_model:.1f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--games", type=int, default=4, help="games of each 49-player suite")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    parser.add_argument("--small", action="store_true", help="also the 16-player model games")
    parser.add_argument("--images", type=int, default=2, help="vit16 and conv16 games each")
    parser.add_argument("--no-captum", action="store_true", help="leave captum's methods out")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables here")
    parser.add_argument(
        "--cost", action="store_true", help="only time the labeller's sampling + solve"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("shap").setLevel(logging.ERROR)
    logging.getLogger("tasks").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    if args.cost:
        logging.info("%s", labeller_cost())
        return
    start = time.perf_counter()
    sections = []
    suites = [
        (
            "bagnet49: 3x3-window MLP image model, 49 players",
            [bagnet_game(s) for s in range(args.games)],
            49,
        ),
        (
            "local49: neighbour pairs and 2x2-block triples, 49 players",
            [local_poly_game(s) for s in range(args.games)],
            49,
        ),
        (
            "poly49: 49 players, linear + pairwise + triple terms",
            [poly_game(49, s) for s in range(args.games)],
            49,
        ),
    ]
    if args.small:
        suites += [
            ("vit16: tiny ViT, 16 players, token masking", vit_games(args.images, seed=0), 16),
            ("conv16: small conv net, 16 players", conv_games(args.images, seed=1), 16),
        ]
    for title, games, players in suites:
        logging.info("%s", title)
        table, cost = evaluate(games, players, args.budgets, args.seeds, not args.no_captum)
        sections.append(markdown(title, table, cost, args.budgets))
        logging.info("%s\n", sections[-1])
    logging.info("total %.0f s", time.perf_counter() - start)
    if args.out is not None:
        args.out.write_text("\n\n".join(sections) + "\n")


if __name__ == "__main__":
    main()

"""Accuracy per evaluation of Shapley estimators on games whose Shapley values are known exactly.

Games:
- ``poly49``: 49 players, random linear + pairwise + triple terms (49 of each order); an
  interaction over the set T with weight w gives each member w / |T|, so the exact values are
  analytic.
- ``vit16``: 16 players, a tiny open_clip ViT (32 px, 8 px patches, 4x4 tokens, weights scaled
  so that cells interact) behind :class:`OpenCLIPClassifier`, masked in token space; exact by
  enumerating all 65,536 coalitions.
- ``conv16``: 16 players, a small random conv net on 16 px images with a 4x4 cell grid, pixel
  masking; exact by enumeration.

Every estimator sees the game as a function of coalitions and is charged every evaluation,
empty and full included. Error: mean over games and seeds of ``||phi - exact|| / ||exact||``.

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
from tasks.algorithms.leverage_shap import sample_leverage_coalitions, solve_leverage_shap
from tasks.model.vit import OpenCLIPClassifier

BUDGETS = (25, 50, 100, 150, 200, 300)
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


def methods() -> dict[str, Callable]:
    table = {
        "ours: leverage + shrunk solve (default)": ours_leverage,
        "ours: kernel (shap's scheme)": ours_kernel,
        "shap.KernelExplainer (l1_reg=False)": shap_kernel,
        "captum KernelShap": captum_kernel,
        "captum ShapleyValueSampling": captum_permutation,
    }
    try:
        from shapiq.approximator import KernelSHAP, PermutationSamplingSV, kADDSHAP

        table["shapiq KernelSHAP"] = _shapiq(KernelSHAP, pairing_trick=True)
        table["shapiq PermutationSamplingSV"] = _shapiq(PermutationSamplingSV)
        table["shapiq kADDSHAP (k=2)"] = _shapiq(kADDSHAP, max_order=2)
    except ImportError:
        logging.warning("shapiq is not installed: its approximators are left out")
    return table


def evaluate(games, players: int, budgets, seeds: int) -> dict[str, dict[int, float]]:
    table: dict[str, dict[int, float]] = {}
    for name, method in methods().items():
        table[name] = {}
        for budget in budgets:
            errors = []
            for g, (game, exact) in enumerate(games):
                for seed in range(seeds):
                    phi = method(game, players, budget, 1000 * g + seed)
                    if phi is None:
                        break
                    errors.append(np.linalg.norm(phi - exact) / np.linalg.norm(exact))
            table[name][budget] = float(np.mean(errors)) if errors else math.nan
    return table


def _fmt(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    return f"{x:.3g}" if x < 1000 else f"{x:.1e}"


def markdown(title: str, table: dict[str, dict[int, float]], budgets) -> str:
    lines = [f"**{title}**", "", "| method | " + " | ".join(map(str, budgets)) + " |"]
    lines.append("|---" * (len(budgets) + 1) + "|")
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(row[b]) for b in budgets) + " |")
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
    parser.add_argument("--games", type=int, default=4, help="poly49 games")
    parser.add_argument("--images", type=int, default=2, help="vit16 and conv16 games each")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    parser.add_argument("--out", type=Path, default=None, help="also write the tables here")
    parser.add_argument(
        "--cost", action="store_true", help="only time the labeller's sampling + solve"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("shap").setLevel(logging.ERROR)
    logging.getLogger("tasks").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    if args.cost:
        logging.info("%s", labeller_cost())
        return
    start = time.perf_counter()
    sections = []
    suites = [
        (
            "poly49: 49 players, linear + pairwise + triple terms",
            [poly_game(49, s) for s in range(args.games)],
            49,
        ),
        ("vit16: tiny ViT, 16 players, token masking", vit_games(args.images, seed=0), 16),
        ("conv16: small conv net, 16 players", conv_games(args.images, seed=1), 16),
    ]
    for title, games, players in suites:
        table = evaluate(games, players, args.budgets, args.seeds)
        sections.append(markdown(title, table, args.budgets))
        logging.info("%s\n", sections[-1])
    logging.info("total %.0f s", time.perf_counter() - start)
    if args.out is not None:
        args.out.write_text("\n\n".join(sections) + "\n")


if __name__ == "__main__":
    main()

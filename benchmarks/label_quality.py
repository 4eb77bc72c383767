"""How good are an X-dataset's labels? Against a high-budget Kernel SHAP of the labelling model.

theta_X learns from labels that are Kernel SHAP estimates of theta_P at the build's budget. This
scores those labels on the first ``--images`` samples of a version whose games were kept: the
Pearson of each label (the first explained class, the image's label) with a Kernel SHAP of the
same model, image and class at ``--reference-budget`` evaluations (another seed), and of the
same games solved again without the model:

- ``shrinkage 0``: the plain least-squares solve of the leverage design;
- ``smooth MU``: the leverage solve with a penalty ``MU * c * u^T L u`` added, ``L`` the grid's
  4-neighbour Laplacian and ``c`` the population Gram matrix's eigenvalue (a spatial
  smoothness prior: neighbouring cells of an image tend to share their attribution). A probe,
  not an option of the labeller.

``--compare URI`` scores the labels of other versions over the same image keys (another budget
of the same model, say). Each row gives the mean over images and the paired difference with
the version's own labels, with its standard error.

Run: ``python -m benchmarks.label_quality --version demo-out/xdata/shapes-x/v-... [--compare
demo-out/xdata/shapes-x/v-...] [--images 48] [--reference-budget 2000]``.
"""

from __future__ import annotations

import argparse
import io
import tarfile
import time

import numpy as np
import torch
from PIL import Image

from storage import layout, open_storage
from tasks.algorithms.games import CoalitionGame
from tasks.algorithms.kernel_shap import kernel_shap, solve_games
from tasks.algorithms.leverage_shap import SHRINKAGE, _pair_rows, _shrinkage_weights
from tasks.data.stream import list_split
from tasks.explanation_losses import pearson_per_image
from tasks.model.loading import load_sem
from tasks.sweep.statistics import standard_error

SMOOTHING = (0.01, 0.03, 0.1, 0.3, 1.0)


def read_samples(uri: str, limit: int | None) -> tuple[dict, dict[str, dict[str, bytes]]]:
    """A version's ``config.json`` and its first samples (shard order), as raw members."""
    storage = open_storage(uri)
    meta = storage.read_json(layout.DATASET_CONFIG_FILE)
    build = meta["config"]
    samples: dict[str, dict[str, bytes]] = {}
    for key in list_split(storage.uri, build["split"], build["name"]).shards:
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(key))) as tar:
            for member in tar.getmembers():
                name, ext = member.name.split(".", 1)
                samples.setdefault(name, {})[ext] = tar.extractfile(member).read()
        if limit is not None and len(samples) >= limit:
            break
    return meta, samples


def grid_laplacian(gh: int, gw: int) -> torch.Tensor:
    """The 4-neighbour Laplacian of a ``gh x gw`` grid, cells in row-major order."""
    lap = torch.zeros(gh * gw, gh * gw, dtype=torch.float64)
    for r in range(gh):
        for c in range(gw):
            for rr, cc in ((r, c + 1), (r + 1, c)):
                if rr < gh and cc < gw:
                    i, j = r * gw + c, rr * gw + cc
                    lap[i, i] += 1
                    lap[j, j] += 1
                    lap[i, j] -= 1
                    lap[j, i] -= 1
    return lap


def smoothed_solve(games: list[CoalitionGame], mu: float) -> torch.Tensor:
    """The label class's attributions ``[N, P]``: the leverage solve plus the smoothness penalty."""
    gh, gw = games[0].grid
    players = gh * gw
    masks = torch.stack([torch.from_numpy(g.masks) for g in games])
    weights = torch.stack([torch.from_numpy(g.weights) for g in games])
    values = torch.stack([torch.from_numpy(g.values[:, :1]) for g in games])
    v_empty = torch.stack([torch.from_numpy(g.v_empty[:1]) for g in games])
    delta = torch.stack([torch.from_numpy(g.v_full[:1]) for g in games]) - v_empty
    a, w, d = _pair_rows(masks, weights, values, v_empty, delta)
    gram = (w.unsqueeze(-1) * a).transpose(1, 2) @ a
    rhs = (w.unsqueeze(-1) * a).transpose(1, 2) @ d
    eigenvalues, vectors = torch.linalg.eigh(gram)
    alpha = _shrinkage_weights(a, w, d, eigenvalues, vectors, SHRINKAGE)[:, 0, None, None]
    population = 1.0 / (2.0 * sum(1.0 / s for s in range(1, players)))
    ones = torch.full((players, players), 1.0 / players, dtype=torch.float64)
    proj = torch.eye(players, dtype=torch.float64) - ones
    system = (1 - alpha) * gram + alpha * population * proj + ones
    system = system + mu * population * grid_laplacian(gh, gw)
    return (delta / players).expand(-1, players) + torch.linalg.solve(system, rhs)[..., 0]


def label_maps(samples: dict[str, dict[str, bytes]], keys: list[str]) -> torch.Tensor:
    return torch.from_numpy(
        np.stack([np.load(io.BytesIO(samples[k]["shap.npy"]))[0] for k in keys])
    )


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", required=True, help="an X-dataset version with game.npz")
    parser.add_argument("--compare", action="append", default=[], help="another version")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--reference-budget", type=int, default=2000)
    args = parser.parse_args()
    meta, samples = read_samples(args.version, args.images)
    keys = sorted(samples)[: args.images]
    if not keys or "game.npz" not in samples[keys[0]]:
        raise SystemExit(f"{args.version}: no sample with a kept game")
    games = [CoalitionGame.from_npz(samples[k]["game.npz"]) for k in keys]
    images = torch.stack(
        [
            torch.from_numpy(np.array(Image.open(io.BytesIO(samples[k]["png"])).convert("RGB")))
            .permute(2, 0, 1)
            .float()
            / 255
            for k in keys
        ]
    )
    classes = torch.tensor([g.classes[0] for g in games])
    classifier = load_sem(meta["config"]["checkpoint"]).sem.as_classifier().eval()
    mean = torch.tensor(meta["baseline_mean"], dtype=torch.float32)
    start = time.perf_counter()
    seeds = [900_000 + i for i in range(len(keys))]
    reference = kernel_shap(
        classifier, images, classes, budget=args.reference_budget, baseline=mean, seed=seeds
    )
    print(
        f"{len(keys)} images, labels at budget {games[0].budget}, reference at "
        f"{args.reference_budget} ({time.perf_counter() - start:.0f} s)\n"
    )
    own = label_maps(samples, keys)
    solved = solve_games(games)[0][:, 0]
    if not torch.allclose(solved, own, atol=1e-5):
        raise SystemExit("the games do not solve to the stored labels")
    gh, gw = games[0].grid
    rows = {
        "the labels": own,
        "shrinkage 0": solve_games(games, shrinkage=0.0)[0][:, 0],
        **{f"smooth {mu:g}": smoothed_solve(games, mu).reshape(-1, gh, gw) for mu in SMOOTHING},
    }
    for uri in args.compare:
        other_meta, other = read_samples(uri, None)
        missing = [k for k in keys if k not in other]
        if missing:
            raise SystemExit(f"{uri} lacks {len(missing)} of the images, e.g. {missing[0]}")
        budget = other_meta["config"].get("label", {}).get("budget", "?")
        rows[f"{uri.rstrip('/').rsplit('/', 1)[-1]} (budget {budget})"] = label_maps(other, keys)
    base = pearson_per_image(own, reference).double().numpy()
    print("| labels | Pearson with the reference | paired difference with the labels (se) |")
    print("|---|---|---|")
    for name, maps in rows.items():
        r = pearson_per_image(maps.float(), reference).double().numpy()
        print(
            f"| {name} | {r.mean():.3f} | {(r - base).mean():+.3f} ({standard_error(r - base):.3f}) |"
        )


if __name__ == "__main__":
    main()

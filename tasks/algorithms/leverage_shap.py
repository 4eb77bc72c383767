"""Leverage-score coalition sampling and a shrinkage solve for Kernel SHAP (the default labeller).

Kernel SHAP's regression (coalition rows ``z - |S|/P`` after projecting out the efficiency
constraint, Shapley-kernel weights) has a remarkable population Gram matrix: every coalition size
contributes the same amount, ``P_proj / (2 H_{P-1})`` in total, where ``P_proj = I - 11^T / P``
and ``H`` is the harmonic number. Musco & Witter (ICLR 2025, "Provably accurate Shapley value
estimation via leverage score sampling") show that the rows' leverage scores are therefore
proportional to ``1 / C(P, |S|)``: sampling coalition *sizes* uniformly, instead of from the
Shapley kernel, is the provably good design. This module implements it with three refinements:

- *Stratified, without replacement, in complementary pairs.* Every size pair ``{s, P - s}`` is a
  stratum; the pairs of the budget are split equally between sizes (randomised rounding), a
  stratum that the budget covers is enumerated whole, and within a stratum distinct pairs are
  drawn uniformly. Each row then carries the exact Horvitz-Thompson weight ``mass(s) / k_s``
  (the stratum's kernel mass over its sampled count), so the sampled Gram matrix and right-hand
  side are unbiased for the population ones, and when every stratum is enumerated they *are*
  the population ones: the result is the exact Shapley value.
- *A solve that cannot blow up near ``2P`` evaluations.* With complementary pairs a budget ``b``
  gives ``(b - 2) / 2`` independent rows for ``P - 1`` unknowns; near square the least-squares
  system is ill-conditioned and its error explodes. Because the population Gram matrix is known,
  the sampled one is shrunk towards it, ``(1 - a) G_hat + a G``: the solve is always well
  posed, and a fully enumerated design stays exact for any ``a``. The weight ``a`` comes from the
  data: ``SHRINKAGE`` times the leave-one-pair-out (PRESS) fraction of unexplained target
  variance (relative to ``PRESS_SCALE``, capped at 1), so a game the regression fits exactly (an additive model, with enough pairs) gets
  ``a = 0`` and is solved exactly, and a near-square or under-determined design (PRESS
  undefined) gets the full ``SHRINKAGE``.
- *Small budgets: the outermost strata first* (``front_load``, off by default). Below
  ``FRONT_LOADED_PAIRS * P`` pairs
  (budget 150 and less for 49 players) the pairs go to the stratum of sizes 1 and ``P - 1``
  until it is enumerated, then to sizes 2 and ``P - 2``, and the solve is the plain least
  squares (no shrinkage; minimum norm while under-determined). The sizes-1 stratum alone gives
  each cell its first and last marginal contribution, which is exact for any game of pairwise
  interactions (image models interact mostly between nearby cells); uniform sizes spend those
  budgets on single pairs from strata of enormous Horvitz-Thompson weight. The price: such a
  design never sees sizes 3 to ``P - 3``, so it is biased for games with odd interactions of
  order 3 and more (it stops improving with budget); from ``FRONT_LOADED_PAIRS * P`` pairs on,
  the uniform design above takes over (benchmarks/bench_shapley_accuracy.py). It is not the
  default: on the demo's real model games it agrees better in Pearson with a budget-4000
  reference (0.81 against 0.72 at budget 150) but errs more in L2 (1.07 against 0.89 of the
  reference's norm), and theta_X trained on its labels fell from 0.519 to 0.173 in domain
  (docs/benchmarks.md, "Outer strata first on the real model").
- *An error estimate for free.* The stratified bootstrap over the sampled pairs (enumerated
  strata held fixed, strata with a single pair pooled) re-solves with the same evaluations, giving a per-cell standard error.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

#: Largest weight of the known population Gram matrix in the shrunk solve (chosen on the
#: benchmark's 49-player games; benchmarks/bench_shapley_accuracy.py).
SHRINKAGE = 0.03
#: PRESS fraction of unexplained variance at which the shrinkage is full.
PRESS_SCALE = 0.05
#: Pairs per player below which the design fills the outer strata first (and is solved without
#: shrinkage); chosen on the benchmark's 49-player games.
FRONT_LOADED_PAIRS = 2.0
#: Bootstrap replicates of the error estimate.
BOOTSTRAP_REPLICATES = 32
#: Pairs of a stratum counted as int64 (larger strata are never enumerated).
_MOST_PAIRS = 2**62


@functools.lru_cache(maxsize=64)
def _strata(num_players: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[float, ...]]:
    """Sizes ``s <= P / 2`` of the strata, their number of pairs, and their share of the budget."""
    m = num_players
    sizes = tuple(range(1, m // 2 + 1))
    # a stratum s < P/2 holds the sizes s and P - s; the middle size P/2 pairs with itself
    pairs = tuple(math.comb(m, s) // (2 if 2 * s == m else 1) for s in sizes)
    shares = tuple(1.0 if 2 * s == m else 2.0 for s in sizes)
    return sizes, pairs, shares


@functools.lru_cache(maxsize=256)
def _water_fill(
    num_pairs: int, caps: tuple[int, ...], shares: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """The deterministic part of :func:`_allocate` (cached: every image of a build shares it).

    Returns:
        ``(whole pairs per stratum, cumulative fractional parts, pairs left to round, caps)``;
        the arrays are read-only.
    """
    caps_a = np.asarray(caps, dtype=np.float64)
    shares_a = np.asarray(shares, dtype=np.float64)
    alloc = np.zeros(len(caps))
    free = np.ones(len(caps), dtype=bool)
    left = float(min(num_pairs, caps_a.sum()))
    while left > 1e-9 and free.any():
        step = left * shares_a * free / (shares_a * free).sum()
        full = free & (alloc + step >= caps_a - 1e-9)
        if full.any():  # water-filling: a covered stratum is enumerated, its excess moves on
            left -= float((caps_a - alloc)[full].sum())
            alloc[full] = caps_a[full]
            free &= ~full
        else:
            alloc += step
            left = 0.0
    counts = np.floor(alloc + 1e-9).astype(np.int64)
    fraction = np.clip(alloc - counts, 0.0, None)
    extra = int(round(fraction.sum()))
    cumulative = np.cumsum(fraction)
    # (a stratum of more pairs than an int64 holds is never covered: no budget reaches it)
    caps_int = np.minimum(caps_a, _MOST_PAIRS).astype(np.int64)
    for array in (counts, cumulative, caps_int):
        array.flags.writeable = False
    return counts, cumulative, extra, caps_int


def _allocate(
    num_pairs: int, caps: Sequence[int], shares: Sequence[float], generator: torch.Generator
) -> np.ndarray:
    """Pairs per stratum: equal per size, capped at the stratum, randomised integer rounding."""
    whole, cumulative, extra, caps_int = _water_fill(num_pairs, tuple(caps), tuple(shares))
    counts = whole.copy()
    if extra > 0:  # systematic sampling keeps each stratum's expected count exact
        start = float(torch.rand(1, generator=generator, dtype=torch.float64))
        points = start + np.arange(extra)
        picks = np.searchsorted(cumulative, points, side="right")
        np.add.at(counts, np.minimum(picks, len(counts) - 1), 1)
    return np.minimum(counts, caps_int)


def front_loaded(num_players: int, num_samples: int) -> bool:
    """Whether ``num_samples`` coalitions of ``P`` players fill the outer strata first."""
    return max(num_samples, 0) // 2 < FRONT_LOADED_PAIRS * num_players


def default_shrinkage(num_players: int, num_samples: int, front_load: bool = False) -> float:
    """The shrinkage weight of a design: none when it is front-loaded (:func:`front_loaded`)."""
    return 0.0 if front_load and front_loaded(num_players, num_samples) else SHRINKAGE


def _allocate_front_loaded(
    num_pairs: int, caps: Sequence[int], shares: Sequence[float], generator: torch.Generator
) -> np.ndarray:
    """Pairs per stratum: the strata of sizes 1 and 2 filled in turn, any rest as :func:`_allocate`."""
    head = []
    left = num_pairs
    for cap in caps[:2]:
        take = min(int(min(cap, _MOST_PAIRS)), left)
        head.append(take)
        left -= take
    rest = _allocate(left, caps[2:], shares[2:], generator) if len(caps) > 2 else np.zeros(0)
    return np.concatenate([np.asarray(head, dtype=np.int64), rest.astype(np.int64)])


def sample_leverage_coalitions(
    num_players: int,
    num_samples: int,
    generator: torch.Generator,
    *,
    front_load: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Leverage SHAP coalitions: sizes uniform, complementary pairs, without replacement.

    Args:
        num_players: ``P`` >= 2.
        num_samples: coalitions wanted, empty and full excluded; rounded down to pairs and
            capped at ``2 ** P - 2``.
        generator: CPU generator; the coalitions depend on it only.
        front_load: below ``FRONT_LOADED_PAIRS * P`` pairs (:func:`front_loaded`), fill the
            outer strata first; ``False`` (the default) gives the uniform design at any budget.

    Returns:
        ``(masks bool [K, P], weights float64 [K], strata long [K // 2])``: rows ``2j`` and
        ``2j + 1`` are complements; ``weights`` are the Shapley-kernel weights (normalised to a
        total mass of 1 over all coalitions) divided by the inclusion probabilities; ``strata``
        is the stratum (smaller size) of each pair, or -1 where its stratum was enumerated.
    """
    masks, weights, strata, _ = sample_leverage_coalitions_batch(
        num_players, num_samples, [generator], front_load=front_load
    )
    return masks, weights, strata


def sample_leverage_coalitions_batch(
    num_players: int,
    num_samples: int,
    generators: Sequence[torch.Generator],
    *,
    front_load: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`sample_leverage_coalitions` for many images at once, one generator each.

    Image ``i`` gets exactly the coalitions that ``sample_leverage_coalitions(num_players,
    num_samples, generators[i])`` gives: each generator is drawn from in the same order as
    there, and only the work between the draws (sorting, placing members, checking repeats,
    weights) is done for all images together, which makes it several times faster per image.

    Args:
        num_players: ``P`` >= 2.
        num_samples: coalitions wanted per image, empty and full excluded.
        generators: one CPU generator per image.
        front_load: see :func:`sample_leverage_coalitions`.

    Returns:
        ``(masks bool [K, P], weights float64 [K], strata long [K // 2], counts long [N])``: the
        images' coalitions one after the other (image ``i`` has ``counts[i]`` rows, in the
        layout of :func:`sample_leverage_coalitions`).
    """
    m = num_players
    if m < 2:
        raise ValueError("Kernel SHAP needs at least 2 players")
    n = len(generators)
    sizes, caps, shares = _strata(m)
    num_pairs = max(num_samples, 0) // 2
    allocate = _allocate_front_loaded if front_load and front_loaded(m, num_samples) else _allocate
    counts = np.stack([allocate(num_pairs, caps, shares, g) for g in generators]).reshape(
        n, len(sizes)
    )
    enumerated = counts >= np.asarray([min(cap, _MOST_PAIRS) for cap in caps], dtype=np.int64)
    drawn_counts = np.where(enumerated, 0, counts)
    size_of = np.asarray(sizes, dtype=np.int64)
    drawn = _draw_subsets_batch(size_of, drawn_counts, m, generators)

    total_mass = 2.0 * (m - 1) / m * sum(1.0 / s for s in range(1, m))
    # mass of one size over the rows of that size drawn (the middle size: both of a pair)
    mass = np.asarray([(m - 1) / (s * (m - s)) / total_mass for s in sizes], dtype=np.float64)
    middle = 2 * size_of == m
    safe = np.maximum(counts, 1)
    pair_weight = np.where(middle, mass / (2 * safe), mass / safe)
    if enumerated.any():  # an enumerated stratum goes between the drawn ones: image by image
        blocks: list[np.ndarray] = []
        offset = 0
        for i in range(n):
            for j, size in enumerate(sizes):
                count = int(counts[i, j])
                if count == 0:
                    continue
                if enumerated[i, j]:
                    combos = itertools_combinations(m, size, first_fixed=bool(middle[j]))
                    block = np.zeros((len(combos), m), dtype=bool)
                    np.put_along_axis(block, combos, True, axis=1)
                else:
                    block = drawn[offset : offset + count]
                    offset += count
                blocks.append(block)
        pairs = np.concatenate(blocks) if blocks else np.zeros((0, m), dtype=bool)
    else:  # the drawn subsets are already in (image, stratum) order
        pairs = drawn
    masks = np.empty((2 * len(pairs), m), dtype=bool)
    masks[0::2] = pairs
    np.logical_not(pairs, out=masks[1::2])
    flat_counts = counts.reshape(-1)
    weights = np.repeat(pair_weight.reshape(-1), 2 * flat_counts)
    labels = np.where(enumerated, -1, size_of[None, :]).reshape(-1)
    strata = np.repeat(labels, flat_counts)
    return (
        torch.from_numpy(masks),
        torch.from_numpy(weights),
        torch.from_numpy(strata),
        torch.from_numpy(2 * counts.sum(axis=1)),
    )


def _canonical_pairs(subsets: np.ndarray) -> np.ndarray:
    """Each subset as its pair's canonical member: the smaller side, or the side holding player
    0 for the middle size (the form :func:`sample_leverage_coalitions` draws pairs in)."""
    m = subsets.shape[1]
    size = subsets.sum(axis=1)
    flip = (2 * size > m) | ((2 * size == m) & ~subsets[:, 0])
    return np.where(flip[:, None], ~subsets, subsets)


def extend_leverage_coalitions(
    masks: np.ndarray, num_samples: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, int]:
    """A larger Leverage SHAP design that keeps every pair of an existing one.

    The existing pairs stay (rows ``2j``, ``2j + 1``, in their order, first); each stratum then
    gets new distinct pairs, drawn uniformly among those it does not hold yet, up to the
    larger of what it holds and the allocation of ``num_samples`` (the same randomised equal
    split over sizes as :func:`sample_leverage_coalitions`), and a stratum the new count covers
    is enumerated. Within a stratum the pairs are then a uniform sample without replacement of
    their number, so the Horvitz-Thompson weights ``mass(s) / k_s`` are unbiased, as in a fresh
    design; but the pairs (and, by at most one pair per stratum, the counts) are not the ones
    a fresh design of ``num_samples`` draws from the same seed, so the labels are not a fresh
    labelling's bit for bit, except where every stratum is enumerated (both are then the exact
    Shapley values). The outer-strata-first design (``front_load``) is not extended.

    Args:
        masks: bool ``[L, P]`` the existing design, complementary pairs in rows ``2j, 2j + 1``.
        num_samples: coalitions wanted in all, empty and full excluded (at least ``L``).
        generator: CPU generator of the new pairs.

    Returns:
        ``(masks [K, P], weights [K], strata [K // 2], new)``: the existing ``L`` rows first,
        then the ``new = K - L`` rows to evaluate; weights and strata as
        :func:`sample_leverage_coalitions` gives them, for every row.

    Raises:
        ValueError: ``masks`` is not a design of complementary pairs, or ``num_samples`` is
            smaller than it.
    """
    masks = np.asarray(masks, dtype=bool)
    m = masks.shape[1]
    if len(masks) % 2 or not np.array_equal(masks[1::2], ~masks[0::2]):
        raise ValueError("an extended design must hold complementary pairs in rows 2j, 2j + 1")
    if num_samples < len(masks):
        raise ValueError(f"{num_samples} coalitions cannot extend a design of {len(masks)}")
    sizes, caps, shares = _strata(m)
    size_of = np.asarray(sizes, dtype=np.int64)
    old = _canonical_pairs(masks[0::2])
    old_counts = np.bincount(old.sum(axis=1) - 1, minlength=len(sizes))[: len(sizes)]
    target = _allocate(num_samples // 2, caps, shares, generator)
    caps_int = np.asarray([min(cap, _MOST_PAIRS) for cap in caps], dtype=np.int64)
    counts = np.minimum(np.maximum(target, old_counts), caps_int)
    seen = {row.tobytes() for row in np.packbits(old, axis=1)}
    blocks = []
    for j, size in enumerate(sizes):
        want = int(counts[j] - old_counts[j])
        if want <= 0:
            continue
        if counts[j] == caps_int[j]:  # covered: every pair of the stratum not held yet
            combos = itertools_combinations(m, size, first_fixed=2 * size == m)
            block = np.zeros((len(combos), m), dtype=bool)
            np.put_along_axis(block, combos, True, axis=1)
            keys = [key.tobytes() for key in np.packbits(block, axis=1)]
            block = block[np.asarray([key not in seen for key in keys], dtype=bool)]
            seen.update(keys)
        else:  # drawn until distinct from every pair held (_keep_new records each in seen)
            block = np.zeros((want, m), dtype=bool)
            todo = np.arange(want)
            while len(todo):
                draws = torch.rand(len(todo), m, generator=generator)
                subsets = _place_members(draws, np.full(len(todo), size), m)
                todo = _keep_new(block, todo, subsets, seen)
        blocks.append(block)
    new_pairs = np.concatenate(blocks) if blocks else np.zeros((0, m), dtype=bool)
    pairs = np.concatenate([old, new_pairs])
    pair_size = pairs.sum(axis=1)
    stratum = pair_size - 1
    total_mass = 2.0 * (m - 1) / m * sum(1.0 / s for s in range(1, m))
    mass = (m - 1) / (size_of * (m - size_of)) / total_mass
    per_pair = np.where(2 * size_of == m, mass / (2 * counts.clip(1)), mass / counts.clip(1))
    out = np.empty((2 * len(pairs), m), dtype=bool)
    out[0::2] = pairs
    np.logical_not(pairs, out=out[1::2])
    out[: len(masks)] = masks  # the existing rows exactly as they were
    weights = np.repeat(per_pair[stratum], 2)
    strata = np.where(counts[stratum] == caps_int[stratum], -1, pair_size)
    return (
        torch.from_numpy(out),
        torch.from_numpy(weights),
        torch.from_numpy(strata.astype(np.int64)),
        2 * len(new_pairs),
    )


def itertools_combinations(m: int, size: int, *, first_fixed: bool = False) -> np.ndarray:
    """``[C, size]`` all ``size``-subsets of ``range(m)`` (those holding 0 when ``first_fixed``:
    one per complementary pair of the middle size)."""
    import itertools

    combos = itertools.combinations(range(m), size)
    if first_fixed:
        combos = (c for c in combos if c[0] == 0)
    return np.array(list(combos), dtype=np.int64).reshape(-1, size)


def _place_members(draws: Tensor, sizes: np.ndarray, m: int) -> np.ndarray:
    """Subsets from uniform draws ``[R, m]``: the ``size`` players of each row drawn lowest.

    This is the first ``size`` players of ``draws.argsort(dim=1)``, computed from a sort of the
    values (a threshold per row, many times faster than torch's argsort on the CPU); a row
    whose threshold value is tied between a member and a non-member (rare) takes torch's
    argsort, so the subsets are always those of the argsort. A subset of the middle size
    ``m / 2`` is given as the member of its pair holding player 0.
    """
    values = draws.numpy()
    index = np.clip(sizes - 1, 0, m - 1)[:, None]
    threshold = np.take_along_axis(np.sort(values, axis=1), index, axis=1)
    masks = (values <= threshold) & (sizes[:, None] > 0)
    tied = np.flatnonzero(masks.sum(axis=1) != sizes)
    if len(tied):
        order = draws[torch.from_numpy(tied)].argsort(dim=1).numpy()
        exact = np.zeros((len(tied), m), dtype=bool)
        np.put_along_axis(exact, order, np.arange(m)[None, :] < sizes[tied, None], axis=1)
        masks[tied] = exact
    middle = 2 * sizes == m
    masks[middle] = np.where(masks[middle, :1], masks[middle], ~masks[middle])
    return masks


def _keep_new(out: np.ndarray, todo: np.ndarray, masks: np.ndarray, seen: set[bytes]) -> np.ndarray:
    """Store each subset of ``masks`` not seen before in its row of ``out``; the others' rows."""
    again = []
    for row, mask, key in zip(todo, masks, np.packbits(masks, axis=1), strict=True):
        key = key.tobytes()
        if key in seen:
            again.append(row)
            continue
        seen.add(key)
        out[row] = mask
    return np.asarray(again, dtype=np.int64)


def _draw_subsets(
    sizes: np.ndarray,
    m: int,
    generator: torch.Generator,
    first: np.ndarray | None = None,
) -> np.ndarray:
    """``[len(sizes), m]`` bool: uniform subsets of the given sizes, distinct within a size.

    A subset of the middle size ``m / 2`` is distinct from the other subsets and their
    complements, and is given as the member of its pair that holds player 0.

    Args:
        first: the subsets of the first draw, when they were drawn already (the batch does).
    """
    out = np.zeros((len(sizes), m), dtype=bool)
    todo = np.arange(len(sizes))
    seen: set[bytes] = set()
    while len(todo):
        if first is not None:
            masks, first = first, None
        else:
            # one vectorised draw for every subset still missing; repeats (rare) are drawn again
            draws = torch.rand(len(todo), m, generator=generator)
            masks = _place_members(draws, sizes[todo], m)
        todo = _keep_new(out, todo, masks, seen)
    return out


def _draw_subsets_batch(
    size_of: np.ndarray, counts: np.ndarray, m: int, generators: Sequence[torch.Generator]
) -> np.ndarray:
    """:func:`_draw_subsets` of many images: ``counts[i, j]`` subsets of size ``size_of[j]``.

    The first draw of every image is turned into subsets together (row by row, so the rows
    are those of separate draws); an image whose first draw repeats a subset (rare) then goes
    on alone, from its own generator, exactly as it would have.

    Returns:
        ``[counts.sum(), m]`` bool, image after image.
    """
    rows = counts.sum(axis=1)
    if rows.sum() == 0:
        return np.zeros((0, m), dtype=bool)
    draws = [torch.rand(int(r), m, generator=g) for g, r in zip(generators, rows, strict=True) if r]
    sizes = np.repeat(np.tile(size_of, len(counts)), counts.reshape(-1))
    masks = _place_members(torch.cat(draws), sizes, m)
    # a repeat is the same subset twice in one image: look for equal (image, subset) keys
    image = np.repeat(np.arange(len(counts)), rows)
    keys = np.concatenate(
        [image.astype(">u4").view(np.uint8).reshape(-1, 4), np.packbits(masks, axis=1)], axis=1
    )
    keys = np.ascontiguousarray(keys).view(np.dtype((np.void, keys.shape[1]))).reshape(-1)
    index = np.argsort(keys)
    repeated = index[1:][keys[index[1:]] == keys[index[:-1]]]
    if len(repeated):
        starts = np.concatenate([[0], np.cumsum(rows)])
        for i in np.unique(image[repeated]):
            own = slice(starts[i], starts[i + 1])
            masks[own] = _draw_subsets(sizes[own], m, generators[i], first=masks[own].copy())
    return masks


def _pair_rows(masks: Tensor, weights: Tensor, values: Tensor, v_empty: Tensor, delta: Tensor):
    """Pair-level regression rows: ``a [N, J, P]``, weights ``w [N, J]``, targets ``d [N, J, k]``."""
    players = masks.shape[-1]
    z = masks.to(torch.float64)
    size = z.sum(dim=-1, keepdim=True)
    a = z - size / players
    b = values.to(torch.float64) - v_empty.unsqueeze(1) - size / players * delta.unsqueeze(1)
    n, rows = z.shape[:2]
    a = a.view(n, rows // 2, 2, players)[:, :, 0]
    b = b.view(n, rows // 2, 2, -1)
    w = weights.to(torch.float64).view(n, rows // 2, 2).sum(dim=-1)
    # the complement's row is -a, so a pair is one row whose target is half the difference
    return a, w, (b[:, :, 0] - b[:, :, 1]) / 2


def _shrinkage_weights(
    a: Tensor, w: Tensor, d: Tensor, eigenvalues: Tensor, vectors: Tensor, scale: float
) -> Tensor:
    """``[N, k]`` shrinkage weights ``scale * min(1, PRESS / TSS / PRESS_SCALE)`` per class."""
    tiny = torch.finfo(torch.float64).eps
    keep = eigenvalues > 1e-9 * eigenvalues[:, -1:].clamp_min(tiny)
    inverse = torch.where(keep, 1.0 / eigenvalues.clamp_min(tiny), torch.zeros_like(eigenvalues))
    proj = a @ vectors  # [N, J, P]
    leverage = w * (proj.square() * inverse.unsqueeze(1)).sum(dim=-1)  # [N, J]
    rhs = vectors.transpose(1, 2) @ ((w.unsqueeze(-1) * a).transpose(1, 2) @ d)
    fit = proj @ (inverse.unsqueeze(-1) * rhs)
    residual = d - fit
    # A pair that only its own fit explains (leverage 1) has no leave-one-out residual; it is
    # left out. With none left (a square or under-determined design) the shrinkage is full.
    valid = (leverage < 1 - 1e-6) & (w > 0)
    loo = residual / (1 - leverage.clamp_max(1 - 1e-6)).unsqueeze(-1)
    vw = (w * valid).unsqueeze(-1)
    press = (vw * loo.square()).sum(dim=1)
    total = (vw * d.square()).sum(dim=1)
    fraction = (press / total.clamp_min(tiny) / PRESS_SCALE).clamp(0.0, 1.0)
    fraction = torch.where(total > tiny, fraction, torch.zeros_like(fraction))
    fraction = torch.where(valid.any(dim=1, keepdim=True), fraction, torch.ones_like(fraction))
    return scale * fraction


def _shrunk_solve(gram: Tensor, rhs: Tensor, alpha: Tensor, population: float) -> Tensor:
    """``u [.., P, k]`` from ``((1 - a) G_hat + a * population * P_proj + J) u = r`` per class."""
    players = gram.shape[-1]
    eye = torch.eye(players, dtype=torch.float64)
    ones = torch.full((players, players), 1.0 / players, dtype=torch.float64)
    proj = eye - ones
    a = alpha.unsqueeze(-1).unsqueeze(-1)  # [.., k, 1, 1]
    system = (1 - a) * gram.unsqueeze(-3) + a * population * proj + ones
    target = rhs.transpose(-1, -2).unsqueeze(-1)
    # Unshrunk (a = 0, the front-loaded design), a replicate may not span the players: the
    # minimum-norm solution then, as in the main solve.
    solution = torch.linalg.pinv(system, rtol=1e-9, hermitian=True) @ target
    return solution[..., 0].transpose(-1, -2)


def solve_leverage_shap(
    masks: Tensor,
    weights: Tensor,
    values: Tensor,
    v_empty: Tensor,
    v_full: Tensor,
    *,
    strata: Tensor | None = None,
    bootstrap: int = 0,
    generators: list[torch.Generator] | None = None,
    shrinkage: float | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Shapley values from paired, reweighted coalitions by the shrunk projected regression.

    Args:
        masks: ``[N, K, P]`` coalitions, rows ``2j`` and ``2j + 1`` complementary (padding pairs
            have weight 0).
        weights: ``[N, K]`` inclusion-reweighted kernel weights (total population mass 1).
        values: ``[N, K, k]`` coalition values.
        v_empty: ``[N, k]`` value of the empty coalition.
        v_full: ``[N, k]`` value of the full coalition.
        strata: ``[N, K // 2]`` stratum of each pair (-1: enumerated or padding), needed for
            the bootstrap.
        bootstrap: replicates of the stratified pair bootstrap (0: no error estimate).
        generators: one CPU generator per image for the bootstrap.
        shrinkage: largest weight of the population Gram matrix; by default that of the
            design of ``K`` coalitions (:func:`default_shrinkage`).

    Returns:
        ``(phi [N, P, k], phi_err [N, P, k] or None, alpha [N, k])`` in float64: the
        attributions (efficiency holds exactly), their bootstrap standard errors, and the
        shrinkage weight each class got.
    """
    players = masks.shape[-1]
    if shrinkage is None:
        shrinkage = default_shrinkage(players, masks.shape[1])
    v_empty = v_empty.to(torch.float64)
    delta = v_full.to(torch.float64) - v_empty
    base = (delta / players).unsqueeze(1).expand(-1, players, -1)
    if masks.shape[1] == 0:
        return base.clone(), (torch.zeros_like(base) if bootstrap else None), delta * 0
    a, w, d = _pair_rows(masks, weights, values, v_empty, delta)
    wa = w.unsqueeze(-1) * a
    gram = wa.transpose(1, 2) @ a
    rhs = wa.transpose(1, 2) @ d
    population = 1.0 / (2.0 * sum(1.0 / s for s in range(1, players)))
    eigenvalues, vectors = torch.linalg.eigh(gram)
    alpha = _shrinkage_weights(a, w, d, eigenvalues, vectors, shrinkage)
    # G_hat, P_proj and J share eigenvectors on the span of G_hat, where r lies; on G_hat's null
    # space (1 and, under-determined, more) the solution is 0, so one eigh serves every class.
    tiny = torch.finfo(torch.float64).eps
    live = (eigenvalues > 1e-9 * eigenvalues[:, -1:].clamp_min(tiny)).unsqueeze(-1)
    shrunk = (1 - alpha.unsqueeze(1)) * eigenvalues.unsqueeze(-1) + alpha.unsqueeze(1) * population
    factor = torch.where(live, 1.0 / shrunk.clamp_min(tiny), torch.zeros_like(shrunk))
    phi = base + vectors @ (factor * (vectors.transpose(1, 2) @ rhs))
    if not bootstrap:
        return phi, None, alpha
    if strata is None or generators is None:
        raise ValueError("the bootstrap needs the pairs' strata and one generator per image")
    counts = torch.ones(len(masks), bootstrap, a.shape[1], dtype=torch.float64)
    for i, generator in enumerate(generators):
        image_strata = strata[i]
        sampled = image_strata[image_strata >= 0]
        groups, sizes = torch.unique(sampled, return_counts=True)
        # a stratum with a single pair has no spread of its own: those are pooled together
        singles = groups[sizes == 1]
        members_of = [torch.nonzero(image_strata == g).flatten() for g in groups[sizes > 1]]
        if len(singles):
            members_of.append(torch.nonzero(torch.isin(image_strata, singles)).flatten())
        for members in members_of:
            draws = torch.randint(len(members), (bootstrap, len(members)), generator=generator)
            resampled = torch.zeros(bootstrap, len(members), dtype=torch.float64)
            resampled.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))
            counts[i][:, members] = resampled
    cw = counts * w.unsqueeze(1)  # [N, B, J]
    gram_b = torch.einsum("nbj,njp,njq->nbpq", cw, a, a)
    rhs_b = torch.einsum("nbj,njp,njk->nbpk", cw, a, d)
    phi_b = base.unsqueeze(1) + _shrunk_solve(
        gram_b, rhs_b, alpha.unsqueeze(1).expand(-1, bootstrap, -1), population
    )
    return phi, phi_b.std(dim=1), alpha

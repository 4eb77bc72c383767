"""The game a Kernel SHAP label was solved from, kept beside the label (``game.npz``).

A label is a regression over the coalitions the labeller evaluated. Keeping those coalitions
and their values (a few KB per image, against the budget's model evaluations) lets an
X-dataset be solved again with another estimator setting without running the model
(:func:`tasks.algorithms.kernel_shap.solve_games`), and lets a training objective use the
game itself instead of its solution (the FastSHAP / ViT-Shapley objective).

``game.npz`` is a plain NumPy archive (``np.load`` reads it, and so does webdataset's default
``.decode()``) of:

- ``masks``: uint8 ``[L, ceil(P / 8)]``, the ``L`` sampled coalitions (the empty and the full
  one excluded) in the order drawn, one bit per player (``np.packbits`` along players, cell
  ``r * gw + c``);
- ``weights``: float64 ``[L]``, each coalition's weight in the regression;
- ``strata``: int16 ``[L // 2]``, the stratum of each complementary pair (-1: enumerated), for
  the leverage sampler only;
- ``values``: ``[L, k]`` each coalition's value for each explained class, float32 when that
  holds them exactly (the model's float32 outputs), else float64;
- ``v_empty``, ``v_full``: float64 ``[k]``;
- ``classes``: int64 ``[k]``, the explained classes in the labeller's order (the label, then
  the top predicted; ``shap.npy`` keeps them without repeats);
- ``players``, ``grid`` (``[gh, gw]``), ``budget``, ``seed``: int64; ``sampler``: a string;
  ``front_load``: bool (the leverage design's setting).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

#: The archive's fields; a file without one of them is not a game.
FIELDS = (
    "masks",
    "weights",
    "values",
    "v_empty",
    "v_full",
    "classes",
    "players",
    "grid",
    "budget",
    "seed",
    "sampler",
    "front_load",
)


@dataclass(frozen=True)
class CoalitionGame:
    """The evaluated coalitions of one image, enough to solve its attributions again.

    Attributes:
        masks: bool ``[L, P]`` sampled coalitions (empty and full excluded), in order.
        weights: float64 ``[L]`` their regression weights.
        strata: int64 ``[L // 2]`` stratum of each complementary pair (leverage), or None.
        values: float64 ``[L, k]`` their values per explained class.
        v_empty: float64 ``[k]`` value of the empty coalition.
        v_full: float64 ``[k]`` value of the full coalition.
        classes: the explained classes, in order.
        grid: ``(gh, gw)``; ``P = gh * gw``.
        budget: the labelling budget (empty and full included).
        seed: the image's sampling seed (the bootstrap's stream derives from it).
        sampler: ``"leverage"`` or ``"kernel"``.
        front_load: whether the leverage design filled the outer strata first.
    """

    masks: np.ndarray
    weights: np.ndarray
    strata: np.ndarray | None
    values: np.ndarray
    v_empty: np.ndarray
    v_full: np.ndarray
    classes: tuple[int, ...]
    grid: tuple[int, int]
    budget: int
    seed: int
    sampler: str
    front_load: bool = False

    @property
    def players(self) -> int:
        return self.grid[0] * self.grid[1]

    def to_npz(self) -> bytes:
        """The game as ``game.npz`` bytes (see the module docstring)."""
        values = self.values.astype(np.float64)
        narrow = values.astype(np.float32)
        arrays: dict[str, np.ndarray] = {
            "masks": np.packbits(self.masks.astype(bool), axis=1),
            "weights": self.weights.astype(np.float64),
            "values": narrow if np.array_equal(narrow.astype(np.float64), values) else values,
            "v_empty": self.v_empty.astype(np.float64),
            "v_full": self.v_full.astype(np.float64),
            "classes": np.asarray(self.classes, dtype=np.int64),
            "players": np.int64(self.players),
            "grid": np.asarray(self.grid, dtype=np.int64),
            "budget": np.int64(self.budget),
            "seed": np.int64(self.seed),
            "sampler": np.str_(self.sampler),
            "front_load": np.bool_(self.front_load),
        }
        if self.strata is not None:
            arrays["strata"] = self.strata.astype(np.int16)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_npz(cls, data: bytes | np.lib.npyio.NpzFile | dict) -> CoalitionGame:
        """A game from ``game.npz`` bytes, or from the mapping ``np.load`` (or webdataset) gave.

        Raises:
            ValueError: a field is missing or the shapes do not agree.
        """
        arrays = np.load(io.BytesIO(data), allow_pickle=False) if isinstance(data, bytes) else data
        missing = [name for name in FIELDS if name not in arrays]
        if missing:
            raise ValueError(f"game.npz lacks {', '.join(missing)}")
        players = int(arrays["players"])
        grid = tuple(int(g) for g in arrays["grid"])
        masks = np.unpackbits(arrays["masks"], axis=1, count=players).astype(bool)
        values = np.asarray(arrays["values"], dtype=np.float64)
        weights = np.asarray(arrays["weights"], dtype=np.float64)
        strata = arrays["strata"].astype(np.int64) if "strata" in arrays else None
        if grid[0] * grid[1] != players or len(masks) != len(weights) or len(values) != len(masks):
            raise ValueError(
                f"game.npz is inconsistent: grid {grid}, {players} players, "
                f"{len(masks)} coalitions, {len(weights)} weights, {len(values)} values"
            )
        if strata is not None and len(strata) != len(masks) // 2:
            raise ValueError(f"game.npz has {len(strata)} strata for {len(masks)} coalitions")
        return cls(
            masks=masks,
            weights=weights,
            strata=strata,
            values=values.reshape(len(masks), -1),
            v_empty=np.asarray(arrays["v_empty"], dtype=np.float64),
            v_full=np.asarray(arrays["v_full"], dtype=np.float64),
            classes=tuple(int(c) for c in arrays["classes"]),
            grid=(grid[0], grid[1]),
            budget=int(arrays["budget"]),
            seed=int(arrays["seed"]),
            sampler=str(arrays["sampler"]),
            front_load=bool(arrays["front_load"]),
        )

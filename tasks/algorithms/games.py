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
import struct
import zlib
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


_NPY_MAGIC = b"\x93NUMPY\x01\x00"
#: Members of at most this many bytes are stored, larger ones deflated.
_STORED_BELOW = 256
#: The zip records' date (1980-01-01, time 0: what ``np.savez`` writes), so the bytes of a game
#: do not depend on when it was written.
_DOS_DATE, _DOS_TIME = 0x21, 0


def _npy_bytes(array: np.ndarray) -> bytes:
    """``array`` in the ``.npy`` format, version 1.0: the bytes ``np.save`` writes."""
    array = np.ascontiguousarray(array) if array.ndim else np.asarray(array)
    descr = np.lib.format.dtype_to_descr(array.dtype)
    header = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {array.shape!r}, }}"
    pad = 64 - (len(_NPY_MAGIC) + 2 + len(header) + 1) % 64
    encoded = (header + " " * pad + "\n").encode("latin1")
    return _NPY_MAGIC + struct.pack("<H", len(encoded)) + encoded + array.tobytes()


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A ``.npz`` archive of ``arrays``, written directly (``np.load`` and ``zipfile`` read it).

    What ``np.savez_compressed`` makes, three times faster on a game's dozen small arrays (its
    per-member cost dominates there: ~1 ms per image at budget 150, a fifth of the labeller's
    host time; docs/benchmarks.md): members of at most ``_STORED_BELOW`` bytes are stored, the
    others deflated. The bytes depend on the arrays only.
    """
    out, central = bytearray(), bytearray()
    for name, array in arrays.items():
        data = _npy_bytes(np.asarray(array))
        crc = zlib.crc32(data)
        packed, method = data, 0
        if len(data) > _STORED_BELOW:
            compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
            deflated = compressor.compress(data) + compressor.flush()
            if len(deflated) < len(data):
                packed, method = deflated, 8
        filename = f"{name}.npy".encode()
        sizes = (crc, len(packed), len(data), len(filename))
        offset = len(out)
        out += struct.pack("<IHHHHH", 0x04034B50, 20, 0, method, _DOS_TIME, _DOS_DATE)
        out += struct.pack("<IIIHH", *sizes, 0) + filename + packed
        central += struct.pack("<IHHHHHH", 0x02014B50, 20, 20, 0, method, _DOS_TIME, _DOS_DATE)
        central += struct.pack("<IIIHHHHHII", *sizes, 0, 0, 0, 0, 0, offset) + filename
    start = len(out)
    out += central
    out += struct.pack(
        "<IHHHHIIH", 0x06054B50, 0, 0, len(arrays), len(arrays), len(central), start, 0
    )
    return bytes(out)


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
        return npz_bytes(arrays)

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

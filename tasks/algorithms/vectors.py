"""The explainability vector tau_X = theta_X - theta_P and its arithmetic.

A vector holds one delta per floating-point parameter of the image encoder (the keys of an
open_clip state dict that start with ``"visual."`` by default). It is a small immutable value:
``+``, unary ``-``, scaling by a finite number, ``sum([...])``, and :meth:`apply_to` a target
state dict. Key, shape or pretrained-base mismatches raise instead of warning.

Exactness. Deltas are kept in float64 for parameters of float32 or narrower dtypes, and a vector
is applied as ``(p.double() + coef * d).to(p.dtype)``. The difference of two float32 numbers is
exact in float64 whenever the larger magnitude is at most 2**28 times the smaller (or either is
zero), which holds for every pair of weights met in practice; then ``theta_P + 1.0 * tau`` gives
back ``theta_X`` bit for bit. Even beyond that bound the float64 rounding error is far below
half a float32 ulp of ``theta_X`` unless ``|theta_P| > 2**29 * |theta_X|``. A float32 delta
would not do: ``p + (x - p)`` rounded twice in float32 differs from ``x`` for a large fraction
of weights when ``x`` and ``p`` are not close. ``coef == 0`` returns the target's tensors
unchanged (copied, so even signed zeros and NaNs are kept). Float64 parameters keep float64
deltas, for which the identity holds only where ``x - p`` is exact (Sterbenz: ``p/2 <= x <= 2p``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from numbers import Real
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from storage import Storage

logger = logging.getLogger(__name__)

DEFAULT_PREFIX = "visual."
SIDECAR_FORMAT = "explainability-vector/1"
_LIST_LIMIT = 8


def _delta_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a delta of ``dtype`` parameters is kept in: wide enough to be exact."""
    return torch.float64 if torch.finfo(dtype).bits <= 32 else dtype


def _names(keys: Iterable[str]) -> str:
    """A short, readable list of keys for error messages."""
    keys = sorted(keys)
    shown = ", ".join(keys[:_LIST_LIMIT])
    more = len(keys) - _LIST_LIMIT
    return shown + (f" (and {more} more)" if more > 0 else "")


def _check_coef(coef: Any) -> float:
    if isinstance(coef, bool) or not isinstance(coef, Real):
        raise TypeError(f"coefficient must be a real number, got {type(coef).__name__}")
    value = float(coef)
    if not math.isfinite(value):
        raise ValueError(f"coefficient must be finite, got {value}")
    return value


def _select(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k: v for k, v in state_dict.items() if k.startswith(prefix)}


@dataclass(frozen=True)
class VectorSource:
    """One (theta_X, theta_P) fine-tuning pair that a vector is derived from.

    Attributes:
        domain: name of the source domain (e.g. ``"imagenet-x"``).
        theta_x_fingerprint: fingerprint of the explanation-supervised model theta_X.
        theta_p_fingerprint: fingerprint of the prediction-only model theta_P.
        coef: weight of ``theta_X - theta_P`` in the vector (1.0 for a plain vector).
    """

    domain: str
    theta_x_fingerprint: str
    theta_p_fingerprint: str
    coef: float = 1.0

    def identity(self) -> tuple[str, str, str]:
        """The source without its weight: two terms with the same identity are merged."""
        return (self.domain, self.theta_x_fingerprint, self.theta_p_fingerprint)


@dataclass(frozen=True)
class VectorMeta:
    """Where a vector comes from.

    A vector made by :meth:`ExplainabilityVector.from_models` has one source; sums and scalings
    record every source with its coefficient, so ``0.5 * (tau_a + tau_b)`` is traceable.

    Attributes:
        base_fingerprint: fingerprint of the pretrained model both fine-tunings started from.
        sources: the fine-tuning pairs, with their coefficients.
        architecture: open_clip model name, when known.
        prefix: the state-dict key prefix the vector was built over.
    """

    base_fingerprint: str
    sources: tuple[VectorSource, ...]
    architecture: str | None = None
    prefix: str = DEFAULT_PREFIX

    @classmethod
    def single(
        cls,
        *,
        source_domain: str,
        theta_x_fingerprint: str,
        theta_p_fingerprint: str,
        base_fingerprint: str,
        architecture: str | None = None,
        prefix: str = DEFAULT_PREFIX,
    ) -> VectorMeta:
        """The meta of a plain vector theta_X - theta_P."""
        source = VectorSource(source_domain, theta_x_fingerprint, theta_p_fingerprint)
        return cls(base_fingerprint, (source,), architecture, prefix)

    @property
    def source_domain(self) -> str:
        """The source domain names, joined by ``"+"`` for a combination."""
        return "+".join(dict.fromkeys(s.domain for s in self.sources))

    @property
    def theta_x_fingerprint(self) -> str:
        """theta_X's fingerprint (``"+"``-joined for a combination)."""
        return "+".join(dict.fromkeys(s.theta_x_fingerprint for s in self.sources))

    @property
    def theta_p_fingerprint(self) -> str:
        """theta_P's fingerprint (``"+"``-joined for a combination)."""
        return "+".join(dict.fromkeys(s.theta_p_fingerprint for s in self.sources))

    def scaled(self, coef: float) -> VectorMeta:
        """The meta of this vector multiplied by ``coef``."""
        return replace(self, sources=tuple(replace(s, coef=s.coef * coef) for s in self.sources))

    def combined(self, other: VectorMeta) -> VectorMeta:
        """The meta of the sum of two vectors; sources with the same identity are merged."""
        merged: dict[tuple[str, str, str], float] = {}
        for source in (*self.sources, *other.sources):
            merged[source.identity()] = merged.get(source.identity(), 0.0) + source.coef
        sources = tuple(VectorSource(*ident, coef=coef) for ident, coef in merged.items())
        architecture = self.architecture if self.architecture == other.architecture else None
        return replace(self, sources=sources, architecture=architecture)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (part of the sidecar)."""
        return {
            "source_domain": self.source_domain,
            "base_fingerprint": self.base_fingerprint,
            "theta_x_fingerprint": self.theta_x_fingerprint,
            "theta_p_fingerprint": self.theta_p_fingerprint,
            "architecture": self.architecture,
            "prefix": self.prefix,
            "sources": [
                {
                    "domain": s.domain,
                    "theta_x_fingerprint": s.theta_x_fingerprint,
                    "theta_p_fingerprint": s.theta_p_fingerprint,
                    "coef": s.coef,
                }
                for s in self.sources
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VectorMeta:
        """The inverse of :meth:`to_dict`."""
        sources = tuple(
            VectorSource(
                s["domain"], s["theta_x_fingerprint"], s["theta_p_fingerprint"], float(s["coef"])
            )
            for s in data["sources"]
        )
        return cls(
            base_fingerprint=data["base_fingerprint"],
            sources=sources,
            architecture=data.get("architecture"),
            prefix=data.get("prefix", DEFAULT_PREFIX),
        )


@dataclass(frozen=True, eq=False)
class ExplainabilityVector:
    """A task vector over the image encoder: one delta tensor per float parameter.

    Build it with :meth:`from_models` or :meth:`load`; combine vectors with ``+``, ``-``, ``*``
    and ``sum``; apply it with :meth:`apply_to`. Operations return new vectors and never modify
    their operands. The delta tensors are shared between a vector and its copies, so they must
    not be modified in place.

    Args:
        deltas: parameter name -> delta tensor (floating point).
        meta: provenance of the vector.
    """

    deltas: Mapping[str, Tensor]
    meta: VectorMeta

    def __post_init__(self) -> None:
        bad = [k for k, v in self.deltas.items() if not v.is_floating_point()]
        if bad:
            raise ValueError(f"deltas must be floating-point tensors; not so for: {_names(bad)}")
        object.__setattr__(self, "deltas", MappingProxyType(dict(self.deltas)))

    @classmethod
    def from_models(
        cls,
        theta_x: Mapping[str, Tensor],
        theta_p: Mapping[str, Tensor],
        *,
        base_fingerprint: str,
        source_domain: str,
        prefix: str = DEFAULT_PREFIX,
        theta_x_fingerprint: str | None = None,
        theta_p_fingerprint: str | None = None,
        architecture: str | None = None,
    ) -> ExplainabilityVector:
        """tau_X = theta_X - theta_P over the float parameters whose key starts with ``prefix``.

        Args:
            theta_x: state dict of the explanation-supervised model.
            theta_p: state dict of the prediction-only model (same architecture).
            base_fingerprint: fingerprint of the pretrained model both started from.
            source_domain: the domain both were fine-tuned on.
            prefix: key prefix of the parameters the vector covers.
            theta_x_fingerprint: fingerprint of theta_X; computed with
                :func:`storage.checkpoints.state_fingerprint` when omitted.
            theta_p_fingerprint: fingerprint of theta_P; computed likewise when omitted.
            architecture: open_clip model name, recorded in the meta.

        Returns:
            The vector, its deltas in float64 for float32 or narrower parameters.

        Raises:
            ValueError: when the selected keys, shapes or dtypes of the two models differ, or
                when no float parameter has the prefix.
        """
        xs, ps = _select(theta_x, prefix), _select(theta_p, prefix)
        only_x, only_p = xs.keys() - ps.keys(), ps.keys() - xs.keys()
        if only_x or only_p:
            raise ValueError(
                f"theta_X and theta_P have different {prefix!r} keys: only in theta_X: "
                f"[{_names(only_x)}]; only in theta_P: [{_names(only_p)}]"
            )
        mismatched = [k for k in xs if xs[k].shape != ps[k].shape or xs[k].dtype != ps[k].dtype]
        if mismatched:
            detail = "; ".join(
                f"{k}: {tuple(xs[k].shape)} {xs[k].dtype} vs {tuple(ps[k].shape)} {ps[k].dtype}"
                for k in sorted(mismatched)[:_LIST_LIMIT]
            )
            raise ValueError(f"theta_X and theta_P differ in shape or dtype: {detail}")
        deltas: dict[str, Tensor] = {}
        for key, x in xs.items():
            if not x.is_floating_point():
                continue
            wide = _delta_dtype(x.dtype)
            deltas[key] = x.detach().to(wide) - ps[key].detach().to(device=x.device, dtype=wide)
        if not deltas:
            raise ValueError(f"no floating-point parameter has the prefix {prefix!r}")
        if theta_x_fingerprint is None or theta_p_fingerprint is None:
            from storage.checkpoints import state_fingerprint

            theta_x_fingerprint = theta_x_fingerprint or state_fingerprint(dict(theta_x))
            theta_p_fingerprint = theta_p_fingerprint or state_fingerprint(dict(theta_p))
        meta = VectorMeta.single(
            source_domain=source_domain,
            theta_x_fingerprint=theta_x_fingerprint,
            theta_p_fingerprint=theta_p_fingerprint,
            base_fingerprint=base_fingerprint,
            architecture=architecture,
            prefix=prefix,
        )
        logger.info("explainability vector from %s: %d tensors", source_domain, len(deltas))
        return cls(deltas, meta)

    def __len__(self) -> int:
        return len(self.deltas)

    def __iter__(self) -> Iterator[str]:
        return iter(self.deltas)

    def __contains__(self, key: object) -> bool:
        return key in self.deltas

    def __repr__(self) -> str:
        return (
            f"ExplainabilityVector(source={self.meta.source_domain!r}, tensors={len(self)}, "
            f"numel={self.numel()}, base={self.meta.base_fingerprint!r})"
        )

    def keys(self) -> list[str]:
        """The parameter names, in state-dict order."""
        return list(self.deltas)

    def numel(self) -> int:
        """Total number of scalar entries."""
        return sum(d.numel() for d in self.deltas.values())

    def norms(self) -> dict[str, float]:
        """The L2 (Frobenius) norm of each delta tensor."""
        return {k: float(torch.linalg.vector_norm(d.double())) for k, d in self.deltas.items()}

    def norm(self) -> float:
        """The L2 norm of the whole vector (all tensors flattened together)."""
        return math.sqrt(sum(n * n for n in self.norms().values()))

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> ExplainabilityVector:
        """A copy on another device and/or dtype (a narrower dtype gives up exactness)."""
        return ExplainabilityVector(
            {k: d.to(device=device, dtype=dtype) for k, d in self.deltas.items()}, self.meta
        )

    def _check_compatible(self, other: ExplainabilityVector) -> None:
        if self.meta.base_fingerprint != other.meta.base_fingerprint:
            raise ValueError(
                "cannot combine vectors from different pretrained bases: "
                f"{self.meta.base_fingerprint!r} vs {other.meta.base_fingerprint!r}"
            )
        only_a = self.deltas.keys() - other.deltas.keys()
        only_b = other.deltas.keys() - self.deltas.keys()
        if only_a or only_b:
            raise ValueError(
                f"vectors have different keys: only in the first: [{_names(only_a)}]; "
                f"only in the second: [{_names(only_b)}]"
            )
        mismatched = [k for k in self.deltas if self.deltas[k].shape != other.deltas[k].shape]
        if mismatched:
            raise ValueError(f"vectors differ in shape at: {_names(mismatched)}")

    def __add__(self, other: object) -> ExplainabilityVector:
        if not isinstance(other, ExplainabilityVector):
            return NotImplemented
        self._check_compatible(other)
        deltas = {k: d + other.deltas[k].to(d.device) for k, d in self.deltas.items()}
        return ExplainabilityVector(deltas, self.meta.combined(other.meta))

    def __radd__(self, other: object) -> ExplainabilityVector:
        # sum() starts from the integer 0.
        if isinstance(other, int) and not isinstance(other, bool) and other == 0:
            return self
        return NotImplemented

    def __neg__(self) -> ExplainabilityVector:
        return ExplainabilityVector({k: -d for k, d in self.deltas.items()}, self.meta.scaled(-1.0))

    def __sub__(self, other: object) -> ExplainabilityVector:
        if not isinstance(other, ExplainabilityVector):
            return NotImplemented
        return self + (-other)

    def __mul__(self, coef: object) -> ExplainabilityVector:
        if isinstance(coef, bool) or not isinstance(coef, Real):
            return NotImplemented
        value = _check_coef(coef)
        return ExplainabilityVector(
            {k: d * value for k, d in self.deltas.items()}, self.meta.scaled(value)
        )

    __rmul__ = __mul__

    def apply_to(
        self,
        state_dict: Mapping[str, Tensor],
        coef: float,
        *,
        base_fingerprint: str | None = None,
        allow_different_base: bool = False,
    ) -> dict[str, Tensor]:
        """theta_T + coef * tau as a new state dict.

        The input is not modified. Keys outside the vector are carried over as the same tensor
        objects; the vector's keys get new tensors with the target's dtype and device, computed
        as ``(p.double() + coef * d).to(p.dtype)`` (see the module docstring for exactness;
        ``coef == 0`` copies the target's tensors unchanged).

        Args:
            state_dict: the target model's state dict (theta_T).
            coef: lambda, a finite real number.
            base_fingerprint: fingerprint of the pretrained model theta_T was fine-tuned from;
                checked against the vector's base when given.
            allow_different_base: apply even when ``base_fingerprint`` differs (logged).

        Returns:
            The new state dict, keys in the input's order.

        Raises:
            ValueError: on a non-finite coefficient, a key of the vector missing from the state
                dict, a shape mismatch, a non-float target parameter, or a different base
                without ``allow_different_base``.
        """
        value = _check_coef(coef)
        if base_fingerprint is not None and base_fingerprint != self.meta.base_fingerprint:
            message = (
                f"the vector was built on base {self.meta.base_fingerprint!r} but the target "
                f"model comes from base {base_fingerprint!r}"
            )
            if not allow_different_base:
                raise ValueError(message + "; pass allow_different_base=True to apply it anyway")
            logger.warning("%s; applying anyway (allow_different_base=True)", message)
        missing = [k for k in self.deltas if k not in state_dict]
        if missing:
            raise ValueError(
                f"state dict lacks {len(missing)} keys of the vector: {_names(missing)}"
            )
        wrong = [
            f"{k}: vector {tuple(d.shape)} vs model {tuple(state_dict[k].shape)}"
            for k, d in self.deltas.items()
            if state_dict[k].shape != d.shape
        ]
        if wrong:
            raise ValueError("shape mismatch between vector and state dict: " + "; ".join(wrong))
        not_float = [k for k in self.deltas if not state_dict[k].is_floating_point()]
        if not_float:
            raise ValueError(f"state dict parameters are not floating point: {_names(not_float)}")

        result = dict(state_dict)
        for key, delta in self.deltas.items():
            target = state_dict[key].detach()
            if value == 0.0:
                result[key] = target.clone()
                continue
            wide = torch.promote_types(_delta_dtype(target.dtype), delta.dtype)
            summed = target.to(wide) + value * delta.to(device=target.device, dtype=wide)
            result[key] = summed.to(target.dtype)
        return result

    def sidecar(self) -> dict[str, Any]:
        """The JSON sidecar written next to the tensors by :meth:`save`."""
        norms = self.norms()
        return {
            "format": SIDECAR_FORMAT,
            **self.meta.to_dict(),
            "keys": self.keys(),
            "norms": norms,
            "total_norm": math.sqrt(sum(n * n for n in norms.values())),
            "numel": self.numel(),
        }

    def save(self, storage: Storage, key: str) -> None:
        """Write the deltas as safetensors with a JSON sidecar (see :meth:`sidecar`).

        Args:
            storage: where to write.
            key: key of the safetensors file (the sidecar's key is chosen by
                :mod:`storage.checkpoints`).
        """
        from storage.checkpoints import save_state_dict

        tensors = {k: d.detach().cpu().contiguous() for k, d in self.deltas.items()}
        save_state_dict(storage, key, tensors, self.sidecar())
        logger.info("saved %r to %s", self, storage.url(key))

    @classmethod
    def load(cls, storage: Storage, key: str) -> ExplainabilityVector:
        """Read a vector written by :meth:`save`.

        Raises:
            ValueError: when the sidecar is not a vector's or does not list the stored keys.
        """
        from storage.checkpoints import load_sidecar, load_state_dict

        sidecar = load_sidecar(storage, key)
        if not isinstance(sidecar, Mapping) or sidecar.get("format") != SIDECAR_FORMAT:
            raise ValueError(f"{storage.url(key)} is not an explainability vector")
        tensors = load_state_dict(storage, key)
        if sorted(tensors) != sorted(sidecar["keys"]):
            raise ValueError(f"{storage.url(key)}: stored tensors do not match the sidecar keys")
        deltas = {k: tensors[k] for k in sidecar["keys"]}
        return cls(deltas, VectorMeta.from_dict(sidecar))

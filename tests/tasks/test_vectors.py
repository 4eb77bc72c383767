"""Explainability-vector algebra, exactness, refusals and storage round trip."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import open_clip
import pytest
import torch

from tasks.algorithms.vectors import ExplainabilityVector, VectorMeta

MODEL_CONFIGS = Path(__file__).resolve().parents[2] / "tasks" / "model" / "model_configs"


def _tiny_state(seed: int) -> dict[str, torch.Tensor]:
    open_clip.add_model_config(MODEL_CONFIGS)
    torch.manual_seed(seed)
    return open_clip.create_model("tiny-vit-56").state_dict()


@pytest.fixture(scope="module")
def states() -> dict[str, dict[str, torch.Tensor]]:
    """Three random inits of the tiny CLIP standing in for theta_P, theta_X and theta_T."""
    return {"p": _tiny_state(0), "x": _tiny_state(1), "t": _tiny_state(2)}


def _vector(x, p, *, domain="src", base="base0", **kwargs) -> ExplainabilityVector:
    return ExplainabilityVector.from_models(
        x,
        p,
        base_fingerprint=base,
        source_domain=domain,
        theta_x_fingerprint=f"x-{domain}",
        theta_p_fingerprint=f"p-{domain}",
        **kwargs,
    )


def _equal(a: ExplainabilityVector, b: ExplainabilityVector) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a.deltas[k], b.deltas[k]) for k in a)


def test_covers_exactly_the_visual_float_parameters(states):
    x = dict(states["x"], **{"visual.step_count": torch.tensor(3)})
    p = dict(states["p"], **{"visual.step_count": torch.tensor(5)})
    tau = _vector(x, p)
    expected = [k for k, v in x.items() if k.startswith("visual.") and v.is_floating_point()]
    assert tau.keys() == expected
    assert "visual.step_count" not in tau and "logit_scale" not in tau
    assert all(k.startswith("visual.") for k in tau)

    text = _vector(x, p, prefix="transformer.")
    assert text.keys() and all(k.startswith("transformer.") for k in text)
    assert text.meta.prefix == "transformer."


def test_theta_p_plus_tau_is_theta_x_bit_exactly(states):
    p, x = states["p"], states["x"]
    tau = _vector(x, p)
    for applied in (tau.apply_to(p, 1.0), (1.0 * tau).apply_to(p, 1), sum([tau]).apply_to(p, 1.0)):
        assert list(applied) == list(p)
        for key in p:
            expected = x[key] if key in tau else p[key]
            assert torch.equal(applied[key], expected), key
            assert applied[key].dtype == p[key].dtype


def test_exactness_on_random_tensors_where_float32_deltas_fail():
    gen = torch.Generator().manual_seed(0)
    n = 200_000

    def spread() -> torch.Tensor:
        # Random signs, magnitudes over 2**-12 .. 2**12: ratios within the documented 2**28.
        sign = torch.randint(0, 2, (n,), generator=gen) * 2 - 1
        scale = torch.exp2(torch.randint(-12, 12, (n,), generator=gen).float())
        return sign * (1 + torch.rand(n, generator=gen)) * scale

    p, x = spread(), spread()
    p[:100], x[100:200] = 0.0, 0.0
    naive = p + (x - p)
    assert (naive != x).sum() > 1000, "float32 deltas are not exact: the test has teeth"

    tau = _vector({"visual.w": x}, {"visual.w": p})
    assert torch.equal(tau.apply_to({"visual.w": p}, 1.0)["visual.w"], x)
    half = {"visual.w": x.half()}, {"visual.w": p.half()}
    tau_half = _vector(*half)
    applied = tau_half.apply_to(half[1], 1.0)["visual.w"]
    assert applied.dtype == torch.float16 and torch.equal(applied, half[0]["visual.w"])


def test_coef_zero_returns_theta_t_unchanged_and_input_not_mutated(states):
    tau = _vector(states["x"], states["p"])
    target = copy.deepcopy(states["t"])
    target["visual.ln_pre.bias"][:4] = torch.tensor([-0.0, float("nan"), 0.0, 1e-45])
    before = copy.deepcopy(target)

    unchanged = tau.apply_to(target, 0.0)
    for key in target:
        a, b = unchanged[key], before[key]
        assert a.dtype == b.dtype
        # Compare bit patterns so signed zeros and NaNs count.
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), key
    assert unchanged["visual.conv1.weight"] is not target["visual.conv1.weight"]

    moved = tau.apply_to(target, 0.7)
    for key in target:
        assert torch.equal(target[key].view(torch.int32), before[key].view(torch.int32))
    w = "visual.proj"
    expected = target[w].double() + 0.7 * (states["x"][w].double() - states["p"][w].double())
    assert torch.equal(moved[w], expected.float())


def test_algebra(states):
    a = _vector(states["x"], states["p"], domain="a")
    b = _vector(states["t"], states["p"], domain="b")
    c = _vector(states["x"], states["t"], domain="c")
    k = "visual.conv1.weight"

    assert torch.equal((a + b).deltas[k], a.deltas[k] + b.deltas[k])
    assert torch.equal((-a).deltas[k], -a.deltas[k])
    assert torch.equal((a - b).deltas[k], a.deltas[k] - b.deltas[k])
    assert _equal(2 * a, a * 2) and _equal(2 * a, a + a)
    assert _equal(sum([a, b, c]), a + b + c)
    assert all(torch.count_nonzero(d) == 0 for d in (a - a).deltas.values())
    assert math.isclose((-2.5 * a).norm(), 2.5 * a.norm(), rel_tol=1e-12)
    expected_norms = {key: float(torch.linalg.vector_norm(d)) for key, d in a.deltas.items()}
    assert a.norms() == pytest.approx(expected_norms, rel=1e-12)
    assert a.norm() == pytest.approx(math.sqrt(sum(v * v for v in expected_norms.values())))
    # a + b applied to theta_P moves it by both deltas.
    applied = (a + b).apply_to(states["p"], 1.0)
    want = (states["x"][k].double() + states["t"][k].double() - states["p"][k].double()).float()
    assert torch.allclose(applied[k], want, atol=1e-6)

    mixed = 0.5 * (a + b) + a
    coefs = {s.domain: s.coef for s in mixed.meta.sources}
    assert coefs == {"a": 1.5, "b": 0.5}
    assert mixed.meta.source_domain == "a+b"
    assert (a + a).meta.sources[0].coef == 2.0 and len((a + a).meta.sources) == 1

    with pytest.raises(AttributeError):
        a.meta = b.meta
    with pytest.raises(TypeError):
        a.deltas[k] = a.deltas[k]


def test_mismatches_are_refused(states):
    x, p = states["x"], states["p"]
    missing = {k: v for k, v in x.items() if k != "visual.proj"}
    with pytest.raises(ValueError, match="visual.proj"):
        _vector(missing, p)
    reshaped = dict(x, **{"visual.proj": x["visual.proj"].T.contiguous()})
    with pytest.raises(ValueError, match="visual.proj"):
        _vector(reshaped, p)

    tau = _vector(x, p)
    with pytest.raises(ValueError, match="visual.ln_post.bias"):
        tau.apply_to({k: v for k, v in p.items() if k != "visual.ln_post.bias"}, 1.0)
    with pytest.raises(ValueError, match="visual.proj"):
        tau.apply_to(reshaped, 1.0)
    with pytest.raises(ValueError, match="different keys"):
        tau + _vector(x, p, prefix="visual.transformer.")
    with pytest.raises(ValueError, match="pretrained bases"):
        tau + _vector(x, p, base="base1")


def test_different_base_needs_the_override(states):
    tau = _vector(states["x"], states["p"], base="base0")
    tau.apply_to(states["t"], 1.0, base_fingerprint="base0")
    with pytest.raises(ValueError, match="allow_different_base"):
        tau.apply_to(states["t"], 1.0, base_fingerprint="other")
    applied = tau.apply_to(states["t"], 1.0, base_fingerprint="other", allow_different_base=True)
    assert not torch.equal(applied["visual.proj"], states["t"]["visual.proj"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_coefficients_raise(states, bad):
    tau = _vector(states["x"], states["p"])
    with pytest.raises(ValueError, match="finite"):
        tau.apply_to(states["t"], bad)
    with pytest.raises(ValueError, match="finite"):
        tau * bad


def test_save_load_round_trip(states, tmp_path):
    from storage import open_storage

    storage = open_storage(str(tmp_path))
    tau = 0.5 * _vector(states["x"], states["p"], architecture="tiny-vit-56")
    tau.save(storage, "vectors/src.safetensors")
    loaded = ExplainabilityVector.load(storage, "vectors/src.safetensors")

    assert _equal(loaded, tau)
    assert all(d.dtype == torch.float64 for d in loaded.deltas.values())
    assert loaded.meta == tau.meta
    assert isinstance(loaded.meta, VectorMeta) and loaded.meta.architecture == "tiny-vit-56"
    assert torch.equal(loaded.apply_to(states["p"], 2.0)["visual.proj"], states["x"]["visual.proj"])

    from storage.checkpoints import load_sidecar

    sidecar = load_sidecar(storage, "vectors/src.safetensors")
    assert sidecar["source_domain"] == "src"
    assert sidecar["base_fingerprint"] == "base0"
    assert sidecar["theta_x_fingerprint"] == "x-src" and sidecar["theta_p_fingerprint"] == "p-src"
    assert sidecar["keys"] == tau.keys()
    assert sidecar["norms"] == pytest.approx(tau.norms())
    assert sidecar["total_norm"] == pytest.approx(tau.norm())


def test_default_fingerprints_are_the_checkpoint_fingerprints(states):
    from storage.checkpoints import state_fingerprint

    tau = ExplainabilityVector.from_models(
        states["x"], states["p"], base_fingerprint="b", source_domain="src"
    )
    assert tau.meta.theta_x_fingerprint == state_fingerprint(states["x"])
    assert tau.meta.theta_p_fingerprint == state_fingerprint(states["p"])
    assert tau.meta.theta_x_fingerprint != tau.meta.theta_p_fingerprint


def _save_finetuned(storage, key: str, state, mode: str) -> str:
    """A fine-tuned checkpoint as the fine-tuning stage writes it (weights and sidecar)."""
    from storage.checkpoints import save_state_dict, state_fingerprint

    save_state_dict(
        storage,
        key,
        state,
        metadata={
            "kind": "finetuned",
            "domain": "src",
            "mode": mode,
            "model_name": "tiny-vit-56",
            "fingerprint": state_fingerprint(state),
            "base_fingerprint": "base0",
            "config": {"model_name": "tiny-vit-56", "domain": "src"},
        },
    )
    return storage.url(key)


def test_a_vector_recomputed_from_other_models_into_the_same_key_is_recomputed(states, tmp_path):
    """Regression: the vector stage reused any existing vector at its key, whatever its models."""
    from storage import open_storage
    from storage.checkpoints import state_fingerprint
    from tasks.vector import compute_vector

    models = open_storage(str(tmp_path / "models"))
    theta_p = _save_finetuned(models, "p/model.safetensors", states["p"], "P")
    theta_x = _save_finetuned(models, "x/model.safetensors", states["x"], "X")
    out = str(tmp_path / "out")
    first = compute_vector(theta_x, theta_p, out, "vectors/src.safetensors")
    assert not first["skipped"]
    assert compute_vector(theta_x, theta_p, out, "vectors/src.safetensors")["skipped"]

    # theta_X retrained: new weights at the same URI, the vector goes to the same key.
    _save_finetuned(models, "x/model.safetensors", states["t"], "X")
    second = compute_vector(theta_x, theta_p, out, "vectors/src.safetensors")
    assert not second["skipped"]
    assert second["norm"] != pytest.approx(first["norm"])
    stored = ExplainabilityVector.load(open_storage(out), "vectors/src.safetensors")
    assert stored.meta.theta_x_fingerprint == state_fingerprint(states["t"])
    assert torch.equal(stored.apply_to(states["p"], 1.0)["visual.proj"], states["t"]["visual.proj"])

"""The vector shapes of benchmarks/vector_shaping.py: what each keeps of tau."""

from __future__ import annotations

import torch

from benchmarks.vector_shaping import SHAPES, drop_keys, keep_keys, shaped, trim
from tasks.algorithms.vectors import ExplainabilityVector, VectorMeta

DELTAS = {
    "visual.proj": torch.tensor([[1.0, -4.0], [0.5, 2.0]], dtype=torch.float64),
    "visual.transformer.resblocks.0.attn.in_proj_weight": torch.arange(-5.0, 5.0).double(),
    "visual.transformer.resblocks.2.mlp.c_fc.bias": torch.tensor([3.0, -1.0]).double(),
}


def _vector() -> ExplainabilityVector:
    meta = VectorMeta.single(
        source_domain="src",
        theta_x_fingerprint="x",
        theta_p_fingerprint="p",
        base_fingerprint="base",
        architecture="tiny-vit-56",
        prefix="visual.",
    )
    return ExplainabilityVector(DELTAS, meta)


def test_trim_keeps_each_tensors_largest_entries_and_zeros_the_rest():
    delta = torch.tensor([0.1, -3.0, 2.0, -0.5, 1.0, 0.0, 4.0, -0.2, 0.3, 0.05]).double()
    kept = trim(0.3)("k", delta)
    assert torch.equal(kept, torch.tensor([0, -3.0, 2.0, 0, 0, 0, 4.0, 0, 0, 0]).double())
    assert torch.equal(trim(1.0)("k", delta), delta)
    # At least one entry survives, the largest.
    assert torch.count_nonzero(trim(0.01)("k", delta)) == 1


def test_key_shapes_zero_exactly_the_tensors_they_leave_out():
    vector = shaped(_vector(), keep_keys(r"\.attn\."))
    assert vector.keys() == list(DELTAS)  # applying it touches the same tensors
    for key, delta in vector.deltas.items():
        expected = DELTAS[key] if ".attn." in key else torch.zeros_like(DELTAS[key])
        assert torch.equal(delta, expected)
    dropped = shaped(_vector(), drop_keys(r"^visual\.proj$"))
    assert torch.count_nonzero(dropped.deltas["visual.proj"]) == 0
    assert torch.equal(
        dropped.deltas["visual.transformer.resblocks.2.mlp.c_fc.bias"],
        DELTAS["visual.transformer.resblocks.2.mlp.c_fc.bias"],
    )


def test_the_whole_vector_is_the_vector_and_every_shape_keeps_no_more_than_it():
    vector = _vector()
    assert shaped(vector, SHAPES["whole"]) is vector
    for name, shape in SHAPES.items():
        part = shaped(vector, shape)
        assert part.norm() <= vector.norm() + 1e-12, name
        assert part.meta == vector.meta

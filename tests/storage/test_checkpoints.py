"""Checkpoints: safetensors plus sidecar round trips; fingerprints are stable and discriminating."""

from __future__ import annotations

import hashlib
import io

import pytest
import torch

from storage import ObjectNotFoundError, open_storage
from storage.checkpoints import (
    checkpoint_fingerprint,
    load_sidecar,
    load_state_dict,
    save_state_dict,
    state_fingerprint,
)


class PickledObject:
    """An arbitrary object: torch.load(weights_only=True) must refuse to unpickle it."""


def _state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 6, generator=generator)
    return {
        "visual.conv1.weight": torch.randn(3, 3, 2, 2, generator=generator),
        "visual.proj": weight.t(),  # not contiguous
        "visual.ln_post.bias": torch.zeros(6, dtype=torch.bfloat16),
        "logit_scale": torch.tensor(4.6052),
        "positional_ids": torch.arange(5, dtype=torch.int64),
    }


def _assert_same(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    for name in left:
        assert left[name].dtype == right[name].dtype, name
        assert torch.equal(left[name], right[name]), name


def test_round_trip_with_sidecar(storage_uri):
    storage = open_storage(storage_uri)
    state = _state()
    fingerprint = save_state_dict(
        storage, "models/theta_p.safetensors", state, {"domain": "shapes", "epochs": 1}
    )
    loaded = load_state_dict(storage, "models/theta_p.safetensors")
    _assert_same(loaded, state)
    assert state_fingerprint(loaded) == fingerprint
    assert load_sidecar(storage, "models/theta_p.safetensors") == {
        "domain": "shapes",
        "epochs": 1,
        "state_fingerprint": fingerprint,
    }
    assert storage.exists("models/theta_p.json")


def test_tied_weights_are_saved(tmp_path):
    storage = open_storage(str(tmp_path))
    shared = torch.randn(3, 3)
    state = {"a": shared, "b": shared, "c": shared[0]}
    save_state_dict(storage, "tied.safetensors", state, {})
    _assert_same(
        load_state_dict(storage, "tied.safetensors"), {k: v.clone() for k, v in state.items()}
    )


def test_bad_inputs_are_refused_before_writing(tmp_path):
    storage = open_storage(str(tmp_path))
    with pytest.raises(ValueError, match="safetensors"):
        save_state_dict(storage, "model.pt", _state(), {})
    with pytest.raises(ValueError, match="JSON"):
        save_state_dict(storage, "model.safetensors", _state(), {"bad": object()})
    with pytest.raises(ValueError, match="does not match"):
        save_state_dict(storage, "model.safetensors", _state(), {"state_fingerprint": "0" * 16})
    assert storage.list() == []
    with pytest.raises(ObjectNotFoundError):
        load_state_dict(storage, "model.safetensors")


def test_torch_files_load_with_weights_only(storage_uri):
    storage = open_storage(storage_uri)
    module = torch.nn.Linear(3, 2)
    buffer = io.BytesIO()
    torch.save({"state_dict": {f"module.{k}": v for k, v in module.state_dict().items()}}, buffer)
    storage.write_bytes("released/open_clip_model.bin", buffer.getvalue())
    loaded = load_state_dict(storage, "released/open_clip_model.bin")
    fresh = torch.nn.Linear(3, 2)
    fresh.load_state_dict(loaded)
    assert torch.equal(fresh.weight, module.weight)

    buffer = io.BytesIO()
    torch.save({"x": torch.zeros(1), "obj": PickledObject()}, buffer)
    storage.write_bytes("evil.pt", buffer.getvalue())
    with pytest.raises(ValueError, match="weights_only"):
        load_state_dict(storage, "evil.pt")


def test_fingerprint_is_stable_and_discriminating():
    state = _state()
    fingerprint = state_fingerprint(state)
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert state_fingerprint(dict(reversed(list(state.items())))) == fingerprint
    assert state_fingerprint({k: v.contiguous().clone() for k, v in state.items()}) == fingerprint

    changed_value = dict(state, logit_scale=torch.tensor(4.6053))
    changed_dtype = dict(state, logit_scale=state["logit_scale"].double())
    changed_shape = dict(state, positional_ids=state["positional_ids"].reshape(5, 1))
    renamed = {("visual.other" if k == "visual.proj" else k): v for k, v in state.items()}
    variants = [changed_value, changed_dtype, changed_shape, renamed]
    assert len({fingerprint, *(state_fingerprint(v) for v in variants)}) == 5


def test_vanilla_module_loads_saved_checkpoint(tmp_path):
    storage = open_storage(str(tmp_path))
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    save_state_dict(storage, "m.safetensors", module.state_dict(), {})
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    fresh.load_state_dict(load_state_dict(storage, "m.safetensors"))
    _assert_same(fresh.state_dict(), module.state_dict())


def test_sidecar_less_checkpoint_is_hashed_once_per_version(storage_uri, monkeypatch):
    """A foreign base (no sidecar) is read in full once, not on every fingerprint call."""
    storage = open_storage(storage_uri)
    reads: list[str] = []
    backend = type(storage)
    for method in ("open_read", "read_bytes", "download_file"):
        original = getattr(backend, method)

        def counting(self, key, *args, _original=original, _method=method, **kwargs):
            reads.append(f"{_method}:{key}")
            return _original(self, key, *args, **kwargs)

        monkeypatch.setattr(backend, method, counting)
    first = bytes(range(256)) * 64
    storage.write_bytes("weights/open_clip_model.bin", first)
    uri = storage.url("weights/open_clip_model.bin")

    fingerprint = checkpoint_fingerprint(uri)
    assert fingerprint == hashlib.sha256(first).hexdigest()[:16]
    assert checkpoint_fingerprint(uri) == fingerprint
    assert len(reads) == 1, reads

    # Rewritten in place with the same size (a retrained model of the same architecture).
    second = bytes(reversed(first))
    storage.write_bytes("weights/open_clip_model.bin", second)
    changed = checkpoint_fingerprint(uri)
    assert changed == hashlib.sha256(second).hexdigest()[:16] != fingerprint
    assert checkpoint_fingerprint(uri) == changed
    assert len(reads) == 2

    with pytest.raises(ObjectNotFoundError):
        checkpoint_fingerprint(storage.url("weights/missing.bin"))

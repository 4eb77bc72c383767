"""Scenario 4: a bad configuration fails with a clear error before any compute, writing nothing."""

from __future__ import annotations

import json
import math
import urllib.request
from pathlib import Path

import open_clip
import pytest
import torch
from pydantic import ValidationError
from reliability_helpers import FAKE_ACCESS_KEY, FAKE_SECRET_KEY, build_config

import tasks.build_dataset.stage
import tasks.finetune
from storage import AccessDeniedError, BucketNotFoundError, ObjectNotFoundError, open_storage
from tasks.algorithms.vectors import ExplainabilityVector
from tasks.build_dataset import LabelConfig, plan_build
from tasks.data.export import export_synthetic_domain
from tasks.finetune import FinetuneConfig, finetune
from tasks.model import DEFAULT_MODEL, MODEL_CONFIG_DIR, load_clip


class _ComputeStarted(AssertionError):
    """Raised by the sentinels below: the stage got past validation into real work."""


@pytest.fixture
def no_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make loading the explained model or the training data fail the test."""

    def refuse(*args, **kwargs):
        raise _ComputeStarted("compute started before the configuration was checked")

    monkeypatch.setattr(tasks.build_dataset.stage, "explained_model_fingerprint", refuse)
    monkeypatch.setattr(tasks.finetune, "training_stream", refuse)


@pytest.fixture(scope="module")
def train_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("bad-config") / "data")
    export_synthetic_domain(root, "shapes", splits=("train",), per_class=1)
    return root


def _finetune_config(data: str, **changes) -> FinetuneConfig:
    fields = dict(domain="shapes", mode="P", data=data, epochs=1, batch_size=4, device="cpu")
    return FinetuneConfig(**{**fields, **changes})


def test_unknown_model_name(tmp_path: Path, train_data: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="unknown model 'vit-does-not-exist'.*tiny-vit-56"):
        plan_build(build_config(str(out), model_name="vit-does-not-exist"))
    with pytest.raises(ValueError, match="unknown model 'vit-does-not-exist'"):
        finetune(
            _finetune_config(train_data, model_name="vit-does-not-exist"),
            open_storage(str(out)),
            "run",
        )
    assert not out.exists()


def test_missing_checkpoint(tmp_path: Path, train_data: str) -> None:
    out, missing = tmp_path / "out", tmp_path / "weights" / "theta-p.safetensors"
    with pytest.raises(ObjectNotFoundError, match="theta-p.safetensors"):
        plan_build(build_config(str(out), checkpoint=str(missing)))
    with pytest.raises(FileNotFoundError, match="theta-p.safetensors"):
        finetune(_finetune_config(train_data, base=str(missing)), open_storage(str(out)), "run")
    assert not out.exists()


def test_budget_smaller_than_the_number_of_players() -> None:
    with pytest.raises(
        ValidationError, match="budget 40 is not larger than the number of players 49"
    ):
        LabelConfig(budget=40)
    with pytest.raises(ValidationError, match="budget"):
        LabelConfig(grid_h=3, grid_w=3, budget=9)


def _tiny_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return load_clip(DEFAULT_MODEL).state_dict()


def test_vector_refuses_another_architecture_another_base_and_non_finite_lambda(
    tmp_path: Path,
) -> None:
    theta_p, theta_x = _tiny_state(0), _tiny_state(1)
    vector = ExplainabilityVector.from_models(
        theta_x, theta_p, base_fingerprint="base-a", source_domain="shapes"
    )
    target = _tiny_state(2)
    before = {k: v.clone() for k, v in target.items()}

    # Another architecture: the tiny config with a wider, deeper image tower.
    spec = json.loads((MODEL_CONFIG_DIR / f"{DEFAULT_MODEL}.json").read_text())
    spec["vision_cfg"].update(width=128, layers=4)
    (tmp_path / "tiny-vit-56-wide.json").write_text(json.dumps(spec))
    open_clip.add_model_config(tmp_path)
    wide = open_clip.create_model("tiny-vit-56-wide", pretrained=None).state_dict()
    with pytest.raises(ValueError, match="shape mismatch"):
        vector.apply_to(wide, 1.0)
    narrow = {k: v for k, v in target.items() if "resblocks.2." not in k}
    with pytest.raises(ValueError, match="lacks .* keys of the vector"):
        vector.apply_to(narrow, 1.0)

    with pytest.raises(ValueError, match="allow_different_base=True"):
        vector.apply_to(target, 1.0, base_fingerprint="base-b")
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="finite"):
            vector.apply_to(target, bad)
        with pytest.raises(ValueError, match="finite"):
            vector * bad
    assert all(torch.equal(target[k], before[k]) for k in target)


def test_missing_bucket_fails_before_any_compute(
    faulty_s3, no_compute: None, train_data: str
) -> None:
    uri = f"s3://missing-{faulty_s3.bucket}/out"
    with pytest.raises(BucketNotFoundError, match=f"missing-{faulty_s3.bucket}"):
        plan_build(build_config(uri))
    with pytest.raises(BucketNotFoundError, match=f"missing-{faulty_s3.bucket}"):
        finetune(_finetune_config(train_data), open_storage(uri), "run")
    assert faulty_s3.objects() == {}


def _set_moto_auth(endpoint: str, initial_no_auth_actions: str) -> None:
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=initial_no_auth_actions.encode(),
        headers={"Content-Type": "text/plain"},
        method="POST",
    )
    with urllib.request.urlopen(request) as response:
        assert json.loads(response.read())["status"] == "ok"


def test_bad_credentials_fail_before_any_compute_without_leaking(
    faulty_s3, no_compute: None, train_data: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="storage")
    caplog.set_level("DEBUG", logger="tasks")
    uri = faulty_s3.uri("out")
    # moto then checks every request's signature: the fake key is unknown to it.
    _set_moto_auth(faulty_s3.server.endpoint_url, "0")
    try:
        with pytest.raises(AccessDeniedError, match="check the credentials") as build_error:
            plan_build(build_config(uri))
        with pytest.raises(AccessDeniedError) as finetune_error:
            finetune(_finetune_config(train_data), open_storage(uri), "run")
    finally:
        _set_moto_auth(faulty_s3.server.endpoint_url, "inf")
    for text in (str(build_error.value), str(finetune_error.value), caplog.text):
        assert FAKE_ACCESS_KEY not in text and FAKE_SECRET_KEY not in text
    assert faulty_s3.objects() == {}

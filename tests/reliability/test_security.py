"""Scenario 5: no credential leaks, no pickle payload runs, no shell, no key escapes its root."""

from __future__ import annotations

import io
import logging
import os
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError
from reliability_helpers import FAKE_ACCESS_KEY, FAKE_SECRET_KEY, build_config, find_secrets

from storage import ObjectNotFoundError, PathOutsideRootError, open_storage
from storage.checkpoints import load_state_dict, save_state_dict
from tasks.build_dataset import finalize_build, label_shard, plan_build
from tasks.data.export import export_synthetic_domain
from tasks.data.readers import iter_webdataset
from tasks.finetune import FinetuneConfig, finetune
from tasks.model import DEFAULT_MODEL, load_clip


def test_credentials_never_reach_objects_logs_or_errors(
    faulty_s3, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    for name in ("storage", "tasks", "flows"):
        caplog.set_level(logging.DEBUG, logger=name)
    plan = plan_build(build_config(faulty_s3.uri("x")))
    for index in range(plan.config.num_shards):
        label_shard(plan, index)
    finalize_build(plan)
    # Fine-tune in X mode on the X-dataset just built, writing checkpoints to the same bucket.
    config = FinetuneConfig(
        domain="shapes",
        mode="X",
        data=plan.dataset_uri,
        split="val",
        grid=3,
        batch_size=4,
        max_steps=2,
        checkpoint_every=1,
        device="cpu",
    )
    result = finetune(config, open_storage(faulty_s3.uri("models")), "shapes-x")
    errors = []
    for call in (
        lambda: open_storage(faulty_s3.uri("x")).read_bytes("no/such/object"),
        lambda: open_storage(f"s3://missing-{faulty_s3.bucket}/x").list(),
    ):
        with pytest.raises(Exception) as info:
            call()
        errors.append(f"{info.value!s} {info.value!r}")

    objects = faulty_s3.objects()
    kinds = {key.rsplit(".", 1)[-1] for key in objects}
    assert {"tar", "parquet", "json", "safetensors", "pt"} <= kinds
    assert result["uri"].endswith("models/shapes-x/model.safetensors")
    texts = dict(objects)
    for key, data in objects.items():
        if key.endswith(".parquet"):
            # Parquet pages may be compressed: scan the decoded values too.
            texts[f"{key} (decoded)"] = str(
                pq.read_table(pa.BufferReader(data)).to_pylist()
            ).encode()
    texts["logs"] = caplog.text.encode()
    texts["errors"] = "\n".join(errors).encode()
    assert find_secrets(texts, FAKE_ACCESS_KEY, FAKE_SECRET_KEY) == []
    # The scan is not vacuous: the bucket and endpoint names do appear where expected.
    assert faulty_s3.bucket.encode() in texts["logs"] and len(objects) >= 15


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoints_load_only_as_tensors_and_a_pickle_payload_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"visual.proj": torch.zeros(2), "payload": _Payload(marker)}, evil)
    storage = open_storage(str(tmp_path))

    with pytest.raises(ValueError, match="weights_only"):
        load_state_dict(storage, "evil.pt")
    with pytest.raises(ValueError, match="weights_only"):
        load_clip(DEFAULT_MODEL, pretrained=str(evil))
    with pytest.raises(ValueError, match="weights_only"):
        plan_build(build_config(str(tmp_path / "out"), checkpoint=str(evil)))

    # A resume file planted in a fine-tuning run is refused, never unpickled with its payload.
    data = str(tmp_path / "data")
    export_synthetic_domain(data, "shapes", splits=("train",), per_class=1)
    config = FinetuneConfig(domain="shapes", mode="P", data=data, batch_size=4, device="cpu")
    run = storage.child("run")
    save_state_dict(run, "last.safetensors", load_clip(DEFAULT_MODEL).state_dict(), {"step": 1})
    run.write_bytes("last-optim.pt", evil.read_bytes())
    with pytest.raises(pickle.UnpicklingError):
        finetune(config, storage, "run")
    assert not run.exists("model.safetensors")
    assert not marker.exists()

    # The payload is live: an unsafe load would have run it. This is what the code never does.
    torch.load(io.BytesIO(evil.read_bytes()), weights_only=False)
    assert marker.exists()


def test_pipe_uris_are_refused_and_never_reach_a_shell(tmp_path: Path) -> None:
    marker = tmp_path / "shell-ran"
    pipe = f"pipe:touch {marker}; cat shard.tar"
    with pytest.raises(ValueError, match="pipe:"):
        open_storage(pipe)
    with pytest.raises(ValueError, match="pipe:"):
        list(iter_webdataset(pipe, "zoo", "train"))
    out = str(tmp_path / "out")
    for changes in (
        {"input_kind": "webdataset", "input_uri": pipe, "input_name": "zoo"},
        {"input_kind": "imagefolder", "input_uri": pipe},
        {"checkpoint": f"{pipe}/model.pt"},
        {"output_uri": pipe},
    ):
        with pytest.raises(ValueError, match="pipe:"):
            plan_build(build_config(changes.pop("output_uri", out), **changes))
    with pytest.raises(ValueError, match="pipe:"):
        finetune(
            FinetuneConfig(domain="shapes", mode="P", data=pipe, device="cpu"),
            open_storage(out),
            "run",
        )
    assert not marker.exists()


def test_keys_cannot_escape_the_output_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    storage = open_storage(str(root))
    for key in ("../escape", "a/../../escape", "/etc/passwd", "s3://other/key"):
        with pytest.raises(PathOutsideRootError):
            storage.write_bytes(key, b"x")
        with pytest.raises(PathOutsideRootError):
            storage.child(key)
    with pytest.raises(ValidationError):
        build_config(str(root), name="../escape")
    with pytest.raises(ValidationError):
        build_config(str(root), split="../escape")
    with pytest.raises(PathOutsideRootError):
        finetune(
            FinetuneConfig(domain="shapes", mode="P", data=str(root), device="cpu"),
            storage,
            "../escape",
        )
    # A symlink planted inside the root does not lead writes outside it either.
    root.mkdir(exist_ok=True)
    (root / "shapes-x").symlink_to(outside, target_is_directory=True)
    with pytest.raises(PathOutsideRootError):
        plan_build(build_config(str(root)))
    with pytest.raises(ObjectNotFoundError):
        storage.read_bytes("nothing-here")
    assert list(outside.iterdir()) == []

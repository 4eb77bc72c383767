"""Fine-tuning in P and X modes, resumable checkpoints, and the cached base-model pretraining."""

from __future__ import annotations

import io
import json
import threading
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from storage import open_storage
from storage.checkpoints import load_sidecar, load_state_dict, save_state_dict
from storage.layout import shard_name
from storage.shards import ShardWriter
from tasks.data.stream import Decoder, OrderedStream, list_split
from tasks.data.synthetic import make_split
from tasks.explanation_losses import pearson_per_image
from tasks.finetune import (
    FinetuneConfig,
    Finetuner,
    finetune,
    training_stream,
)
from tasks.model import (
    DEFAULT_MODEL,
    load_clip,
    load_sem,
    model_fingerprint,
    register_model_configs,
)
from tasks.pretrain import PretrainConfig, pretrain_base

DOMAIN = "shapes"


def _mask_target(sample: dict) -> bytes:
    """A stand-in for Kernel SHAP: the object mask pooled to 7x7, label class first."""
    mask = np.asarray(Image.open(io.BytesIO(sample["mask.png"])), dtype=np.float32) / 255.0
    pooled = F.adaptive_avg_pool2d(torch.from_numpy(mask)[None, None], (7, 7))[0]
    buffer = io.BytesIO()
    np.save(buffer, pooled.numpy().astype(np.float32))
    return buffer.getvalue()


def _write_dataset(root: str, split: str, per_class: int, shards: int, with_shap: bool) -> None:
    storage = open_storage(root)
    samples = list(make_split(DOMAIN, split, seed=0, per_class=per_class))
    for index in range(shards):
        with ShardWriter(storage, shard_name(DOMAIN, split, index)) as writer:
            # Interleaved assignment: not the key order, which the streams must not need.
            for sample in samples[index::shards]:
                record = {"__key__": sample["__key__"], "png": sample["png"], "cls": sample["cls"]}
                if with_shap:
                    record["shap.npy"] = _mask_target(sample)
                    record["json"] = json.dumps({"classes": [sample["cls"]]}).encode()
                writer.write(record)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A plain domain export and an X-dataset of the same 35 images in the same 3 shards."""
    root = tmp_path_factory.mktemp("finetune-data")
    plain, xdata = str(root / "plain"), str(root / "x")
    _write_dataset(plain, "train", per_class=7, shards=3, with_shap=False)
    _write_dataset(xdata, "train", per_class=7, shards=3, with_shap=True)
    _write_dataset(xdata, "val", per_class=2, shards=1, with_shap=True)
    torch.manual_seed(0)
    base_store = open_storage(str(root / "base"))
    save_state_dict(base_store, "base.safetensors", load_clip(DEFAULT_MODEL).state_dict(), {})
    return {"plain": plain, "x": xdata, "base": base_store.url("base.safetensors")}


def _config(paths: dict[str, str], mode: str, **overrides) -> FinetuneConfig:
    fields = {
        "domain": DOMAIN,
        "mode": mode,
        "base": paths["base"],
        "data": paths["x"] if mode == "X" else paths["plain"],
        "val_data": paths["x"],
        "epochs": 1,
        "batch_size": 8,
        "lr": 5e-4,
        "beta": 2.0,
        "checkpoint_every": 2,
    }
    return FinetuneConfig(**{**fields, **overrides})


def test_one_epoch_in_both_modes_writes_vanilla_open_clip_checkpoints(data, tmp_path) -> None:
    storage = open_storage(str(tmp_path / "out"))
    base = load_clip(DEFAULT_MODEL, data["base"])
    results = {mode: finetune(_config(data, mode), storage, f"ft-{mode}") for mode in "PX"}
    register_model_configs()
    states = {}
    for mode, result in results.items():
        assert not result["skipped"] and result["steps"] == 5  # ceil(35 / 8)
        assert result["base_fingerprint"] == model_fingerprint(base)
        vanilla = open_clip.create_model(DEFAULT_MODEL, pretrained=None)
        states[mode] = load_state_dict(storage, result["key"])
        vanilla.load_state_dict(states[mode], strict=True)
        sidecar = load_sidecar(storage, result["key"])
        assert (sidecar["mode"], sidecar["domain"], sidecar["step"]) == (mode, DOMAIN, 5)
        [row] = sidecar["metrics"]
        assert 0.0 <= row["val_accuracy"] <= 1.0 and -1.0 <= row["val_pearson"] <= 1.0
        assert row["train_expl"] is None if mode == "P" else row["train_expl"] > 0
        # The text tower and logit scale are frozen; the image encoder moved.
        for key, value in base.state_dict().items():
            same = torch.equal(states[mode][key], value)
            assert same if not key.startswith("visual.") else True
        assert not torch.equal(states[mode]["visual.proj"], base.visual.proj)
    assert not torch.equal(states["P"]["visual.proj"], states["X"]["visual.proj"])
    again = finetune(_config(data, "X"), storage, "ft-X")
    assert again["skipped"] and again["fingerprint"] == results["X"]["fingerprint"]
    loaded = load_sem(storage.url("ft-X"))
    assert loaded.uri == storage.url("ft-X/model.safetensors")
    fingerprint = model_fingerprint(loaded.sem.clip)
    assert fingerprint == loaded.sidecar["fingerprint"] == results["X"]["fingerprint"]


def test_x_mode_without_shap_targets_is_refused_before_training(data, tmp_path) -> None:
    storage = open_storage(str(tmp_path / "out"))
    config = _config(data, "X", data=data["plain"])
    with pytest.raises(ValueError, match="has no shap.npy.*build an explanation dataset first"):
        finetune(config, storage, "ft-bad")
    assert storage.list() == []


def _epoch_batches(config: FinetuneConfig, epoch: int) -> list:
    stream = training_stream(config)
    stream.set_epoch(epoch)
    return list(stream.loader())


def test_p_and_x_datasets_stream_the_same_samples_in_the_same_order(data) -> None:
    for workers in (0, 2):
        orders = []
        for epoch in (0, 1):
            plain = _epoch_batches(_config(data, "P", loader_workers=workers), epoch)
            xdata = _epoch_batches(_config(data, "X", loader_workers=workers), epoch)
            assert [b.keys for b in plain] == [b.keys for b in xdata]
            assert [len(b.keys) for b in plain] == [8, 8, 8, 8, 3]
            for p_batch, x_batch in zip(plain, xdata, strict=True):
                assert torch.equal(p_batch.images, x_batch.images)
                assert torch.equal(p_batch.labels, x_batch.labels)
                assert p_batch.targets is None
                assert x_batch.targets.shape == (len(x_batch.keys), 7, 7)
            orders.append([key for batch in plain for key in batch.keys])
        assert orders[0] != orders[1]  # the order is drawn anew each epoch
        if workers == 0:
            # In one process every sample comes once per epoch; with workers an epoch is a
            # fixed number of batches per worker (webdataset's with_epoch), see tasks.data.stream.
            assert all(len(set(order)) == 35 for order in orders)


def test_resuming_mid_epoch_skips_exactly_the_batches_taken(data) -> None:
    config = _config(data, "X", loader_workers=2)
    full = _epoch_batches(config, 1)
    stream = training_stream(config)
    stream.set_epoch(1, skip_batches=3)
    rest = list(stream.loader())
    assert [b.keys for b in rest] == [b.keys for b in full[3:]]
    assert torch.equal(rest[0].targets, full[3].targets)


def test_ordered_stream_batches_do_not_depend_on_the_workers(data) -> None:
    split = list_split(data["x"], "train")
    decoder = Decoder(56, targets="require", masks=False)
    runs = [
        list(OrderedStream(split, decoder, batch_size=6, num_workers=n).loader()) for n in (0, 2)
    ]
    assert [b.keys for b in runs[0]] == [b.keys for b in runs[1]]
    assert [len(b.keys) for b in runs[0]] == [6] * 5 + [5]
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)


class _Crash(RuntimeError):
    pass


def test_data_re_exported_in_place_trains_a_model_of_its_own_and_no_checkpoint_resumes(
    data, tmp_path
) -> None:
    # The same URI, other images: what a synthetic domain whose per_class changed looks like.
    from flows.finetune import finetune_key

    plain = str(tmp_path / "plain")
    _write_dataset(plain, "train", per_class=7, shards=3, with_shap=False)
    config = _config(data, "P", data=plain, val_data=None)
    first_key = finetune_key(config)
    storage = open_storage(str(tmp_path / "out"))
    first = finetune(config, storage, "run")
    assert finetune(config, storage, "run")["skipped"]

    def crash_at_step_3(step: int, total: int) -> None:
        if step == 3:  # the checkpoint of step 2 is on disk
            raise _Crash

    with pytest.raises(_Crash):
        finetune(config, storage, "crashed", progress=crash_at_step_3)
    assert load_sidecar(storage, "crashed/last.safetensors")["step"] == 2

    _write_dataset(plain, "train", per_class=5, shards=3, with_shap=False)
    assert finetune_key(config) != first_key
    again = finetune(config, storage, "run")
    assert not again["skipped"] and again["steps"] == 4  # ceil(25 / 8): the new data
    assert again["fingerprint"] != first["fingerprint"]
    steps_seen: list[int] = []
    resumed = finetune(
        config, storage, "crashed", progress=lambda step, total: steps_seen.append(step)
    )
    assert steps_seen == [1, 2, 3, 4]  # the old data's checkpoint is not resumed
    assert resumed["fingerprint"] == again["fingerprint"]
    # The same content written again is the same data: the key is the content's, not the time's.
    _write_dataset(plain, "train", per_class=5, shards=3, with_shap=False)
    assert finetune(config, storage, "run")["skipped"]


@pytest.fixture(scope="module")
def x_reference(data, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An uninterrupted 2-epoch X run (10 steps), checkpointed every 3 steps."""
    storage = open_storage(str(tmp_path_factory.mktemp("x-reference")))
    return finetune(_config(data, "X", epochs=2, checkpoint_every=3), storage, "run")


@pytest.fixture(scope="module")
def p_reference(data, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Any]:
    """An uninterrupted 2-epoch P run on the default checkpoint schedule, and its storage."""
    storage = open_storage(str(tmp_path_factory.mktemp("p-reference")))
    config = _config(data, "P", epochs=2, val_data=None, checkpoint_every=None)
    return finetune(config, storage, "run"), storage


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_resume_after_a_crash_reaches_the_same_weights(
    data, tmp_path, x_reference, asynchronous
) -> None:
    config = _config(data, "X", epochs=2, checkpoint_every=3, checkpoint_async=asynchronous)
    reference = x_reference

    def crash_at_step_8(step: int, total: int) -> None:
        if step == 8:  # mid-epoch 2; the last checkpoint is at step 6
            raise _Crash

    storage = open_storage(str(tmp_path / "b"))
    with pytest.raises(_Crash):
        finetune(config, storage, "run", progress=crash_at_step_8)
    assert storage.exists("run/last.json") and not storage.exists("run/model.safetensors")
    # A failing run still waits for the checkpoint it was writing.
    assert load_sidecar(storage, "run/last.safetensors")["step"] == 6
    steps_seen: list[int] = []
    resumed = finetune(config, storage, "run", progress=lambda step, total: steps_seen.append(step))
    assert steps_seen == [7, 8, 9, 10]
    assert resumed["fingerprint"] == reference["fingerprint"]
    assert resumed["metrics"] == reference["metrics"]


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_crash_mid_checkpoint_leaves_the_previous_one_usable(
    data, tmp_path, x_reference, monkeypatch, asynchronous
) -> None:
    # The checkpoint schedule does not change the weights: x_reference saves every 3 steps.
    config = _config(data, "X", epochs=2, checkpoint_every=2, checkpoint_async=asynchronous)
    reference = x_reference
    storage = open_storage(str(tmp_path / "b"))
    write_bytes = type(storage).write_bytes

    def lose_the_disk(self, key: str, data: bytes) -> None:
        # The second checkpoint (step 4) dies between its optimizer file and its tensors.
        if key == "last-b.safetensors":
            raise OSError("disk lost mid-checkpoint")
        write_bytes(self, key, data)

    monkeypatch.setattr(type(storage), "write_bytes", lose_the_disk)
    with pytest.raises(OSError, match="disk lost"):
        finetune(config, storage, "run")
    monkeypatch.undo()
    run = storage.child("run")
    torn = torch.load(io.BytesIO(run.read_bytes("last-b-optim.pt")), weights_only=True)
    assert torn["step"] == 4 and not run.exists("last-b.safetensors")
    assert load_sidecar(run, "last.safetensors")["step"] == 2  # the record names step 2
    steps_seen: list[int] = []
    resumed = finetune(config, storage, "run", progress=lambda step, total: steps_seen.append(step))
    assert steps_seen == list(range(3, 11))
    assert resumed["fingerprint"] == reference["fingerprint"]
    assert resumed["metrics"] == reference["metrics"]


def test_asynchronous_checkpoints_let_training_go_on_and_hold_their_own_step(
    data, tmp_path, x_reference, monkeypatch
) -> None:
    config = _config(data, "X", epochs=2, checkpoint_every=2, checkpoint_async=True)
    storage = open_storage(str(tmp_path / "run"))
    write_checkpoint = Finetuner._write_checkpoint
    step_3_trained = threading.Event()
    waits: list[bool] = []

    def slow_write(self, slot, step, *args) -> None:
        # The checkpoint of step 2 is written only once step 3 has trained, which a synchronous
        # write never lets happen; it must still hold step 2's weights and optimizer state.
        if step == 2:
            waits.append(step_3_trained.wait(timeout=30))
        write_checkpoint(self, slot, step, *args)

    def crash_at_step_4(step: int, total: int) -> None:
        if step == 3:
            step_3_trained.set()
        if step == 4:  # before the checkpoint of step 4
            raise _Crash

    monkeypatch.setattr(Finetuner, "_write_checkpoint", slow_write)
    with pytest.raises(_Crash):
        finetune(config, storage, "run", progress=crash_at_step_4)
    monkeypatch.undo()
    assert waits == [True]
    record = load_sidecar(storage, "run/last.safetensors")
    assert (record["step"], record["model"]) == (2, "last-a.safetensors")
    resumed = finetune(config, storage, "run")
    assert resumed["fingerprint"] == x_reference["fingerprint"]  # the weights, to the bit
    assert resumed["metrics"] == x_reference["metrics"]
    # Then 4 (slot b), 5 (epoch end, a), 6 (b), 8 (a); none at the last step.
    record = load_sidecar(storage, "run/last.safetensors")
    assert (record["step"], record["model"]) == (8, "last-a.safetensors")


@pytest.mark.parametrize(
    ("every", "minutes", "last_saved"),
    [(None, None, 5), (None, 1e-9, 7), (3, None, 6)],
    ids=["epoch-ends", "by-time", "by-steps"],
)
def test_checkpoints_come_at_epoch_ends_by_steps_or_by_time_and_never_change_the_weights(
    data, tmp_path, p_reference, every, minutes, last_saved
) -> None:
    defaults = FinetuneConfig(domain=DOMAIN, mode="P", data="unused")
    assert (defaults.checkpoint_every, defaults.checkpoint_minutes) == (None, 10.0)
    reference, reference_storage = p_reference
    # 10 steps in 2 epochs of 5, no checkpoint at the last: the final model follows at once.
    assert load_sidecar(reference_storage, "run/last.safetensors")["step"] == 5
    config = _config(
        data, "P", epochs=2, val_data=None, checkpoint_every=every, checkpoint_minutes=minutes
    )

    def crash_at_step_8(step: int, total: int) -> None:
        if step == 8:
            raise _Crash

    storage = open_storage(str(tmp_path / "b"))
    with pytest.raises(_Crash):
        finetune(config, storage, "run", progress=crash_at_step_8)
    assert load_sidecar(storage, "run/last.safetensors")["step"] == last_saved
    resumed = finetune(config, storage, "run")
    assert resumed["fingerprint"] == reference["fingerprint"]


def test_eval_every_evaluates_less_often_and_always_last_with_the_same_weights(
    data, tmp_path
) -> None:
    every = finetune(_config(data, "X", epochs=3), open_storage(str(tmp_path / "a")), "run")
    sparse = finetune(
        _config(data, "X", epochs=3, eval_every=2), open_storage(str(tmp_path / "b")), "run"
    )
    assert sparse["fingerprint"] == every["fingerprint"]  # the weights, to the bit
    assert [r["val_accuracy"] is not None for r in every["metrics"]] == [True, True, True]
    # After epoch 2 (every second one) and after the last.
    assert [r["val_accuracy"] is not None for r in sparse["metrics"]] == [False, True, True]
    assert sparse["metrics"][-1]["val_accuracy"] == every["metrics"][-1]["val_accuracy"]


def test_x_mode_attributions_agree_with_targets_better_than_p_mode(data, tmp_path) -> None:
    storage = open_storage(str(tmp_path / "out"))
    split = list_split(data["x"], "train")
    [train] = OrderedStream(split, Decoder(56, targets="require"), batch_size=35).loader()
    agreement = {}
    for mode in "PX":
        # Both on the X-dataset: the same images, only the loss differs.
        config = _config(data, mode, data=data["x"], epochs=2, val_data=None)
        result = finetune(config, storage, f"ft-{mode}")
        model = load_sem(storage.url(result["key"])).sem
        with torch.no_grad():
            _, maps = model(train.images)
        label_maps = maps[torch.arange(len(train.keys)), train.labels]
        agreement[mode] = float(pearson_per_image(label_maps, train.targets).mean())
    # Measured: X 0.61, P -0.11 (10 steps from a random-init base).
    assert agreement["X"] > agreement["P"] + 0.3, agreement
    assert agreement["X"] > 0.4, agreement


def test_pretraining_is_cached_by_config(tmp_path) -> None:
    storage = open_storage(str(tmp_path / "models"))
    config = PretrainConfig(
        domains=("colours", "shapes"), per_class=2, val_per_class=1, epochs=1, batch_size=8
    )
    key = pretrain_base(config, storage)
    assert key == f"models/base-{config.fingerprint()}/model.safetensors"
    sidecar = load_sidecar(storage, key)
    assert set(sidecar["metrics"]["zero_shot"]) == {"colours", "shapes"}
    before = storage.read_bytes(key)
    assert pretrain_base(config, storage) == key
    assert storage.read_bytes(key) == before and load_sidecar(storage, key) == sidecar
    loaded = load_clip(DEFAULT_MODEL, storage.url(key))
    assert model_fingerprint(loaded) == sidecar["fingerprint"]
    other = PretrainConfig(domains=("colours",), per_class=2, val_per_class=1, epochs=1)
    assert pretrain_base(other, storage) != key

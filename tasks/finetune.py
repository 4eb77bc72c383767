"""Fine-tuning the self-explaining CLIP model: prediction only (P) or with explanations (X).

(About 600 lines: the data, loss, resumable loop and checkpointing of one training run; they
share the run state and are kept together until streaming data moves data loading out.)

Both modes start from the same base checkpoint, see the same samples in the same order (sorted
by ``__key__``, then a permutation drawn from ``(seed, epoch)``) and run the same forward pass;
they differ only in the loss. theta_X - theta_P is then the explainability vector.

A run is resumable: every ``checkpoint_every`` steps and at every epoch end it saves the model
(``last.safetensors``) and the optimizer, schedule, RNG and metrics state (``last-optim.pt``),
and a rerun continues from there to bit-identical final weights on CPU. The final model is
``model.safetensors`` with a JSON sidecar, and its completion marker makes a rerun a no-op.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from storage.checkpoints import checkpoint_fingerprint
from storage.fingerprints import fingerprint_of
from tasks.config import Device, StageConfig, resolve_device
from tasks.model import (
    DEFAULT_MODEL,
    DEFAULT_TEMPLATES,
    SelfExplainingCLIP,
    load_clip,
    model_fingerprint,
    standardize_per_image,
    zero_shot_head,
)

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
LAST_FILE = "last.safetensors"
LAST_OPTIM_FILE = "last-optim.pt"
COMPLETION_UNIT = "model"
ProgressCallback = Callable[[int, int], None]

# Fields that may change between an interrupted run and its resumption without changing the
# result (where and how often it saves, where it runs).
_RESUME_NEUTRAL_FIELDS = ("checkpoint_every", "device")


class FinetuneConfig(StageConfig):
    """Configuration of one fine-tuning run.

    Attributes:
        domain: the domain trained on (names the head's classes for synthetic domains).
        mode: ``"P"`` (cross-entropy only) or ``"X"`` (plus the explanation loss).
        model_name: open_clip architecture.
        base: URI of the shared pretrained start (None: random initialisation, tests only).
        data: URI of the training dataset directory (plain domain shards or an X-dataset).
        data_name: shard name prefix in ``data`` (None: the only one present).
        split: split of ``data`` to train on.
        val_data: URI of a validation dataset directory (optional).
        val_split: split of ``val_data``.
        class_names: head classes in label order (None: the synthetic domain's).
        templates: prompt templates of the zero-shot head.
        epochs: passes over the data.
        batch_size: samples per step.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay (matrices only, not gains, biases or embeddings).
        lr_schedule: ``"cosine"`` (decay to 0 over the run, after ``warmup_steps``) or
            ``"constant"``.
        warmup_steps: linear warm-up steps.
        beta: weight of the explanation loss (X mode).
        grid: attribution grid side (``grid x grid`` cells, the SHAP grid).
        seed: seeds the data order and the torch RNG.
        checkpoint_every: steps between resumable checkpoints.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda[:i]"``.
        image_size: side images are resized to (the model's input size).
        max_steps: caps the total number of steps (the schedule follows the cap).
    """

    domain: str
    mode: Literal["P", "X"]
    model_name: str = DEFAULT_MODEL
    base: str | None = None
    data: str
    data_name: str | None = None
    split: str = "train"
    val_data: str | None = None
    val_split: str = "val"
    class_names: tuple[str, ...] | None = None
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    epochs: int = Field(default=5, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    beta: float = Field(default=1.0, ge=0)
    grid: int = Field(default=7, ge=1)
    seed: int = 0
    checkpoint_every: int = Field(default=50, ge=1)
    device: Device = "auto"
    image_size: int = Field(default=56, ge=8)
    max_steps: int | None = Field(default=None, ge=1)

    def resume_fingerprint(self) -> str:
        """Fingerprint of the fields that determine the trained weights."""
        fields = self.to_dict()
        for name in _RESUME_NEUTRAL_FIELDS:
            fields.pop(name)
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass
class TrainingData:
    """A split held in memory, sorted by sample key.

    Attributes:
        keys: sample keys, sorted.
        images: ``[N, 3, s, s]`` uint8 images.
        labels: ``[N]`` int64 class ids.
        targets: ``[N, gh, gw]`` float32 SHAP maps of the label class, or None.
    """

    keys: list[str]
    images: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.keys)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Images in ``[0, 1]``, labels and targets (or None) of the samples at ``index``."""
        images = self.images[index].float().div_(255.0)
        targets = None if self.targets is None else self.targets[index]
        return images, self.labels[index], targets


def _dataset_name(data_storage: Any, split: str) -> str:
    """The single shard-name prefix of ``split`` in a dataset directory."""
    pattern = re.compile(rf"^(?P<name>.+)-{re.escape(split)}-\d{{6}}\.tar$")
    names = {match["name"] for unit in data_storage.completed() if (match := pattern.match(unit))}
    if len(names) != 1:
        found = ", ".join(sorted(names)) or "none"
        raise ValueError(
            f"cannot tell the dataset name of split {split!r} in {data_storage.uri} "
            f"(found: {found}); set data_name"
        )
    return names.pop()


def load_training_data(
    uri: str,
    split: str,
    image_size: int,
    *,
    name: str | None = None,
    require_targets: bool = False,
    grid: tuple[int, int] | None = None,
) -> TrainingData:
    """Read every sample of a split's complete shards into memory, sorted by key.

    Args:
        uri: the dataset directory.
        split: the split to read.
        image_size: side the images are resized to.
        name: shard name prefix (None: the only one in the directory).
        require_targets: refuse a dataset without ``shap.npy`` (X mode).
        grid: expected ``(gh, gw)`` of the SHAP maps.

    Raises:
        ValueError: no complete shard, missing or malformed ``shap.npy`` where required.
    """
    from storage import open_storage
    from storage.shards import complete_shards, read_shard
    from tasks.data.images import sample_to_tensor

    data_storage = open_storage(uri)
    name = name or _dataset_name(data_storage, split)
    shard_keys = complete_shards(data_storage, name, split)
    if not shard_keys:
        raise ValueError(f"dataset {uri} has no complete shard of {name}-{split}")
    samples: dict[str, tuple[torch.Tensor, int, np.ndarray | None]] = {}
    for shard_key in shard_keys:
        for sample in read_shard(data_storage, shard_key):
            tensor = sample_to_tensor(sample, image_size)
            target = None
            if "shap.npy" in sample:
                # The label class comes first (DESIGN: "Which classes").
                target = np.load(io.BytesIO(sample["shap.npy"]), allow_pickle=False)[0]
            samples[sample["__key__"]] = (tensor, int(sample["cls"]), target)
    keys = sorted(samples)
    has_targets = [samples[key][2] is not None for key in keys]
    if require_targets and not all(has_targets):
        raise ValueError(
            f"dataset {uri} ({name}-{split}) has no shap.npy for "
            f"{has_targets.count(False)} of {len(keys)} samples: build an explanation dataset "
            "first (X mode needs Kernel SHAP targets)"
        )
    images = torch.stack([(samples[key][0] * 255.0).round().to(torch.uint8) for key in keys])
    labels = torch.tensor([samples[key][1] for key in keys], dtype=torch.int64)
    targets = None
    if keys and all(has_targets):
        targets = torch.from_numpy(np.stack([samples[key][2] for key in keys])).float()
        if grid is not None and tuple(targets.shape[1:]) != tuple(grid):
            raise ValueError(
                f"shap.npy grid {tuple(targets.shape[1:])} in {uri} does not match grid {grid}"
            )
    logger.info("loaded %d samples of %s-%s from %s", len(keys), name, split, uri)
    return TrainingData(keys=keys, images=images, labels=labels, targets=targets)


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of an epoch: a permutation drawn from ``(seed, epoch)`` only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator)


def explanation_loss(
    attributions: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Mean squared difference of per-image standardised label-class maps and SHAP targets.

    Standardising both sides makes the loss invariant to a positive affine map of either, which
    is why the SEM needs no attribution scale and offset parameters (docs/method.md).

    Args:
        attributions: ``[B, C, gh, gw]`` SEM attributions.
        labels: ``[B]`` label ids.
        targets: ``[B, gh, gw]`` SHAP maps of the label class.
    """
    label_maps = attributions[torch.arange(labels.shape[0], device=labels.device), labels]
    return F.mse_loss(standardize_per_image(label_maps.float()), standardize_per_image(targets))


def pearson_per_image(maps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each ``[gh, gw]`` map with its target: ``[B]``."""
    a = standardize_per_image(maps.float()).flatten(1)
    b = standardize_per_image(targets.float()).flatten(1)
    return (a * b).mean(dim=1)


def _class_names(config: FinetuneConfig) -> list[str]:
    if config.class_names is not None:
        return list(config.class_names)
    from tasks.data.synthetic import SYNTHETIC_DOMAINS

    if config.domain not in SYNTHETIC_DOMAINS:
        raise ValueError(f"domain {config.domain!r} is not synthetic: set class_names")
    return list(SYNTHETIC_DOMAINS[config.domain].class_names)


def build_optimizer(model: SelfExplainingCLIP, config: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW over the trainable image-encoder parameters, weight decay on matrices only."""
    decay, no_decay = [], []
    for name, param in model.clip.visual.named_parameters():
        if not param.requires_grad:
            continue
        # As open_clip's training: no decay on gains, biases, and the token/position embeddings.
        is_embedding = "embedding" in name
        (decay if param.ndim >= 2 and not is_embedding else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-6)


def _lr_factor(step: int, total: int, config: FinetuneConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(
    model: SelfExplainingCLIP, data: TrainingData, batch_size: int = 128
) -> dict[str, float | None]:
    """Accuracy and, where the data has SHAP targets, mean label-class Pearson correlation.

    Args:
        model: the SEM (put in eval mode here, and back).
        data: the split to evaluate.
        batch_size: samples per forward pass.
    """
    was_training = model.training
    model.eval()
    device = model.class_embeddings.device
    correct, pearsons = 0, []
    for start in range(0, len(data), batch_size):
        index = torch.arange(start, min(start + batch_size, len(data)))
        images, labels, targets = data.batch(index)
        logits, maps = model(images.to(device))
        labels = labels.to(device)
        correct += int((logits.argmax(dim=1) == labels).sum())
        if targets is not None:
            pearsons.append(
                pearson_per_image(maps[torch.arange(len(labels)), labels], targets.to(device))
            )
    model.train(was_training)
    return {
        "accuracy": correct / max(1, len(data)),
        "pearson": float(torch.cat(pearsons).mean()) if pearsons else None,
    }


class Finetuner:
    """One fine-tuning run writing under ``storage.child(out_key)``.

    Args:
        config: the run's configuration (validated).
        storage: root storage of the outputs.
        out_key: directory of this run's outputs.
        progress: called as ``progress(step, total_steps)`` after every step.
    """

    def __init__(
        self,
        config: FinetuneConfig,
        storage: Any,
        out_key: str,
        progress: ProgressCallback | None = None,
    ) -> None:
        self.config = config
        self.storage = storage
        self.out_key = out_key.strip("/")
        self.out = storage.child(self.out_key)
        self.progress = progress

    def inputs_fingerprint(self) -> str:
        """What the model depends on: the config and the content of the base weights."""
        base = checkpoint_fingerprint(self.config.base) if self.config.base else None
        return fingerprint_of(self.config.resume_fingerprint(), base)

    def is_complete(self) -> bool:
        """Whether the final model exists, made from these inputs."""
        return self.out.is_done(COMPLETION_UNIT, self.inputs_fingerprint(), MODEL_FILE)

    def result(self, skipped: bool) -> dict[str, Any]:
        """What :func:`finetune` returns for a complete run."""
        from storage.checkpoints import load_sidecar

        sidecar = load_sidecar(self.out, MODEL_FILE)
        return {
            "key": f"{self.out_key}/{MODEL_FILE}",
            "uri": self.out.url(MODEL_FILE),
            "fingerprint": sidecar["fingerprint"],
            "base_fingerprint": sidecar["base_fingerprint"],
            "metrics": sidecar["metrics"],
            "steps": sidecar["step"],
            "skipped": skipped,
        }

    def run(self) -> dict[str, Any]:
        """Train (or resume, or skip when complete) and return the result summary.

        Returns:
            ``key``/``uri`` of the final model, its ``fingerprint``, ``base_fingerprint``,
            per-epoch ``metrics`` rows, ``steps`` and whether it was ``skipped``.
        """
        config = self.config
        if self.is_complete():
            logger.info("fine-tuning %s already complete: skipping", self.out.uri)
            return self.result(skipped=True)
        grid = (config.grid, config.grid)
        train = load_training_data(
            config.data,
            config.split,
            config.image_size,
            name=config.data_name,
            require_targets=config.mode == "X",
            grid=grid,
        )
        val = None
        if config.val_data is not None:
            val = load_training_data(
                config.val_data, config.val_split, config.image_size, grid=grid
            )

        torch.manual_seed(config.seed)
        clip_model = load_clip(config.model_name, config.base)
        base_fingerprint = model_fingerprint(clip_model)
        head = zero_shot_head(
            clip_model, _class_names(config), config.templates, model_name=config.model_name
        )
        device = resolve_device(config.device)
        model = SelfExplainingCLIP(clip_model, head, grid=grid).to(device)
        optimizer = build_optimizer(model, config)

        steps_per_epoch = math.ceil(len(train) / config.batch_size)
        total = config.epochs * steps_per_epoch
        if config.max_steps is not None:
            total = min(total, config.max_steps)
        state = self._resume(model, optimizer, base_fingerprint)
        step, rows, running = state["step"], state["rows"], state["running"]
        logger.info(
            "fine-tuning %s mode %s on %d samples: %d steps (%s)",
            config.domain,
            config.mode,
            len(train),
            total,
            f"resuming at step {step}" if step else "from the start",
        )
        model.train()
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        while step < total:
            epoch, offset = divmod(step, steps_per_epoch)
            order = epoch_order(len(train), config.seed, epoch)
            index = order[offset * config.batch_size : (offset + 1) * config.batch_size]
            images, labels, targets = train.batch(index)
            images, labels = images.to(device), labels.to(device)
            for group in optimizer.param_groups:
                group["lr"] = config.lr * _lr_factor(step, total, config)
            with autocast:
                logits, maps = model(images)
            ce = F.cross_entropy(logits.float(), labels)
            expl = (
                explanation_loss(maps, labels, targets.to(device)) if targets is not None else None
            )
            loss = ce + config.beta * expl if config.mode == "X" else ce
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            running["loss"] += float(loss.detach()) * len(index)
            running["ce"] += float(ce.detach()) * len(index)
            running["expl"] += float(expl.detach()) * len(index) if expl is not None else math.nan
            running["samples"] += len(index)
            if self.progress is not None:
                self.progress(step, total)
            epoch_done = step % steps_per_epoch == 0 or step == total
            if epoch_done:
                rows.append(self._epoch_row(epoch, step, running, model, val))
                running = _new_running()
            if epoch_done or step % config.checkpoint_every == 0:
                self._save_last(model, optimizer, base_fingerprint, step, rows, running)
        return self._finish(model, base_fingerprint, step, rows)

    def _epoch_row(
        self,
        epoch: int,
        step: int,
        running: dict[str, float],
        model: SelfExplainingCLIP,
        val: TrainingData | None,
    ) -> dict[str, Any]:
        samples = max(1.0, running["samples"])
        row: dict[str, Any] = {
            "epoch": epoch,
            "step": step,
            "train_loss": running["loss"] / samples,
            "train_ce": running["ce"] / samples,
            "train_expl": None if math.isnan(running["expl"]) else running["expl"] / samples,
            "val_accuracy": None,
            "val_pearson": None,
        }
        if val is not None:
            scores = evaluate(model, val)
            row["val_accuracy"], row["val_pearson"] = scores["accuracy"], scores["pearson"]
        logger.info("epoch %d: %s", epoch, row)
        return row

    def _save_last(
        self,
        model: SelfExplainingCLIP,
        optimizer: torch.optim.Optimizer,
        base_fingerprint: str,
        step: int,
        rows: list[dict[str, Any]],
        running: dict[str, float],
    ) -> None:
        from storage.checkpoints import save_state_dict

        # The optimizer file goes first and the model's sidecar last: a crash in between leaves
        # two different steps, which _resume detects and refuses instead of mixing them.
        resume_state = {
            "step": step,
            "resume_fingerprint": self.config.resume_fingerprint(),
            "optimizer": optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "running": running,
            "rows": rows,
        }
        buffer = io.BytesIO()
        torch.save(resume_state, buffer)
        self.out.write_bytes(LAST_OPTIM_FILE, buffer.getvalue())
        save_state_dict(
            self.out,
            LAST_FILE,
            model.encoder_state_dict(),
            metadata={
                "step": step,
                "base_fingerprint": base_fingerprint,
                "resume_fingerprint": self.config.resume_fingerprint(),
            },
        )
        logger.debug("checkpoint at step %d in %s", step, self.out.uri)

    def _resume(
        self, model: SelfExplainingCLIP, optimizer: torch.optim.Optimizer, base_fingerprint: str
    ) -> dict[str, Any]:
        from storage.checkpoints import load_sidecar, load_state_dict

        fresh = {"step": 0, "rows": [], "running": _new_running()}
        if not (self.out.exists(LAST_FILE) and self.out.exists(LAST_OPTIM_FILE)):
            return fresh
        sidecar = load_sidecar(self.out, LAST_FILE)
        resume_state = torch.load(
            io.BytesIO(self.out.read_bytes(LAST_OPTIM_FILE)), weights_only=True
        )
        expected = (self.config.resume_fingerprint(), base_fingerprint)
        if (sidecar.get("resume_fingerprint"), sidecar.get("base_fingerprint")) != expected:
            logger.warning(
                "checkpoint in %s is from another config or base: restarting", self.out.uri
            )
            return fresh
        if resume_state["step"] != sidecar.get("step"):
            logger.warning(
                "checkpoint in %s is torn (crash while saving): restarting", self.out.uri
            )
            return fresh
        model.clip.load_state_dict(load_state_dict(self.out, LAST_FILE), strict=True)
        optimizer.load_state_dict(resume_state["optimizer"])
        torch.set_rng_state(resume_state["torch_rng"])
        return resume_state

    def _finish(
        self,
        model: SelfExplainingCLIP,
        base_fingerprint: str,
        step: int,
        rows: list[dict[str, Any]],
    ) -> dict[str, Any]:
        from storage.checkpoints import save_state_dict

        model.eval()
        state = {key: value.detach().cpu() for key, value in model.encoder_state_dict().items()}
        fingerprint = model_fingerprint(model.clip)
        save_state_dict(
            self.out,
            MODEL_FILE,
            state,
            metadata={
                "kind": "finetuned",
                "domain": self.config.domain,
                "mode": self.config.mode,
                "model_name": self.config.model_name,
                "fingerprint": fingerprint,
                "base_fingerprint": base_fingerprint,
                "config": self.config.to_dict(),
                "metrics": rows,
                "step": step,
            },
        )
        self.out.publish_done(
            COMPLETION_UNIT, self.inputs_fingerprint(), model_fingerprint=fingerprint, step=step
        )
        logger.info("fine-tuned model %s written to %s", fingerprint, self.out.url(MODEL_FILE))
        return self.result(skipped=False)


def _new_running() -> dict[str, float]:
    return {"loss": 0.0, "ce": 0.0, "expl": 0.0, "samples": 0.0}


def finetune(
    config: FinetuneConfig,
    storage: Any,
    out_key: str,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Fine-tune the SEM per ``config`` into ``out_key`` (resuming, or skipping when complete).

    Args:
        config: the run's configuration.
        storage: root storage of the outputs.
        out_key: directory of the run (``model.safetensors``, sidecar, checkpoints, marker).
        progress: optional ``progress(step, total_steps)`` callback.

    Returns:
        The summary of :meth:`Finetuner.run`.
    """
    return Finetuner(config, storage, out_key, progress).run()

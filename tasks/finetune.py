"""Fine-tuning the self-explaining CLIP model: prediction only (P) or with explanations (X).

Both modes start from the same base checkpoint, read their training shards as a stream in the
same order (:class:`tasks.data.stream.TrainStream`: shard order and sample shuffle drawn from
``(seed, epoch)``; the same order whenever the P and X datasets share their shard layout) and
run the same forward pass; they differ only in the loss. theta_X - theta_P is then the
explainability vector. Memory holds one batch per decoding worker, never the split.

A run is resumable: at every epoch end, every ``checkpoint_minutes`` of training and, when set,
every ``checkpoint_every`` steps it saves a checkpoint: the model and the optimizer, schedule,
RNG and metrics state, written into the one of two slots (``last-{a,b}.safetensors`` and
``last-{a,b}-optim.pt``) that the record ``last.json`` does not name, then the record naming
it, so a crash mid-write leaves the previous checkpoint usable. On CUDA the write runs in a
background thread from a copy of the state on the host while training goes on
(``checkpoint_async``). A rerun continues from the recorded checkpoint, mid-epoch included (the
seeded stream skips the batches already taken), to bit-identical final weights on CPU. The
final model is ``model.safetensors`` with a JSON sidecar, and its completion marker makes a
rerun a no-op. When and how checkpoints are written never changes the weights.

With ``nproc_per_node * nnodes > 1`` the run is data-parallel: :func:`tasks.distributed.launch`
starts one process per device running :func:`train_rank`, each trains on its share of the
shards under DistributedDataParallel, only rank 0 writes checkpoints and the marker, and no
rank returns before rank 0 has written them.
"""

from __future__ import annotations

import argparse
import functools
import io
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from storage import open_storage
from storage.checkpoints import (
    checkpoint_fingerprint,
    load_sidecar,
    load_state_dict,
    save_state_dict,
)
from storage.fingerprints import fingerprint_of
from tasks.config import resolve_device
from tasks.data.stream import (
    Decoder,
    OrderedStream,
    TrainStream,
    first_sample,
    list_split,
)
from tasks.distributed import launch, rank_device
from tasks.explanation_losses import (
    LabelledGame,
    consistency_loss,
    explanation_term,
    pearson_per_image,
)
from tasks.finetune_config import FinetuneConfig as FinetuneConfig  # no torch; re-exported
from tasks.model import (
    SelfExplainingCLIP,
    load_clip,
    model_fingerprint,
    zero_shot_head,
)
from tasks.model.loading import resolve_class_names

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
#: The record of the latest resumable checkpoint: its step, fingerprints and the files holding
#: it (``load_sidecar(out, LAST_FILE)`` reads it).
LAST_RECORD = "last.json"
#: The files of a record that names none: the layout before checkpoint slots.
LAST_FILE = "last.safetensors"
LAST_OPTIM_FILE = "last-optim.pt"
#: (model, optimizer) files of the two checkpoint slots; a checkpoint goes into the slot the
#: record does not name.
CHECKPOINT_SLOTS = (
    ("last-a.safetensors", "last-a-optim.pt"),
    ("last-b.safetensors", "last-b-optim.pt"),
)
COMPLETION_UNIT = "model"
#: The rank entry of a data-parallel run (:func:`tasks.distributed.launch`).
TRAIN_RANK_ENTRY = "tasks.finetune:train_rank"
ProgressCallback = Callable[[int, int], None]


def training_stream(config: FinetuneConfig, rank: int = 0, world_size: int = 1) -> TrainStream:
    """The training stream of one rank, its first sample checked before any compute.

    Raises:
        ValueError: no complete shard, too few shards for the processes, the batch not
            divisible by them, or (X mode) a dataset without ``shap.npy`` (or ``game.npz``, for
            the game loss) or on another grid.
    """
    if config.batch_size % world_size:
        raise ValueError(
            f"batch_size {config.batch_size} is not divisible by the {world_size} processes"
        )
    split = list_split(config.data, config.split, config.data_name)
    grid = (config.grid, config.grid)
    targets = "require" if config.mode == "X" else "no"
    games = config.mode == "X" and (config.x_loss == "game" or config.game_consistency > 0)
    decoder = Decoder(config.image_size, targets=targets, grid=grid, games=games, where=split.uri)
    if config.mode == "X":
        decoder([first_sample(split)])
    stream = TrainStream(
        split,
        decoder,
        batch_size=config.batch_size // world_size,
        seed=config.seed,
        shuffle_buffer=config.shuffle_buffer,
        num_workers=config.loader_workers,
        rank=rank,
        world_size=world_size,
    )
    logger.info(
        "training stream %s-%s: %d samples in %d shards, %d steps per epoch",
        split.name,
        split.split,
        split.samples,
        len(split.shards),
        stream.steps_per_epoch,
    )
    return stream


def data_fingerprint(config: FinetuneConfig) -> str:
    """What a run depends on beyond its config and base: the content of its training and val
    splits, their shards' sha256 as the completion markers record them (no shard is read).

    The config names the data by URI only, and a domain whose settings change is re-exported in
    place under the same URI: without this, a run on the new data would find the old run's
    model complete, or resume its checkpoints.

    Raises:
        ValueError: a split has no complete shard.
    """
    parts = [list_split(config.data, config.split, config.data_name).fingerprint()]
    if config.val_data is not None:
        parts.append(list_split(config.val_data, config.val_split).fingerprint())
    return fingerprint_of(*parts)


def validation_stream(config: FinetuneConfig, batch_size: int = 128) -> OrderedStream | None:
    """The validation split as an ordered stream (None without ``val_data``)."""
    if config.val_data is None:
        return None
    split = list_split(config.val_data, config.val_split)
    grid = (config.grid, config.grid)
    decoder = Decoder(config.image_size, targets="auto", grid=grid, where=split.uri)
    return OrderedStream(split, decoder, batch_size=batch_size)


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
def evaluate(model: SelfExplainingCLIP, data: OrderedStream) -> dict[str, float | None]:
    """Accuracy and, where the data has SHAP targets, mean label-class Pearson correlation.

    Args:
        model: the SEM (put in eval mode here, and back).
        data: the split to evaluate, streamed batch by batch.
    """
    was_training = model.training
    model.eval()
    device = model.class_embeddings.device
    correct, seen, pearsons = 0, 0, []
    for batch in data.loader():
        logits, maps = model(batch.images.to(device))
        labels = batch.labels.to(device)
        correct += int((logits.argmax(dim=1) == labels).sum())
        seen += len(labels)
        if batch.targets is not None:
            label_maps = maps[torch.arange(len(labels)), labels]
            pearsons.append(pearson_per_image(label_maps, batch.targets.to(device)))
    model.train(was_training)
    return {
        "accuracy": correct / max(1, seen),
        "pearson": float(torch.cat(pearsons).mean()) if pearsons else None,
    }


class CheckpointWriter:
    """Writes one checkpoint at a time, in a background thread or in the caller's.

    Written in the background, a checkpoint's bytes travel to storage while training goes on,
    so what a write reads must be a snapshot that training does not modify (:func:`snapshot`).
    :meth:`submit` first waits for the previous write: checkpoints land in order and at most
    one snapshot is held in memory. A failed write raises at the next :meth:`submit`,
    :meth:`wait` or :meth:`close`, failing the run as a synchronous write would.

    Args:
        asynchronous: write in a background thread.
    """

    def __init__(self, asynchronous: bool) -> None:
        self.asynchronous = asynchronous
        self._executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
            if asynchronous
            else None
        )
        self._pending: Future[None] | None = None

    def submit(self, write: Callable[[], None]) -> None:
        """Run ``write`` after the previous one: in the background, or here and now."""
        self.wait()
        if self._executor is None:
            write()
        else:
            self._pending = self._executor.submit(write)

    def wait(self) -> None:
        """Wait for the write in flight, raising its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        self.close(raise_errors=kind is None)

    def close(self, raise_errors: bool = True) -> None:
        """Wait for the write in flight and stop the thread.

        Args:
            raise_errors: raise a failed write's error; False logs it instead (when the run is
                failing already, its own error is the one to report).
        """
        try:
            self.wait()
        except Exception:
            if raise_errors:
                raise
            logger.exception("a checkpoint write failed while the run was failing")
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)


def snapshot(value: Any) -> Any:
    """A copy of ``value`` on the CPU that later in-place updates of its tensors do not reach.

    Tensors (model parameters, AdamW's moments) are copied, dicts, lists and tuples rebuilt
    around the copies; other values are immutable scalars and strings, shared.
    """
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: snapshot(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(snapshot(item) for item in value)
    return value


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
        # The (model, optimizer) files the record names: the slot the next checkpoint avoids.
        self._recorded_slot: tuple[str, str] | None = None

    @functools.cached_property
    def data_fingerprint(self) -> str:
        """The content of the run's training and val data (:func:`data_fingerprint`)."""
        return data_fingerprint(self.config)

    def inputs_fingerprint(self) -> str:
        """What the model depends on: the config, the base weights' content, the data's."""
        base = checkpoint_fingerprint(self.config.base) if self.config.base else None
        return fingerprint_of(self.config.resume_fingerprint(), base, self.data_fingerprint)

    def is_complete(self) -> bool:
        """Whether the final model exists, made from these inputs."""
        return self.out.is_done(COMPLETION_UNIT, self.inputs_fingerprint(), MODEL_FILE)

    def result(self, skipped: bool) -> dict[str, Any]:
        """What :func:`finetune` returns for a complete run."""
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

        Raises:
            RuntimeError: a data-parallel run failed (a process died or raised); rerunning
                resumes from the last checkpoint.
        """
        if self.is_complete():
            logger.info("fine-tuning %s already complete: skipping", self.out.uri)
            return self.result(skipped=True)
        if self.config.world_size > 1:
            config = self.config
            arguments = ["--config", config.model_dump_json()]
            arguments += ["--storage", self.storage.uri, "--out-key", self.out_key]
            launch(
                TRAIN_RANK_ENTRY,
                arguments,
                config.topology,
                config.device,
                what=f"fine-tuning of {config.domain} ({config.mode})",
            )
            if not self.is_complete():
                raise RuntimeError(f"distributed fine-tuning of {self.out.uri} left no model")
            if self.progress is not None:
                steps = self.result(skipped=False)["steps"]
                self.progress(steps, steps)
            return self.result(skipped=False)
        return self.train()

    def train(
        self, rank: int = 0, world_size: int = 1, device: torch.device | None = None
    ) -> dict[str, Any]:
        """The training loop of one process (of ``world_size``, in an initialised group).

        Only rank 0 evaluates, writes checkpoints, the final model and its marker; under
        :func:`tasks.distributed.launch` no rank returns before every rank is done.

        Args:
            rank: this process's rank.
            world_size: processes in the group.
            device: where to train (default: the config's; a rank's own GPU when data-parallel).
        """
        config = self.config
        data_parallel = world_size > 1
        writer = rank == 0
        if device is None:
            device = rank_device(config.device) if data_parallel else resolve_device(config.device)
        grid = (config.grid, config.grid)
        train = training_stream(config, rank, world_size)
        val = validation_stream(config) if writer else None

        torch.manual_seed(config.seed)
        clip_model = load_clip(config.model_name, config.base)
        base_fingerprint = model_fingerprint(clip_model)
        # The head's prompts go through the text tower where training runs: ImageNet's 1000
        # classes x 4 templates are minutes of a CPU and a moment of a GPU.
        clip_model = clip_model.to(device)
        head = zero_shot_head(
            clip_model,
            resolve_class_names(config.class_names, {}, config.domain),
            config.templates,
            model_name=config.model_name,
        )
        model = SelfExplainingCLIP(clip_model, head, grid=grid).to(device)
        if config.trainable_blocks is not None:
            model.train_last_blocks(config.trainable_blocks)
        optimizer = build_optimizer(model, config)
        labelled = None
        if config.mode == "X" and config.game_consistency > 0:
            labelled = LabelledGame.of_dataset(config.data)
        forward = model
        if data_parallel:
            from torch.nn.parallel import DistributedDataParallel

            forward = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )

        steps_per_epoch = train.steps_per_epoch
        total = config.epochs * steps_per_epoch
        if config.max_steps is not None:
            total = min(total, config.max_steps)
        state = self._resume(model, optimizer, base_fingerprint)
        step, rows, running = state["step"], state["rows"], state["running"]
        logger.info(
            "fine-tuning %s mode %s (rank %d of %d): %d steps (%s)",
            config.domain,
            config.mode,
            rank,
            world_size,
            total,
            f"resuming at step {step}" if step else "from the start",
        )
        asynchronous = config.checkpoint_async
        if asynchronous == "auto":
            asynchronous = device.type == "cuda"
        saved_at = time.monotonic()
        model.train()
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        # Leaving the block waits for the checkpoint in flight, on success and on failure.
        with CheckpointWriter(asynchronous=asynchronous) as checkpoints:
            while step < total:
                epoch, offset = divmod(step, steps_per_epoch)
                train.set_epoch(epoch, skip_batches=offset)
                for batch in train.loader():
                    images, labels = batch.images.to(device), batch.labels.to(device)
                    for group in optimizer.param_groups:
                        group["lr"] = config.lr * _lr_factor(step, total, config)
                    with autocast:
                        logits, maps = forward(images)
                    ce = F.cross_entropy(logits.float(), labels)
                    expl = explanation_term(
                        maps, labels, batch, device, config.x_loss, config.common_map
                    )
                    loss = ce + config.beta * expl if config.mode == "X" else ce
                    if labelled is not None:
                        draw = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
                        with autocast:
                            kept = consistency_loss(
                                model,
                                images,
                                labels,
                                batch.games.to(device),
                                labelled,
                                config.consistency_coalitions,
                                draw,
                            )
                        loss = loss + config.game_consistency * kept
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    step += 1
                    _accumulate(running, loss, ce, expl, len(labels), data_parallel)
                    if self.progress is not None:
                        self.progress(step, total)
                    epoch_done = step % steps_per_epoch == 0 or step == total
                    if epoch_done and writer:
                        evaluated = (epoch + 1) % config.eval_every == 0 or step == total
                        rows.append(
                            self._epoch_row(epoch, step, running, model, val if evaluated else None)
                        )
                    if epoch_done:
                        running = _new_running()
                    # No checkpoint at the last step: the final model follows at once.
                    if writer and step < total and self._checkpoint_due(step, epoch_done, saved_at):
                        self._save_last(
                            model, optimizer, base_fingerprint, step, rows, running, checkpoints
                        )
                        saved_at = time.monotonic()
                    if step == total:
                        break
        if not writer:
            return {"steps": step, "rank": rank}
        return self._finish(model, base_fingerprint, step, rows)

    def _checkpoint_due(self, step: int, epoch_done: bool, saved_at: float) -> bool:
        """Whether a resumable checkpoint is due after ``step``: epoch end, steps or time."""
        every, minutes = self.config.checkpoint_every, self.config.checkpoint_minutes
        return (
            epoch_done
            or (every is not None and step % every == 0)
            or (minutes is not None and time.monotonic() - saved_at >= 60.0 * minutes)
        )

    def _epoch_row(
        self,
        epoch: int,
        step: int,
        running: dict[str, float],
        model: SelfExplainingCLIP,
        val: OrderedStream | None,
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
        checkpoints: CheckpointWriter,
    ) -> None:
        """Hand the checkpoint of ``step`` to ``checkpoints``: what the training loop waits for."""
        # The previous write done, the record names its slot: this one goes into the other.
        checkpoints.wait()
        slot = (
            CHECKPOINT_SLOTS[1]
            if self._recorded_slot == CHECKPOINT_SLOTS[0]
            else CHECKPOINT_SLOTS[0]
        )
        resume_state = {
            "step": step,
            "resume_fingerprint": self.config.resume_fingerprint(),
            "optimizer": optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "running": running,
            "rows": rows,
        }
        tensors = model.encoder_state_dict()
        if checkpoints.asynchronous:
            # Training goes on while the write reads these: AdamW and the model update in place.
            resume_state, tensors = snapshot(resume_state), snapshot(tensors)
        checkpoints.submit(
            lambda: self._write_checkpoint(slot, step, base_fingerprint, tensors, resume_state)
        )

    def _write_checkpoint(
        self,
        slot: tuple[str, str],
        step: int,
        base_fingerprint: str,
        tensors: dict[str, torch.Tensor],
        resume_state: dict[str, Any],
    ) -> None:
        model_key, optim_key = slot
        buffer = io.BytesIO()
        torch.save(resume_state, buffer)
        self.out.write_bytes(optim_key, buffer.getvalue())
        record = {
            "step": step,
            "base_fingerprint": base_fingerprint,
            "resume_fingerprint": self.config.resume_fingerprint(),
            "data_fingerprint": self.data_fingerprint,
            "model": model_key,
            "optimizer": optim_key,
        }
        fingerprint = save_state_dict(self.out, model_key, tensors, metadata=record)
        # The record last: until it names this slot, a rerun resumes from the previous one.
        self.out.write_json(LAST_RECORD, {**record, "state_fingerprint": fingerprint})
        self._recorded_slot = slot
        logger.debug("checkpoint at step %d in %s (%s)", step, self.out.uri, model_key)

    def _resume(
        self, model: SelfExplainingCLIP, optimizer: torch.optim.Optimizer, base_fingerprint: str
    ) -> dict[str, Any]:
        fresh = {"step": 0, "rows": [], "running": _new_running()}
        if not self.out.exists(LAST_RECORD):
            return fresh
        record = self.out.read_json(LAST_RECORD)
        slot = (record.get("model", LAST_FILE), record.get("optimizer", LAST_OPTIM_FILE))
        if slot not in ((LAST_FILE, LAST_OPTIM_FILE), *CHECKPOINT_SLOTS):
            logger.warning("checkpoint record in %s names unknown files: restarting", self.out.uri)
            return fresh
        model_key, optim_key = slot
        if not (self.out.exists(model_key) and self.out.exists(optim_key)):
            logger.warning("checkpoint files named in %s are missing: restarting", self.out.uri)
            return fresh
        resume_state = torch.load(io.BytesIO(self.out.read_bytes(optim_key)), weights_only=True)
        expected = (self.config.resume_fingerprint(), base_fingerprint, self.data_fingerprint)
        found = tuple(
            record.get(name)
            for name in ("resume_fingerprint", "base_fingerprint", "data_fingerprint")
        )
        if found != expected:
            logger.warning(
                "checkpoint in %s is from another config, base or data: restarting", self.out.uri
            )
            return fresh
        if resume_state["step"] != record.get("step"):
            # Only the layout before slots can tear (one pair of files, overwritten in place).
            logger.warning(
                "checkpoint in %s is torn (crash while saving): restarting", self.out.uri
            )
            return fresh
        model.clip.load_state_dict(load_state_dict(self.out, model_key), strict=True)
        optimizer.load_state_dict(resume_state["optimizer"])
        torch.set_rng_state(resume_state["torch_rng"])
        self._recorded_slot = slot
        return resume_state

    def _finish(
        self,
        model: SelfExplainingCLIP,
        base_fingerprint: str,
        step: int,
        rows: list[dict[str, Any]],
    ) -> dict[str, Any]:
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


def _accumulate(
    running: dict[str, float],
    loss: torch.Tensor,
    ce: torch.Tensor,
    expl: torch.Tensor | None,
    samples: int,
    distributed: bool,
) -> None:
    """Add a step's sample-weighted losses; summed over the ranks when data-parallel."""
    values = torch.tensor(
        [
            float(loss.detach()) * samples,
            float(ce.detach()) * samples,
            float(expl.detach()) * samples if expl is not None else math.nan,
            float(samples),
        ],
        dtype=torch.float64,
    )
    if distributed:
        # gloo reduces CPU tensors; nccl needs them on the rank's device.
        device = loss.device if dist.get_backend() == "nccl" else torch.device("cpu")
        values = values.to(device)
        dist.all_reduce(values)
        values = values.cpu()
    for name, value in zip(("loss", "ce", "expl", "samples"), values.tolist(), strict=True):
        running[name] += value


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


def train_rank(argv: list[str], device: torch.device) -> None:
    """One rank of a data-parallel fine-tuning: the entry :func:`tasks.distributed.launch` runs.

    Args:
        argv: ``--config`` (the run's :class:`FinetuneConfig` as JSON), ``--storage`` (URI of
            the output root) and ``--out-key`` (the run's folder under it).
        device: this rank's device.
    """
    parser = argparse.ArgumentParser(prog=TRAIN_RANK_ENTRY, description="one fine-tuning rank")
    parser.add_argument("--config", required=True, help="FinetuneConfig as JSON")
    parser.add_argument("--storage", required=True, help="URI of the output root")
    parser.add_argument("--out-key", required=True, help="the run's folder under --storage")
    args = parser.parse_args(argv)
    config = FinetuneConfig.model_validate_json(args.config)
    finetuner = Finetuner(config, open_storage(args.storage), args.out_key)
    finetuner.train(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)

"""The configuration of a fine-tuning run (:mod:`tasks.finetune` runs it).

Defined apart from the training code, which imports torch, so that the command line can judge a
config in well under a second before anything heavy starts.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from tasks.config import Device, StageConfig
from tasks.model.names import DEFAULT_MODEL, DEFAULT_TEMPLATES

if TYPE_CHECKING:
    from tasks.distributed import Topology

# Fields that may change between an interrupted run and its resumption without changing the
# result (where and how often it saves, where it runs).
_RESUME_NEUTRAL_FIELDS = (
    "checkpoint_every",
    "checkpoint_minutes",
    "checkpoint_async",
    "eval_every",
    "device",
    "node_rank",
    "rdzv_endpoint",
    "rdzv_id",
)

# Fields added after models were trained, with the value every earlier model was trained with.
_LATER_FIELDS = {
    "x_loss": "labels",
    "game_consistency": 0.0,
    "trainable_blocks": None,
    "common_map": 0.0,
}


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
        x_loss: the explanation loss (X mode): ``"labels"``, the paper's regression of the
            standardised map on the Kernel SHAP label (``shap.npy``); or ``"game"``, the
            FastSHAP / ViT-Shapley objective on the coalitions the label was solved from
            (``game.npz``), the map calibrated to each image's game
            (:func:`tasks.explanation_losses.game_loss`).
        game_consistency: weight of the game-consistency term (X mode, 0: none): on a few of
            the coalitions each label was solved from (``game.npz``, ``consistency_coalitions``
            per image and step), theta_X's value of the label class is kept at the labelled
            model's, so that the labels stay true of the model they train
            (:func:`tasks.explanation_losses.consistency_loss`).
        consistency_coalitions: coalitions per image and step of the game-consistency term.
        trainable_blocks: train only the image tower's last this many transformer blocks and
            what follows them (the final norm and projection); None: the whole image encoder.
        common_map: weight of the explanation loss applied also to the map along the head's
            common direction (X mode, 0: none; :func:`tasks.explanation_losses.explanation_term`).
        grid: attribution grid side (``grid x grid`` cells, the SHAP grid).
        seed: seeds the data order and the torch RNG.
        checkpoint_every: steps between resumable checkpoints (None: by time and epoch only).
        checkpoint_minutes: minutes of training between resumable checkpoints (None: by steps
            and epoch only); there is one at every epoch end whatever these two say.
        checkpoint_async: write checkpoints in a background thread from a copy of the state,
            training meanwhile (``"auto"``: when training on CUDA, where the copy to the host is
            quick and the host's cores are free; on CPU the write would compete with training).
        eval_every: evaluate on ``val_data`` after every this many epochs and after the last
            (the weights do not depend on it).
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda[:i]"``.
        image_size: side images are resized to (the model's input size).
        max_steps: caps the total number of steps (the schedule follows the cap).
        shuffle_buffer: samples in the streaming sample-shuffle buffer (0: shard order only).
        loader_workers: ``DataLoader`` decoding processes per training process (0: decode in
            the training process); part of the data order, like the number of processes.
        nproc_per_node: training processes per node (1: train in this process; more: launch
            ``torch.distributed.run``, one process per GPU, or CPU processes on ``gloo``).
        nnodes: nodes of a multi-node run (each node runs this task with its ``node_rank``).
        node_rank: this node's rank in a multi-node run.
        rdzv_endpoint: ``host:port`` of the rendezvous (c10d) of a multi-node run; None on one
            node (a free local port).
        rdzv_id: rendezvous id shared by the nodes of one run.
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
    x_loss: Literal["labels", "game"] = "labels"
    game_consistency: float = Field(default=0.0, ge=0)
    consistency_coalitions: int = Field(default=4, ge=1)
    trainable_blocks: int | None = Field(default=None, ge=1)
    common_map: float = Field(default=0.0, ge=0)
    grid: int = Field(default=7, ge=1)
    seed: int = 0
    checkpoint_every: int | None = Field(default=None, ge=1)
    checkpoint_minutes: float | None = Field(default=10.0, gt=0)
    checkpoint_async: Literal["auto"] | bool = "auto"
    eval_every: int = Field(default=1, ge=1)
    device: Device = "auto"
    image_size: int = Field(default=56, ge=8)
    max_steps: int | None = Field(default=None, ge=1)
    shuffle_buffer: int = Field(default=1000, ge=0)
    loader_workers: int = Field(default=2, ge=0)
    nproc_per_node: int = Field(default=1, ge=1)
    nnodes: int = Field(default=1, ge=1)
    node_rank: int = Field(default=0, ge=0)
    rdzv_endpoint: str | None = None
    rdzv_id: str = "finetune"

    @model_validator(mode="after")
    def _one_device_per_rank(self) -> FinetuneConfig:
        if self.world_size > 1 and re.fullmatch(r"cuda:\d+", self.device):
            raise ValueError(
                f"device {self.device!r} names one GPU, but the {self.world_size} processes of "
                "a data-parallel run each take their own: use 'cuda' or 'auto'"
            )
        return self

    @property
    def world_size(self) -> int:
        """Training processes in all."""
        return self.nproc_per_node * self.nnodes

    @property
    def topology(self) -> Topology:
        """Where the processes of a data-parallel run are."""
        from tasks.distributed import Topology

        return Topology(
            nproc_per_node=self.nproc_per_node,
            nnodes=self.nnodes,
            node_rank=self.node_rank,
            rdzv_endpoint=self.rdzv_endpoint,
            rdzv_id=self.rdzv_id,
        )

    def resume_fingerprint(self) -> str:
        """Fingerprint of the fields that determine the trained weights."""
        fields = self.to_dict()
        for name in _RESUME_NEUTRAL_FIELDS:
            fields.pop(name)
        # Added after models were trained: its default leaves their fingerprints as they were.
        for name, default in _LATER_FIELDS.items():
            if fields[name] == default:
                fields.pop(name)
        if not self.game_consistency:
            fields.pop("consistency_coalitions")
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

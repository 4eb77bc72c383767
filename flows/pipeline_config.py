"""The configuration of the whole pipeline (:mod:`flows.pipeline` runs it).

Defined apart from the flow, which imports torch, open_clip and Prefect, so that the command
line can judge a config and check its domains in well under a second before anything heavy
starts.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from flows.runner_config import RunnerConfig
from tasks.build_dataset.config import LabelConfig
from tasks.config import Device, StageConfig
from tasks.data.domains import DomainPlan, DomainSpec, as_domain_spec, check_domain
from tasks.pretrain_config import SHIPPED, SHIPPED_PRETRAIN, PretrainConfig


class PipelineConfig(StageConfig):
    """The whole pipeline: domains, model, training, labelling and sweep settings.

    The defaults are the embedded default: synthetic domains, the tiny ViT pretrained here,
    local storage, CPU. Real runs set ``base`` to real CLIP weights (a file or s3:// URI).
    """

    out_uri: str
    source: str | DomainSpec = "shapes"
    targets: tuple[str | DomainSpec, ...] = ("glyphs", "colours", "textures", "scenes")
    model_name: str = "tiny-vit-56"
    base: str | None = Field(
        SHIPPED,
        description="pretrained weights URI; 'shipped': the packaged base; None pretrains one",
    )
    pretrain: PretrainConfig = SHIPPED_PRETRAIN
    # Every prediction-only model of the demo, source and targets, reaches 0.9 on val with the
    # shipped base (docs/results.md); references of a model below it would describe noise.
    min_target_accuracy: float = Field(
        0.9,
        ge=0,
        le=1,
        description="val accuracy every prediction-only model must reach, unless min_accuracy "
        "gives its domain its own floor",
    )
    # A real domain's floor follows what its model can reach (ViT-B/32 fine-tuned on ImageNet:
    # about 0.76), not the synthetic domains' 0.9: each is set per domain by name.
    min_accuracy: dict[str, float] = Field(
        {},
        description="val accuracy floor per domain name (source or target), instead of "
        "min_target_accuracy for the domains named",
    )
    # Accuracy is measured on every val and test image (forward passes only): 100 per class.
    # Synthetic images depend only on (domain, split, index), so the first 20 per class of test
    # are the 20 per class of earlier defaults.
    per_class: dict[str, int] = {"train": 64, "val": 100, "test": 100}
    reference_images: dict[str, int] = Field(
        {"val": 30, "test": 100},
        description="images per target in the Kernel SHAP references of each split, rounded "
        "up to whole classes (the first ceil(n / classes) of each class); a split not named "
        "is labelled whole",
    )
    image_size: int = 56
    data_seed: int = 0
    epochs: int = Field(12, ge=1)
    target_epochs: int | None = Field(
        4,
        ge=1,
        description="epochs of the targets' prediction-only models (None: ``epochs``, as the "
        "source's P and X). The embedded default trains them 4: the shipped base already "
        "classifies every built-in domain (docs/results.md); a config of real data sets its own "
        "(configs/digits.json, configs/imagenet-vit-b-32.json: null)",
    )
    target_lr: float | None = Field(
        1e-4,
        gt=0,
        description="peak learning rate of the targets' prediction-only models (None: ``lr``, "
        "as the source's P and X, which share theirs as the vector needs)",
    )
    eval_every: int = Field(
        4,
        ge=1,
        description="fine-tuning evaluates on val after every this many epochs and after the "
        "last (the floor reads the last); on the demo each evaluation costs as much as an epoch",
    )
    loader_workers: int = Field(
        0,
        ge=0,
        description="decoding processes of each fine-tuning's training stream; 0 decodes in the "
        "training process, which on the demo's few hundred small images saves the workers' "
        "start-up at every epoch (about 5 s per demo fine-tuning; 4 s an epoch in a cold "
        "process); give a real dataset several",
    )
    batch_size: int = Field(32, ge=1, description="global batch of every fine-tuning")
    lr: float = Field(
        5e-4,
        gt=0,
        description="peak learning rate of the source's P and X (and of the targets' models "
        "when target_lr is None). The embedded default's 5e-4 with game_consistency 1 is what "
        "won issue 24's probes (docs/results.md); without the term 1e-4 was best",
    )
    beta: float = Field(1.0, ge=0)
    x_loss: Literal["labels", "game"] = Field(
        "labels",
        description="theta_X's explanation loss: labels (the paper's regression on the Kernel "
        "SHAP labels) or game (the FastSHAP / ViT-Shapley objective on the kept coalitions; "
        "needs label.keep_game)",
    )
    game_consistency: float = Field(
        1.0,
        ge=0,
        description="weight of theta_X's game-consistency term: on a few of the coalitions each "
        "label was solved from, theta_X's value is kept at the labelled model's (theta_P's), so "
        "the labels stay true of theta_X; 0: none; needs label.keep_game",
    )
    trainable_blocks: int | None = Field(
        None,
        ge=1,
        description="the source's P and X train only the image tower's last this many "
        "transformer blocks and its final norm and projection, so the vector lives there "
        "(None: the whole image encoder); the targets' models train whole",
    )
    common_map: float = Field(
        0.0,
        ge=0,
        description="weight of theta_X's explanation loss applied also to the map along the "
        "source head's common direction (the mean of its class maps), the part of the head "
        "other domains share; 0: none",
    )
    # Every fine-tuning of the pipeline launches the same way; at these defaults (FinetuneConfig's
    # own) each trains in the flow's process, and the models' fingerprints are those of a config
    # without these fields.
    nproc_per_node: int = Field(
        1,
        ge=1,
        description="fine-tuning processes on the pipeline's node, one per GPU (more than 1: "
        "data-parallel under torch.distributed.run); part of each model's fingerprint",
    )
    nnodes: int = Field(
        1,
        ge=1,
        description="nodes of every fine-tuning; the pipeline's node is rank 0 and each other "
        "node joins each fine-tuning at rdzv_endpoint (docs/orchestration.md)",
    )
    rdzv_endpoint: str | None = Field(
        None, description="host:port of the multi-node rendezvous (c10d), on the pipeline's node"
    )
    rdzv_id: str = Field("finetune", description="rendezvous id shared by the nodes of a run")
    checkpoint_minutes: float | None = Field(
        10.0,
        gt=0,
        description="minutes of training between resumable fine-tuning checkpoints, besides one "
        "at every epoch end (None: epochs and checkpoint_every only); not fingerprinted",
    )
    checkpoint_every: int | None = Field(
        None, ge=1, description="steps between resumable checkpoints too (None: by time only)"
    )
    seed: int = 0
    # 256 masked images per model call: on CPU the tiny model runs ~1.4x faster than at 2048
    # (cache-sized batches; docs/benchmarks.md); the sweep uses the same setting.
    label: LabelConfig = LabelConfig(forward_batch_size=256)
    reference_budget: int = Field(400, ge=2)
    num_shards: int = Field(2, ge=1, description="most shards of a Kernel SHAP reference")
    # A shard is the unit of parallelism and retry: 16 images at the reference budget are 6,400
    # forward passes (seconds on a GPU), so a reference of 1,000 ImageNet images spreads over 63
    # shards, and the embedded default's references (30 and 100 images) keep their 2.
    reference_shard_images: int = Field(
        16,
        ge=1,
        description="images per shard of a reference of the first images of each class: "
        "ceil(images / this) shards, at most num_shards",
    )
    # Fine near 1-2, where the targets' optima and accuracy cliffs lie on the shipped base, and
    # out to 4, where every target loses accuracy: the tolerance, not the grid, bounds lambda*.
    lambdas: tuple[float, ...] = (0.0, 1.0, 1.5, 2.0, 3.0, 4.0)
    # 150: the paper's comparison; 400 (the reference budget, another seed): the reference's
    # reliability, the ceiling of agreement scores. 25, 50 and 100 told nothing the two do not
    # (docs/results.md).
    kernel_shap_budgets: tuple[int, ...] = (150, 400)
    kernel_shap_images: int | None = Field(
        24,
        ge=1,
        description="Kernel SHAP rows (the budget curve, the ceiling, the edited model) on the "
        "first this many test reference images of each target (None: all); the SEM rows and "
        "the lambda differences always use every reference image",
    )
    source_kernel_shap_images: int | None = Field(
        100,
        ge=1,
        description="the source's Kernel SHAP rows in domain (the paper's claim: theta_X's "
        "pass against Kernel SHAP-150 of theta_X, paired over these images) on the first this "
        "many test reference images (None: kernel_shap_images)",
    )
    edited_kernel_shap_budget: int | None = Field(
        150,
        ge=2,
        description="Kernel SHAP of theta_T + lambda* tau at this budget, the yardstick of the "
        "SEM pass's insertion/deletion at lambda* (None: not run)",
    )
    edited_agreement_budgets: tuple[int, ...] = Field(
        (50, 150),
        description="after selection, the SEM pass at lambda* and Kernel SHAP at these budgets, "
        "all of theta_T + lambda* tau, scored against a reference of that edited model on the "
        "Kernel SHAP test images: the budget a transferred map matches (empty: not run)",
    )
    accuracy_tolerance: float = Field(1.0, ge=0)
    auc_steps: int | None = Field(8, ge=1, description="insertion/deletion steps (None: per cell)")
    sweep_name: str = "embedded-default"
    runner: RunnerConfig = RunnerConfig()
    device: Device = "auto"
    decode: Literal["host", "device"] = Field(
        "host",
        description="where the labeller decodes and resizes its input JPEGs (BuildConfig.decode): "
        "host (Pillow) or device (where the model runs: nvjpeg on a GPU, under one core per GPU "
        "for the whole host side; docs/imagenet-x.md)",
    )

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str | DomainSpec) -> str | DomainSpec:
        as_domain_spec(value)
        return value

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, value: tuple[str | DomainSpec, ...]) -> tuple[str | DomainSpec, ...]:
        if not value:
            raise ValueError("targets: give at least one target domain")
        names = [as_domain_spec(t).name for t in value]
        if len(set(names)) != len(names):
            raise ValueError(f"targets: domain names must be unique, got {names}")
        return value

    @field_validator("min_accuracy")
    @classmethod
    def _floors_are_accuracies(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {name: floor for name, floor in value.items() if not 0 <= floor <= 1}
        if bad:
            raise ValueError(f"min_accuracy: floors are val accuracies in [0, 1], got {bad}")
        return value

    @model_validator(mode="after")
    def _one_spec_per_name(self) -> PipelineConfig:
        source = as_domain_spec(self.source)
        for target in self.target_specs:
            if target.name == source.name and target != source:
                raise ValueError(f"domain {source.name!r} is given two different specs")
        names = [spec.name for spec in self.domain_specs()]
        unknown = sorted(set(self.min_accuracy) - set(names))
        if unknown:
            raise ValueError(f"min_accuracy names domains {unknown} that are not in {names}")
        return self

    @model_validator(mode="after")
    def _launchable_finetuning(self) -> PipelineConfig:
        processes = self.nproc_per_node * self.nnodes
        if self.batch_size % processes:
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by the {processes} fine-tuning "
                f"processes (nproc_per_node {self.nproc_per_node} x nnodes {self.nnodes})"
            )
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(
                f"nnodes {self.nnodes} needs rdzv_endpoint: the host:port of the pipeline's "
                "node that every node reaches (c10d rendezvous)"
            )
        return self

    @model_validator(mode="after")
    def _game_loss_has_games(self) -> PipelineConfig:
        if self.x_loss == "game" and not self.label.keep_game:
            raise ValueError(
                "x_loss 'game' trains on the coalitions kept beside each label: set "
                "label.keep_game true (or x_loss 'labels')"
            )
        if self.game_consistency > 0 and not self.label.keep_game:
            raise ValueError(
                "game_consistency compares theta_X with the coalitions kept beside each label: "
                "set label.keep_game true (or game_consistency 0)"
            )
        return self

    def accuracy_floor(self, domain: str) -> float:
        """The val accuracy the prediction-only model of ``domain`` must reach."""
        return self.min_accuracy.get(domain, self.min_target_accuracy)

    @property
    def source_spec(self) -> DomainSpec:
        """The source domain as a spec (a bare name is a built-in synthetic domain)."""
        return as_domain_spec(self.source)

    @property
    def target_specs(self) -> tuple[DomainSpec, ...]:
        """The target domains as specs, in order."""
        return tuple(as_domain_spec(t) for t in self.targets)

    def domain_specs(self) -> list[DomainSpec]:
        """Every domain once: the source, then the targets that are not the source."""
        source = self.source_spec
        return [source, *[t for t in self.target_specs if t.name != source.name]]

    @classmethod
    def miniature(cls, out_uri: str, **changes: Any) -> PipelineConfig:
        """A tiny pipeline (two targets, two lambdas) that runs in a minute or two: for tests."""
        fields: dict[str, Any] = dict(
            out_uri=out_uri,
            targets=("glyphs", "scenes"),
            base=None,
            pretrain=PretrainConfig(per_class=8, val_per_class=4, epochs=1, batch_size=32),
            min_target_accuracy=0.0,
            per_class={"train": 4, "val": 2, "test": 2},
            reference_images={},
            epochs=1,
            target_epochs=None,
            batch_size=8,
            label=LabelConfig(budget=60, images_per_batch=16),
            reference_budget=80,
            lambdas=(0.0, 1.0),
            kernel_shap_budgets=(60,),
            edited_agreement_budgets=(60,),
            auc_steps=8,
            sweep_name="miniature",
        )
        fields.update(changes)
        return cls(**fields)


def check_domains(config: PipelineConfig) -> dict[str, DomainPlan]:
    """Check every domain of the pipeline from listings alone, before any compute.

    Raises:
        ValueError: one line naming the domain and what is wrong (missing path, unknown
            classes, empty split).
    """
    return {spec.name: check_domain(spec) for spec in config.domain_specs()}

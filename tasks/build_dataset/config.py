"""The configuration of an explanation-dataset build: what to label and how."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import Field, model_validator

from tasks.config import Device, StageConfig

InputKind = Literal["synthetic", "imagefolder", "webdataset"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
#: Precisions whose labels are float32's (``auto`` is float32 on every device): they name the
#: same dataset version.
LABEL_EQUIVALENT_PRECISIONS = ("auto", "fp32")


class LabelConfig(StageConfig):
    """How Kernel SHAP labels are computed (DESIGN.md, "Kernel SHAP labelling")."""

    grid_h: int = Field(7, ge=1, le=64)
    grid_w: int = Field(7, ge=1, le=64)
    budget: int = Field(
        150, ge=2, description="model evaluations per image, empty and full included"
    )
    baseline: Literal["mean", "zero", "blur"] = "mean"
    output: Literal["logit", "prob"] = "logit"
    top_k: int = Field(1, ge=0, le=10, description="predicted classes explained beside the label")
    sampler: Literal["leverage", "kernel"] = Field(
        "leverage",
        description="leverage: Leverage SHAP with a shrunk solve (default, most accurate per "
        "evaluation); kernel: shap.KernelExplainer's scheme",
    )
    error_estimate: bool = Field(
        False,
        description="store a bootstrap standard error per attribution (shap_err.npy); costs no "
        "model evaluation",
    )
    shrinkage: float | None = Field(
        None,
        ge=0,
        le=1,
        description="leverage sampler: the solve's largest weight of the population Gram matrix "
        "(None: the default for the budget; 0: plain least squares); a game kept in the "
        "dataset can be solved again with another value without the model",
    )
    front_load: bool = Field(
        False,
        description="leverage sampler below 2P coalition pairs: fill the outer strata (sizes 1, "
        "then 2) first and solve by plain least squares; better in Pearson on small games, "
        "worse in L2 and as a training target on the demo's (docs/benchmarks.md)",
    )
    keep_game: bool = Field(
        True,
        description="store each image's evaluated coalitions and values beside its label "
        "(game.npz, a few KB): the labels can be solved again without the model",
    )
    seed: int = 0
    images_per_batch: int = Field(32, ge=1)
    forward_batch_size: int = Field(2048, ge=1, description="forward rows per model call")
    precision: Precision = Field(
        "auto",
        description="of the masked forwards: auto = float32 on every device (reduced precision "
        "measured to move labels far more than the estimator's own error); bf16 and fp16 ask "
        "for that autocast (logit head in float32) and name their own dataset version",
    )

    @property
    def grid(self) -> tuple[int, int]:
        return (self.grid_h, self.grid_w)

    def canonical_json(self) -> str:
        """The settings that define the labels (:meth:`fingerprint`, hence the version).

        ``precision`` is left out when it is ``"auto"`` or ``"fp32"``: both are float32 on every
        device (CPU and GPU float32 labels differ in their last bits and share a version), so
        the versions made before the setting existed are still found.
        """
        data = self.model_dump(mode="json")
        if data["precision"] in LABEL_EQUIVALENT_PRECISIONS:
            del data["precision"]
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @model_validator(mode="after")
    def _budget_covers_players(self) -> LabelConfig:
        if self.error_estimate and self.sampler != "leverage":
            raise ValueError("error_estimate needs sampler='leverage'")
        if self.shrinkage is not None and self.sampler != "leverage":
            raise ValueError("shrinkage needs sampler='leverage'")
        if self.front_load and self.sampler != "leverage":
            raise ValueError("front_load needs sampler='leverage'")
        players = self.grid_h * self.grid_w
        if players < 2:
            raise ValueError(f"grid {self.grid} has fewer than 2 cells")
        if self.budget <= players:
            raise ValueError(
                f"budget {self.budget} is not larger than the number of players {players} "
                f"(grid {self.grid_h}x{self.grid_w}): Kernel SHAP needs at least players + 1 "
                "model evaluations per image"
            )
        return self


class BuildConfig(StageConfig):
    """One explanation-dataset build: input, explained model, labelling, layout, output."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.]*(?:-[A-Za-z0-9_.]+)*$")
    split: str = Field("train", pattern=r"^[A-Za-z0-9_]+$")
    input_kind: InputKind = "synthetic"
    input_uri: str = Field(description="synthetic: a domain name; otherwise a folder URI")
    input_name: str | None = Field(None, description="webdataset: dataset name of the shards")
    input_split: str | None = Field(None, description="input split (default: split)")
    class_names_file: str | None = None
    synthetic_seed: int = 0
    synthetic_per_class: int | None = Field(None, ge=1)
    max_per_class: int | None = Field(
        None,
        ge=1,
        description="label only the first N images of each class of the input split, in input "
        "order (None: all); part of the dataset version when set",
    )
    image_size: int = Field(56, ge=16, le=1024)
    model_name: str = "tiny-vit-56"
    checkpoint: str | None = Field(
        None, description="URI of the explained model's weights (theta_P, or the base model)"
    )
    label: LabelConfig = LabelConfig()
    num_shards: int = Field(
        4,
        ge=1,
        description="output shards, one labelling task each; under preserve_layout the "
        "number of labelling tasks, each labelling a group of consecutive input shards",
    )
    preserve_layout: bool = Field(
        False,
        description="webdataset input: one output shard per input shard, same samples in the "
        "same order, so P and X stream in the same order; the input's layout wins over "
        "num_shards, which then sets how many tasks share the shards (at most one per shard)",
    )
    output_uri: str
    device: Device = "auto"
    decode_workers: int | None = Field(
        None,
        ge=1,
        le=256,
        description=(
            "threads that read and decode inputs ahead of the model (1: inline, in the "
            "labeller's thread); default: the cores per accelerator, at most 8. It does not "
            "change the output, so it is not part of the dataset version"
        ),
    )

    decode: Literal["host", "device"] = Field(
        "host",
        description=(
            "where the labeller decodes and resizes input images: 'host' (Pillow, in "
            "decode_workers threads), or 'device' (JPEGs decoded where the model runs: nvjpeg "
            "on a GPU, libjpeg-turbo on the CPU; resized there; other formats and CMYK JPEGs "
            "still on the host). Pixels differ by at most 1/255 from the host's, so 'device' is "
            "part of the dataset version"
        ),
    )

    @model_validator(mode="after")
    def _layout_needs_shards(self) -> BuildConfig:
        if self.preserve_layout and self.input_kind != "webdataset":
            raise ValueError("preserve_layout needs WebDataset input (input_kind='webdataset')")
        if self.preserve_layout and self.max_per_class is not None:
            raise ValueError(
                "preserve_layout keeps whole input shards; it cannot be combined with max_per_class"
            )
        return self

    @property
    def source_split(self) -> str:
        return self.input_split or self.split

"""What a sweep is: its typed configuration, its targets and the schema of its table."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Literal

import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from storage import Storage, layout, open_storage
from tasks.config import Device, StageConfig

QUALITY_METRICS = ("pearson", "spearman", "topk", "insertion_auc", "deletion_auc", "pointing")
# Lower is better for these; every other quality metric is "higher is better".
LOWER_IS_BETTER = frozenset({"deletion_auc"})
# Settings that change where or how fast the sweep runs, never its numbers.
_RESULT_NEUTRAL_FIELDS = (
    "device",
    "batch_size",
    "forward_batch_size",
    "output_uri",
    "name",
    "reference_budget",
)

# TargetSpec fields added later: left out of fingerprints while unset.
_OPTIONAL_TARGET_FIELDS = ("accuracy_data", "accuracy_name")

TABLE_SCHEMA = pa.schema(
    [
        ("target", pa.string()),
        ("related", pa.bool_()),
        ("method", pa.string()),
        ("lambda", pa.float64()),
        ("inferences", pa.int64()),
        ("split", pa.string()),
        ("images", pa.int64()),
        ("accuracy_images", pa.int64()),
        ("accuracy", pa.float64()),
        ("pearson", pa.float64()),
        ("spearman", pa.float64()),
        ("topk", pa.float64()),
        ("insertion_auc", pa.float64()),
        ("deletion_auc", pa.float64()),
        ("pointing", pa.float64()),
        ("chosen", pa.bool_()),
        ("role", pa.string()),
    ]
)


class TargetSpec(StageConfig):
    """One target domain of a sweep.

    Attributes:
        domain: the target domain's name (the ``target`` column of the table).
        model: URI of theta_T's ``model.safetensors`` or of its fine-tuning run directory.
        class_names: the head's classes in label order (None: from theta_T's fine-tuning config,
            else the synthetic domain's).
        val_reference: URI of the X-dataset version folder holding the Kernel SHAP reference of
            theta_T on the validation split (None only for the source role).
        test_reference: the same for the test split.
        related: whether the domain is related to the source (informational, kept in the table).
        accuracy_data: URI of the target's labelled WebDataset folder (what theta_T was
            fine-tuned and validated on): accuracy is then measured on its whole val and test
            splits, forward passes only, instead of on the reference's images (None).
        accuracy_name: the shard dataset name in ``accuracy_data`` (None: the only one).
        role: ``"target"``: a transfer target, evaluated at every lambda with lambda chosen on
            val; ``"source"``: the source domain's own theta_X (``model``), evaluated in domain
            at lambda 0 only (no vector is added), on test only: how well the SEM explains the
            model it was trained on, against Kernel SHAP of the same model.
    """

    domain: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    model: str
    class_names: tuple[str, ...] | None = None
    val_reference: str | None = None
    test_reference: str
    related: bool = True
    accuracy_data: str | None = None
    accuracy_name: str | None = None
    role: Literal["target", "source"] = "target"

    def fingerprint_dict(self) -> dict:
        """:meth:`to_dict` without the optional fields left at their defaults, so that specs
        written before those fields existed keep their fingerprints."""
        fields = self.to_dict()
        for name in _OPTIONAL_TARGET_FIELDS:
            if fields.get(name) is None:
                fields.pop(name, None)
        if fields.get("role") == "target":
            fields.pop("role")
        return fields

    @model_validator(mode="after")
    def _val_reference_of_targets(self) -> TargetSpec:
        if self.role == "target" and self.val_reference is None:
            raise ValueError(
                f"target {self.domain!r}: val_reference is required (lambda is chosen on val)"
            )
        return self

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits this target is evaluated on."""
        return ("test",) if self.role == "source" else ("val", "test")

    def lambdas(self, grid: tuple[float, ...]) -> tuple[float, ...]:
        """The lambdas this target is evaluated at: the sweep's grid, or 0 alone for a source."""
        return (0.0,) if self.role == "source" else grid


class SweepConfig(StageConfig):
    """Configuration of one transfer sweep.

    Attributes:
        name: the sweep's name; outputs go to ``{output_uri}/sweeps/{name}/``.
        vector: URI of the explainability vector (``.safetensors`` with its sidecar).
        targets: the target domains.
        lambdas: the scales of the vector; finite, increasing, 0 included.
        kernel_shap_budgets: Kernel SHAP budgets (model inferences per image) of the baseline.
        kernel_shap_splits: splits the Kernel SHAP baseline is evaluated on.
        kernel_shap_images: evaluate the Kernel SHAP baseline on the first this many images of
            each split's reference only (None: all). Its rows are a budget curve and the
            reference's reliability, means that need fewer images than the paired lambda
            differences; the SEM rows always use every reference image.
        source_kernel_shap_images: the same for the source's rows in domain (the paper's
            claim, theta_X's pass against Kernel SHAP-150 of theta_X, paired over these
            images); None: ``kernel_shap_images``.
        accuracy_tolerance: largest accepted validation accuracy drop from lambda = 0, in
            accuracy points (1.0 = one percentage point).
        selection_metric: the explanation-quality metric lambda is selected on.
        topk: cells of the top-k overlap.
        grid: attribution grid side (``grid x grid`` cells); must match the references.
        baseline: what a removed cell shows, for Kernel SHAP and insertion/deletion: ``"mean"``
            (the reference dataset's stored per-channel mean), ``"zero"`` or ``"blur"``.
        output: the value Kernel SHAP explains (``"logit"`` or ``"prob"``).
        auc_output: the score insertion/deletion curves follow (``"prob"``: AUCs in [0, 1]).
        auc_steps: insertion/deletion steps (None: one cell per step).
        seed: seeds the Kernel SHAP baseline (always different coalitions from the reference's).
        heatmap_images: test images drawn in the heatmap figure of each target.
        max_images: cap on the images read per split (the first in shard order; None: all).
        batch_size: images per SEM forward pass and per evaluation chunk.
        forward_batch_size: masked inputs per model call (Kernel SHAP, insertion/deletion).
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda[:i]"``.
        output_uri: root of the outputs.
        allow_different_base: apply the vector to a theta_T from another pretrained base.
        reference_budget: the references' Kernel SHAP budget, for the report only: a Kernel SHAP
            row at that budget (another seed) measures the reference's reliability.
        edited_kernel_shap_budget: after selection, explain the *edited* model
            theta_T + lambda* tau by Kernel SHAP at this budget on the Kernel SHAP test images
            (a ``kernel_shap_edited`` row at lambda*): the insertion/deletion that a faithful
            explanation of the very model the SEM pass explains reaches (None: not run).
        edited_agreement_budgets: after selection, score the SEM pass at lambda* and Kernel
            SHAP at each of these budgets, both of the edited model, against a reference of the
            edited model itself (at the reference's budget, on the Kernel SHAP test images):
            the budget the transferred single pass matches (empty: not run).
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    vector: str
    targets: tuple[TargetSpec, ...] = Field(min_length=1)
    lambdas: tuple[float, ...] = tuple(i * 0.25 for i in range(9))
    kernel_shap_budgets: tuple[int, ...] = (25, 50, 100, 150, 300)
    kernel_shap_splits: tuple[Literal["val", "test"], ...] = ("test",)
    kernel_shap_images: int | None = Field(None, ge=1)
    source_kernel_shap_images: int | None = Field(None, ge=1)
    accuracy_tolerance: float = Field(1.0, ge=0)
    selection_metric: Literal[
        "pearson", "spearman", "topk", "insertion_auc", "deletion_auc", "pointing"
    ] = "pearson"
    topk: int = Field(5, ge=1)
    grid: int = Field(7, ge=1)
    baseline: Literal["mean", "zero", "blur"] = "mean"
    output: Literal["logit", "prob"] = "logit"
    auc_output: Literal["logit", "prob"] = "prob"
    auc_steps: int | None = Field(None, ge=1)
    seed: int = Field(0, ge=0)
    heatmap_images: int = Field(6, ge=0)
    max_images: int | None = Field(None, ge=1)
    batch_size: int = Field(64, ge=1)
    forward_batch_size: int = Field(1024, ge=1)
    device: Device = "auto"
    output_uri: str
    allow_different_base: bool = False
    reference_budget: int | None = None
    edited_kernel_shap_budget: int | None = Field(None, ge=2)
    edited_agreement_budgets: tuple[int, ...] = ()

    @field_validator("lambdas")
    @classmethod
    def _check_lambdas(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value:
            raise ValueError("lambdas is empty")
        if not all(math.isfinite(v) for v in value):
            raise ValueError(f"lambdas must be finite, got {value}")
        if any(b <= a for a, b in zip(value, value[1:], strict=False)):
            raise ValueError(f"lambdas must be strictly increasing, got {value}")
        if 0.0 not in value:
            raise ValueError(
                "lambdas must include 0.0 (the prediction-only target is the baseline)"
            )
        return value

    @field_validator("kernel_shap_budgets", "edited_agreement_budgets")
    @classmethod
    def _check_budgets(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(b < 2 for b in value):
            raise ValueError(
                f"Kernel SHAP budgets count empty and full coalitions: >= 2, got {value}"
            )
        if len(set(value)) != len(value):
            raise ValueError(f"Kernel SHAP budgets repeat: {value}")
        return tuple(sorted(value))

    @model_validator(mode="after")
    def _check_targets(self) -> SweepConfig:
        domains = [t.domain for t in self.targets]
        repeated = sorted({d for d in domains if domains.count(d) > 1})
        if repeated:
            raise ValueError(f"targets repeat domains: {repeated}")
        if self.topk > self.grid * self.grid:
            raise ValueError(f"topk {self.topk} exceeds the {self.grid * self.grid} grid cells")
        if self.auc_steps is not None and self.auc_steps > self.grid * self.grid:
            raise ValueError(f"auc_steps {self.auc_steps} exceeds the grid cells")
        return self

    def target(self, domain: str) -> TargetSpec:
        """The target spec of ``domain``.

        Raises:
            KeyError: no target has that domain.
        """
        for spec in self.targets:
            if spec.domain == domain:
                return spec
        raise KeyError(f"sweep {self.name!r} has no target {domain!r}")

    def evaluations_per_target(self, target: str) -> int:
        """Evaluations of one target, the unit of the sweep's progress.

        The SEM at each of the target's lambdas on each of its splits, Kernel SHAP at each
        budget on each of ``kernel_shap_splits`` it has, and the edited model's Kernel SHAP
        (its reference, SEM and budgets of ``edited_agreement_budgets`` included).
        """
        spec = self.target(target)
        shap_splits = [s for s in self.kernel_shap_splits if s in spec.splits]
        edited = int(self.edited_kernel_shap_budget is not None and spec.role == "target")
        if self.edited_agreement_budgets and spec.role == "target":
            edited += 2 + len(self.edited_agreement_budgets)
        return (
            len(spec.splits) * len(spec.lambdas(self.lambdas))
            + len(self.kernel_shap_budgets) * len(shap_splits)
            + edited
        )

    def result_fingerprint(self, *, target: str | None = None) -> str:
        """Fingerprint of what determines the numbers (of one target's rows when given)."""
        fields = self.to_dict()
        for name in _RESULT_NEUTRAL_FIELDS:
            fields.pop(name)
        if target is not None:
            fields.pop("heatmap_images")
            fields["targets"] = [self.target(target).fingerprint_dict()]
            if self.target(target).role != "source":
                # only the source's rows in domain are on those images
                fields["source_kernel_shap_images"] = None
        else:
            fields["targets"] = [spec.fingerprint_dict() for spec in self.targets]
        for optional in (
            "kernel_shap_images",
            "source_kernel_shap_images",
            "edited_kernel_shap_budget",
        ):
            if fields[optional] is None:
                fields.pop(optional)
        if not fields["edited_agreement_budgets"]:
            fields.pop("edited_agreement_budgets")
        # Kept byte-for-byte as before so that sweeps stored by earlier versions still match.
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def sweep_storage(config: SweepConfig) -> Storage:
    """Where a sweep's outputs live: ``{output_uri}/sweeps/{name}``."""
    return open_storage(config.output_uri).child(layout.sweep_key(config.name))

"""Stage 4's steps, as an orchestrator runs them: validate, one target at a time, assemble.

1. :func:`validate_sweep` loads the vector and every target model and refuses mismatched keys,
   shapes or pretrained bases before any evaluation;
2. :func:`sweep_target` evaluates one target, selects its lambda, writes its rows and heatmaps
   (skipped when it is done for the same settings and inputs);
3. :func:`tasks.sweep.report.assemble_sweep` writes the table, the plot and the summary.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pyarrow as pa

from storage import layout
from tasks.algorithms.vectors import ExplainabilityVector
from tasks.data.stream import list_split
from tasks.sweep.accuracy import AccuracyData, load_accuracy_data
from tasks.sweep.config import TABLE_SCHEMA, SweepConfig, TargetSpec, sweep_storage
from tasks.sweep.evaluation import (
    ProgressCallback,
    evaluate_edited_agreement,
    evaluate_edited_kernel_shap,
    evaluate_target,
)
from tasks.sweep.inputs import (
    EvalData,
    TargetModel,
    check_reference,
    check_vector,
    has_reference,
    load_reference,
    load_target,
    load_vector,
    target_fingerprint,
)
from tasks.sweep.report import TargetOutcome, heatmap_png
from tasks.sweep.selection import mark_chosen

logger = logging.getLogger(__name__)


def target_unit(target: str) -> str:
    """The completion unit of one target's rows."""
    return f"target-{target}"


def validate_sweep(config: SweepConfig) -> dict[str, Any]:
    """Check the vector against every target model before any evaluation.

    Loads the vector and each theta_T (CPU) and runs the vector's key, shape and base checks,
    and checks that each reference exists.

    Returns:
        ``{"vector": vector description, "targets": {domain: theta_T fingerprint}}``.

    Raises:
        ValueError: the first mismatch found, naming the target.
    """
    vector = load_vector(config.vector)
    fingerprints = {}
    for spec in config.targets:
        target = load_target(spec, config.grid, "cpu")
        try:
            check_vector(vector, target, allow_different_base=config.allow_different_base)
        except ValueError as exc:
            raise ValueError(
                f"vector {config.vector} cannot be applied to {spec.domain!r}: {exc}"
            ) from exc
        for uri in (spec.val_reference, spec.test_reference):
            if uri is not None and not has_reference(uri):
                raise ValueError(f"target {spec.domain!r}: no reference dataset at {uri}")
        if spec.accuracy_data is not None:
            for split in spec.splits:
                try:
                    list_split(spec.accuracy_data, split, spec.accuracy_name)
                except ValueError as exc:
                    raise ValueError(f"target {spec.domain!r}: accuracy data: {exc}") from exc
        fingerprints[spec.domain] = target.fingerprint
    return {"vector": repr(vector), "targets": fingerprints}


def load_target_data(
    config: SweepConfig, spec: TargetSpec, model: TargetModel
) -> tuple[dict[str, EvalData], dict[str, AccuracyData] | None]:
    """A target's references per split, checked against theta_T, and its accuracy data.

    Returns:
        ``(data, accuracy)``: split -> reference, and split -> the whole split accuracy is
        measured on (None when the target names no accuracy data).

    Raises:
        ValueError: a reference that does not fit theta_T.
    """
    references = {"val": spec.val_reference, "test": spec.test_reference}
    data = {
        split: load_reference(references[split], max_images=config.max_images)
        for split in spec.splits
    }
    for split_data in data.values():
        check_reference(split_data, model, spec, config.grid)
    if spec.accuracy_data is None:
        return data, None
    accuracy = {
        split: load_accuracy_data(
            spec.accuracy_data,
            split,
            name=spec.accuracy_name,
            image_size=data[split].image_size,
            max_images=config.max_images,
        )
        for split in spec.splits
    }
    return data, accuracy


def sweep_target(
    config: SweepConfig,
    target: str,
    *,
    vector: ExplainabilityVector | None = None,
    progress: ProgressCallback | None = None,
    overwrite: bool = False,
) -> TargetOutcome:
    """Evaluate one target at every lambda and Kernel SHAP budget, and select its lambda.

    Writes ``targets/{target}.parquet`` (its rows) and ``heatmaps-{target}.png`` (test images
    with the SEM's label-class maps at lambda 0 and at the chosen lambda) under the sweep folder,
    then the target's completion marker; a target done with the same settings, vector and
    theta_T is read back instead of recomputed.

    Args:
        config: the sweep.
        target: the domain of one of ``config.targets``.
        vector: the loaded vector (None: read from ``config.vector``).
        progress: called as ``progress(done, config.evaluations_per_target(target))`` after
            each evaluation.
        overwrite: recompute even when done.

    Raises:
        ValueError: vector and theta_T mismatch, or a reference that does not fit theta_T.
    """
    spec = config.target(target)
    out = sweep_storage(config)
    fingerprint = target_fingerprint(config, target)
    unit, rows_key = target_unit(target), layout.sweep_target_rows_key(target)
    if not overwrite and out.is_done(unit, fingerprint, rows_key):
        info = out.completion_info(unit)
        logger.info("sweep %s: target %s already complete, skipped", config.name, target)
        rows = out.read_parquet(rows_key).to_pylist()
        per_image_key = layout.sweep_target_per_image_key(target)
        if out.exists(per_image_key):
            for row, values in zip(rows, out.read_json(per_image_key), strict=True):
                row["per_image"] = values
        return TargetOutcome(
            target=target,
            rows=rows,
            chosen_lambda=float(info["chosen_lambda"]),
            heatmap_key=info.get("heatmap_key"),
            seconds=float(info.get("seconds", 0.0)),
            skipped=True,
        )
    started = time.perf_counter()
    vector = vector if vector is not None else load_vector(config.vector)
    model = load_target(spec, config.grid, config.device)
    check_vector(vector, model, allow_different_base=config.allow_different_base)
    data, accuracy = load_target_data(config, spec, model)
    n_heat = min(config.heatmap_images, len(data["test"]))
    rows, heat_maps = evaluate_target(
        config,
        spec,
        model,
        vector,
        data,
        heatmap_images=n_heat,
        progress=progress,
        accuracy_data=accuracy,
    )
    if spec.role == "source":
        # Evaluated in domain at lambda 0 only: nothing to choose.
        chosen = 0.0
        for row in rows:
            row["chosen"] = row["method"] == "sem"
    else:
        chosen = mark_chosen(
            rows, metric=config.selection_metric, tolerance=config.accuracy_tolerance
        )
    logger.info("sweep %s: target %s chose lambda %g on validation", config.name, target, chosen)
    if config.edited_kernel_shap_budget is not None and spec.role == "target":
        edited = evaluate_edited_kernel_shap(
            config, spec, model, vector, data["test"], chosen, rows
        )
        rows.append(edited)
    if config.edited_agreement_budgets and spec.role == "target":
        rows += evaluate_edited_agreement(config, spec, model, vector, data["test"], chosen)
    edited_runs = config.edited_kernel_shap_budget is not None or config.edited_agreement_budgets
    if progress is not None and spec.role == "target" and edited_runs:
        total = config.evaluations_per_target(target)
        progress(total, total)

    heatmap_key = None
    if n_heat:
        heatmap_key = layout.sweep_heatmap_key(target)
        out.write_bytes(heatmap_key, heatmap_png(data["test"], slice(0, n_heat), heat_maps, chosen))
    out.write_parquet(rows_key, pa.Table.from_pylist(rows, schema=TABLE_SCHEMA))
    out.write_json(
        layout.sweep_target_per_image_key(target), [row.get("per_image") for row in rows]
    )
    seconds = time.perf_counter() - started
    out.publish_done(
        unit, fingerprint, chosen_lambda=chosen, heatmap_key=heatmap_key, seconds=seconds
    )
    return TargetOutcome(target, rows, chosen, heatmap_key, seconds=seconds)

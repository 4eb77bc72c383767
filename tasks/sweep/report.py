"""What a sweep writes at the end: the table, the plot, the summary and its completion marker.

:func:`assemble_sweep` gathers the targets' rows into ``results.parquet``, draws ``sweep.png``
and summarises each target in ``summary.json`` (lambda 0 against the chosen lambda, SEM against
Kernel SHAP), then marks the sweep done; :func:`load_sweep` reads a done sweep back.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import torch
from torch import Tensor

from storage import layout, open_file
from tasks.sweep.config import QUALITY_METRICS, TABLE_SCHEMA, SweepConfig, sweep_storage
from tasks.sweep.inputs import EvalData, head_alignment, inputs_fingerprint
from tasks.sweep.markdown import render_report

logger = logging.getLogger(__name__)

RESULTS_FILE = layout.SWEEP_RESULTS_FILE
PLOT_FILE = layout.SWEEP_PLOT_FILE
SUMMARY_FILE = layout.SWEEP_SUMMARY_FILE
REPORT_FILE = layout.SWEEP_REPORT_FILE
RESULTS_UNIT = "results"


@dataclass
class TargetOutcome:
    """The rows of one target and where its figures are.

    Attributes:
        target: the target domain.
        rows: table rows (SEM per lambda and split, Kernel SHAP per budget and split).
        chosen_lambda: the lambda selected on validation.
        heatmap_key: key of ``heatmaps-{target}.png`` under the sweep folder (None: no images).
        seconds: evaluation time.
        skipped: whether stored results were reused.
    """

    target: str
    rows: list[dict[str, Any]]
    chosen_lambda: float
    heatmap_key: str | None
    seconds: float = 0.0
    skipped: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (what a flow task returns)."""
        return {
            "target": self.target,
            "rows": self.rows,
            "chosen_lambda": self.chosen_lambda,
            "heatmap_key": self.heatmap_key,
            "seconds": self.seconds,
            "skipped": self.skipped,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TargetOutcome:
        """The inverse of :meth:`to_dict`."""
        return cls(**dict(data))


@dataclass
class SweepResult:
    """A complete sweep.

    Attributes:
        rows: the table as row dicts.
        table: the table (:data:`TABLE_SCHEMA`).
        chosen: target -> lambda selected on validation.
        summary: what ``summary.json`` holds.
        uris: ``table``, ``plot``, ``summary`` and ``heatmaps`` (target -> URI).
        skipped: whether a complete sweep was read back instead of run.
    """

    rows: list[dict[str, Any]]
    table: pa.Table
    chosen: dict[str, float]
    summary: dict[str, Any]
    uris: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False


def read_output(uri: str) -> bytes:
    """The bytes of one output of a sweep, by the URI recorded in :attr:`SweepResult.uris`."""
    storage, key = open_file(uri)
    return storage.read_bytes(key)


def heatmap_png(data: EvalData, index: slice, maps: Mapping[float, Tensor], chosen: float) -> bytes:
    """Test images with their SEM label-class maps at lambda 0 and at the chosen lambda.

    Args:
        data: the test split.
        index: the images drawn.
        maps: lambda -> ``[n, gh, gw]`` maps of those images.
        chosen: the chosen lambda (one row of figures when 0).
    """
    from tasks.sweep.plots import heatmap_overlay

    batch = data.head(index.stop)
    images = batch.images
    names = [data.class_names[int(c)] if data.class_names else str(int(c)) for c in batch.labels]
    shown = [0.0] if chosen == 0.0 else [0.0, chosen]
    return heatmap_overlay(
        torch.cat([images] * len(shown)),
        torch.cat([maps[coef] for coef in shown]),
        titles=[f"{name} λ={coef:g}" for coef in shown for name in names],
        ncols=len(names),
    )


def _metrics(row: Mapping[str, Any] | None) -> dict[str, float] | None:
    if row is None:
        return None
    return {name: row[name] for name in ("accuracy", *QUALITY_METRICS)}


def summarise_target(rows: list[dict[str, Any]], chosen: float) -> dict[str, Any]:
    """One target's summary: lambda 0 against the chosen lambda, and SEM against Kernel SHAP.

    ``sem_matches_kernel_shap_budget`` is the largest test budget whose Kernel SHAP Pearson
    agreement the single SEM pass at the chosen lambda matches or beats (None: none).
    """

    def sem(split: str, coef: float) -> dict[str, Any] | None:
        found = [
            r for r in rows if r["method"] == "sem" and r["split"] == split and r["lambda"] == coef
        ]
        return found[0] if found else None

    test_chosen = sem("test", chosen)
    kernel_shap = {}
    for row in rows:
        if row["method"] == "kernel_shap":
            kernel_shap.setdefault(row["split"], {})[str(row["inferences"])] = _metrics(row)
    matched = None
    if test_chosen is not None and math.isfinite(test_chosen["pearson"]):
        for budget, scores in sorted(
            kernel_shap.get("test", {}).items(), key=lambda kv: int(kv[0])
        ):
            if math.isfinite(scores["pearson"]) and scores["pearson"] <= test_chosen["pearson"]:
                matched = int(budget)
    return {
        "related": rows[0]["related"] if rows else None,
        "role": rows[0].get("role", "target") if rows else None,
        "chosen_lambda": chosen,
        "val": {"lambda_0": _metrics(sem("val", 0.0)), "chosen": _metrics(sem("val", chosen))},
        "test": {"lambda_0": _metrics(sem("test", 0.0)), "chosen": _metrics(test_chosen)},
        "kernel_shap": kernel_shap,
        "sem_matches_kernel_shap_budget": matched,
    }


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def assemble_sweep(config: SweepConfig, outcomes: Sequence[TargetOutcome]) -> SweepResult:
    """Write the table, the plot and the summary of a sweep, then its completion marker.

    Args:
        config: the sweep.
        outcomes: one per target, from :func:`tasks.sweep.stage.sweep_target`.

    Raises:
        ValueError: an outcome is missing for some target.
    """
    from tasks.sweep.plots import plot_sweep

    out = sweep_storage(config)
    by_target = {o.target: o for o in outcomes}
    missing = [t.domain for t in config.targets if t.domain not in by_target]
    if missing:
        raise ValueError(f"sweep {config.name}: no results for targets {missing}")
    ordered = [by_target[t.domain] for t in config.targets]
    rows = [row for outcome in ordered for row in outcome.rows]
    table = pa.Table.from_pylist(rows, schema=TABLE_SCHEMA)
    chosen = {o.target: o.chosen_lambda for o in ordered}
    alignment = head_alignment(config)

    # A crash while rewriting must not leave the old marker vouching for half-new files.
    out.clear_complete(RESULTS_UNIT)
    out.write_parquet(RESULTS_FILE, table)
    out.write_bytes(PLOT_FILE, plot_sweep(table, chosen_lambdas=chosen))
    uris = {
        "table": out.url(RESULTS_FILE),
        "plot": out.url(PLOT_FILE),
        "summary": out.url(SUMMARY_FILE),
        "report": out.url(REPORT_FILE),
        "heatmaps": {o.target: out.url(o.heatmap_key) for o in ordered if o.heatmap_key},
    }
    summary = {
        "name": config.name,
        "vector": config.vector,
        "chosen": chosen,
        "selection": {
            "split": "val",
            "metric": config.selection_metric,
            "accuracy_tolerance_points": config.accuracy_tolerance,
        },
        "targets": {o.target: summarise_target(o.rows, o.chosen_lambda) for o in ordered},
        "head_alignment": alignment,
        "uris": uris,
        "config": config.to_dict(),
    }
    out.write_json(SUMMARY_FILE, _json_safe(summary))
    out.write_bytes(
        REPORT_FILE,
        render_report(
            rows,
            chosen,
            reference_budget=config.reference_budget,
            title=f"Sweep `{config.name}`",
            alignment=alignment,
        ).encode(),
    )
    out.publish_done(
        RESULTS_UNIT,
        config.result_fingerprint(),
        inputs=inputs_fingerprint(config),
        rows=len(rows),
    )
    logger.info("sweep %s: %d rows written to %s", config.name, len(rows), uris["table"])
    return SweepResult(rows=rows, table=table, chosen=chosen, summary=summary, uris=uris)


def load_sweep(config: SweepConfig) -> SweepResult | None:
    """The stored result of a complete sweep; None when incomplete or its inputs changed.

    Raises:
        ValueError: a complete sweep of that name was run with other settings.
    """
    out = sweep_storage(config)
    if not out.is_done(RESULTS_UNIT, config.result_fingerprint(), RESULTS_FILE):
        if out.is_complete(RESULTS_UNIT) and out.exists(RESULTS_FILE):
            raise ValueError(
                f"sweep {config.name!r} at {out.uri} was run with other settings: choose "
                "another name or overwrite it"
            )
        return None
    info = out.completion_info(RESULTS_UNIT)
    try:
        inputs = inputs_fingerprint(config)
    except FileNotFoundError:
        logger.warning(
            "sweep %s: its vector or a target model is gone; keeping its results", config.name
        )
        inputs = info.get("inputs")
    if info.get("inputs") != inputs:
        logger.info("sweep %s: the vector or a target model changed since it ran", config.name)
        return None
    table = out.read_parquet(RESULTS_FILE)
    summary = out.read_json(SUMMARY_FILE)
    chosen = {k: float(v) for k, v in summary["chosen"].items()}
    return SweepResult(
        rows=table.to_pylist(),
        table=table,
        chosen=chosen,
        summary=summary,
        uris=summary["uris"],
        skipped=True,
    )

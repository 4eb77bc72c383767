"""Selecting lambda on validation: the best explanation quality within an accuracy tolerance.

With per-image scores on the rows (``per_image``), the choice follows the one-standard-error rule:
among the lambdas within the accuracy tolerance, the smallest edit whose mean score is within
one standard error (of the best lambda's mean, over validation images) of the best. On small
validation splits the plain arg-max drifts to the grid's edge on noise; the rule only moves away
from lambda 0 when the gain is larger than the noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from tasks.sweep.config import LOWER_IS_BETTER


def _better(metric: str, a: float, b: float) -> bool:
    return a < b if metric in LOWER_IS_BETTER else a > b


def _standard_error(row: Mapping[str, Any], metric: str) -> float:
    from tasks.sweep.statistics import standard_error

    values = (row.get("per_image") or {}).get(metric)
    return math.nan if values is None else standard_error(values)


def select_lambda(
    rows: Sequence[Mapping[str, Any]],
    *,
    metric: str = "pearson",
    tolerance: float = 1.0,
    one_se: bool = True,
) -> float:
    """The lambda of best ``metric`` whose accuracy is at most ``tolerance`` points below lambda 0.

    Args:
        rows: the SEM rows of one target on the validation split (``lambda``, ``accuracy`` as a
            fraction, ``metric``).
        metric: the quality metric to optimise (lower is better for ``deletion_auc``).
        tolerance: accepted accuracy drop in accuracy points (1.0 = one percentage point).
        one_se: apply the one-standard-error rule where the best row carries per-image scores.

    Returns:
        The selected lambda; ties go to the smaller ``|lambda|`` (the smaller edit), and lambda 0
        is kept when no other lambda has a finite score.

    Raises:
        ValueError: no row at lambda 0.
    """
    at_zero = [r for r in rows if r["lambda"] == 0.0]
    if not at_zero:
        raise ValueError("lambda selection needs the lambda = 0 row")
    # A hair of slack so that an accuracy equal to the floor is not lost to rounding.
    floor = at_zero[0]["accuracy"] - tolerance / 100.0 - 1e-12
    best_lambda, best_score = 0.0, at_zero[0].get(metric, math.nan)
    for row in sorted(rows, key=lambda r: (abs(r["lambda"]), r["lambda"])):
        score = row.get(metric, math.nan)
        if row["accuracy"] < floor or score is None or not math.isfinite(score):
            continue
        if (
            best_score is None
            or not math.isfinite(best_score)
            or _better(metric, score, best_score)
        ):
            best_lambda, best_score = float(row["lambda"]), score
    if not one_se or best_lambda == 0.0:
        return best_lambda
    best_row = next(r for r in rows if r["lambda"] == best_lambda)
    error = _standard_error(best_row, metric)
    if not math.isfinite(error):
        return best_lambda
    bound = best_score + error if metric in LOWER_IS_BETTER else best_score - error
    for row in sorted(rows, key=lambda r: (abs(r["lambda"]), r["lambda"])):
        score = row.get(metric, math.nan)
        if row["accuracy"] < floor or score is None or not math.isfinite(score):
            continue
        if (score <= bound) if metric in LOWER_IS_BETTER else (score >= bound):
            return float(row["lambda"])
    return best_lambda


def mark_chosen(rows: Sequence[dict[str, Any]], *, metric: str, tolerance: float) -> float:
    """Select lambda on the validation SEM rows and mark ``chosen`` on its rows (in place).

    Returns:
        The chosen lambda.
    """
    val_rows = [r for r in rows if r["method"] == "sem" and r["split"] == "val"]
    chosen = select_lambda(val_rows, metric=metric, tolerance=tolerance)
    for row in rows:
        row["chosen"] = row["method"] == "sem" and row["lambda"] == chosen
    return chosen

"""The sweep's markdown report: intervals on the claimed differences, the ceiling, seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flows.seeds import seed_claims
from tasks.sweep.markdown import render_report, render_seeds_report, target_claims


def _row(method, coef, inferences, pearson, correct, split="test"):
    # Accuracy on a larger set than the explanation metrics, as with a target's accuracy data.
    return {
        "target": "colours",
        "related": True,
        "method": method,
        "lambda": coef,
        "inferences": inferences,
        "split": split,
        "images": len(pearson),
        "accuracy_images": len(correct),
        "accuracy": float(np.mean(correct)),
        "pearson": float(np.mean(pearson)),
        "spearman": math.nan,
        "topk": math.nan,
        "insertion_auc": 0.5,
        "deletion_auc": 0.3,
        "pointing": 0.5,
        "chosen": False,
        "per_image": {"pearson": list(pearson), "correct": list(correct)},
    }


def _rows():
    rng = np.random.default_rng(0)
    base = rng.normal(0.2, 0.3, 120)
    correct = [1.0] * 450 + [0.0] * 50
    # At the largest lambda: Pearson falls and 40 of the 450 correct images are lost.
    worse = [1.0] * 410 + [0.0] * 90
    return [
        _row("sem", 0.0, 1, base, correct),
        _row("sem", 1.0, 1, base + 0.2 + rng.normal(0, 0.05, 120), correct),
        _row("sem", 2.0, 1, base - 0.1 + rng.normal(0, 0.05, 120), worse),
        _row("kernel_shap", math.nan, 150, base + 0.4, correct),
        _row("kernel_shap", math.nan, 400, np.full(120, 0.85), correct),
    ]


def test_claims_are_paired_differences_with_intervals():
    claims = target_claims(_rows(), "colours", 1.0, 400)
    assert claims["d_pearson"].estimate > 0.15 and claims["d_pearson"].excludes_zero
    assert claims["d_accuracy"].estimate == 0.0 and not claims["d_accuracy"].excludes_zero
    assert claims["ceiling"]["pearson"] == pytest.approx(0.85)


def test_report_shows_intervals_the_ceiling_and_every_row():
    text = render_report(_rows(), {"colours": 1.0}, reference_budget=400)
    # Explanation metrics on 120 reference images, accuracy on 500.
    assert "| colours | 120 | 500 | 1 |" in text
    assert " *" in text  # the Pearson gain excludes zero
    assert "0.850" in text  # the ceiling
    assert "KS-150" in text and "KS-400" in text
    assert text.count("| colours | test |") == 5
    assert "| colours | test | sem | 2 | 1 | 120 | 500 |" in text


def test_report_shows_the_largest_lambda_with_intervals_even_when_zero_is_chosen():
    rows = _rows()
    claims = target_claims(rows, "colours", 0.0, 400)
    assert claims["lambda_max"] == 2.0
    assert claims["max_d_accuracy"].estimate == pytest.approx(-0.08)
    assert claims["max_d_accuracy"].n == 500 and claims["max_d_accuracy"].high < 0
    assert claims["max_d_pearson"].estimate < -0.05 and claims["max_d_pearson"].excludes_zero
    text = render_report(rows, {"colours": 0.0}, reference_budget=400)
    assert "### At the chosen lambda" in text and "### At the largest lambda" in text
    [line] = [row for row in text.splitlines() if row.startswith("| colours | 2 |")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2] == "500"
    assert cells[3].startswith("-0.080 [") and cells[3].endswith("*")
    assert cells[4].startswith("-0.") and cells[4].endswith("*")
    assert "alpha" not in text  # no head alignment given: no column
    text = render_report(rows, {"colours": 0.0}, reference_budget=400, alignment={"colours": -0.26})
    [line] = [row for row in text.splitlines() if row.startswith("| colours | 2 |")]
    assert line.endswith("| -0.260 |") and "`alpha`" in text


def test_seeds_report_averages_the_point_estimates():
    rows = [{k: v for k, v in r.items() if k != "per_image"} for r in _rows()]
    one = seed_claims(rows, {"colours": 1.0})
    assert one["colours"]["d_pearson"] > 0.15
    # At the largest lambda (2) the Pearson gain of the fixture is the lambda-2 row's.
    at_max = target_claims(_rows(), "colours", 1.0, None)["max_d_pearson"].estimate
    assert one["colours"]["max_d_pearson"] == pytest.approx(at_max)
    other = {"colours": {**one["colours"], "max_d_pearson": at_max + 0.1}}
    text = render_seeds_report({0: one, 1: other})
    assert "Over 2 seeds" in text and "| colours | 1, 1 |" in text
    [line] = [row for row in text.splitlines() if row.startswith("| colours |")]
    assert line.split("|")[-2].strip().startswith(f"{at_max + 0.05:.3f} [")


def test_seeds_report_has_the_in_domain_claim_of_the_source_apart():
    rows = [
        {
            "target": "shapes",
            "role": "source",
            "method": "sem",
            "split": "test",
            "lambda": 0.0,
            "inferences": 1,
            "pearson": 0.80,
        },
        {
            "target": "shapes",
            "role": "source",
            "method": "kernel_shap",
            "split": "test",
            "lambda": float("nan"),
            "inferences": 150,
            "pearson": 0.75,
        },
    ]
    one = seed_claims(rows, {"shapes": 0.0})
    assert one["shapes"]["role"] == "source"
    assert one["shapes"]["sem_minus_kernel_shap"] == pytest.approx(0.05)
    other = {"shapes": {**one["shapes"], "sem_minus_kernel_shap": 0.07}}
    text = render_seeds_report({0: one, 1: other})
    main_table, in_domain = text.split("In domain")
    assert "| shapes |" not in main_table
    [line] = [x for x in in_domain.splitlines() if x.startswith("| shapes |")]
    assert "0.060 [" in line


def test_a_kernel_shap_row_on_the_first_images_pairs_with_those_images_only():
    from tasks.sweep.markdown import difference

    sem = np.linspace(0.0, 1.0, 100)
    shap = sem[:40] - 0.25  # the first 40 images, each 0.25 below the SEM
    rows = [_row("sem", 0.0, 1, sem, [1.0] * 100), _row("kernel_shap", math.nan, 150, shap, [1.0])]
    paired = difference(rows[0], rows[1], "pearson")
    assert paired.n == 40
    assert paired.estimate == pytest.approx(0.25)
    # The unpaired means differ by much more: the SEM's mean covers images the row never saw.
    assert sem.mean() - shap.mean() > 0.5
    text = render_report(rows, {"colours": 0.0})
    assert "| colours | 0.500 | 40 |" in text

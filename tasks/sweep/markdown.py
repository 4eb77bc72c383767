"""The sweep's markdown report: every claim with a paired bootstrap interval.

``report.md`` is written by :func:`tasks.sweep.report.assemble_sweep` next to the table, and
``docs/results.md`` is that file under a hand-written preamble, so the documented numbers are
always the ones the code produced. Differences are paired over the same test images
(:func:`tasks.sweep.statistics.paired_difference`); rows read back without per-image scores
show their means without intervals.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from tasks.sweep.statistics import Interval, paired_difference

# Per-image metrics reported beyond the table's columns (see tasks.algorithms.metrics).
EXTRA_METRICS = ("deletion_normalised", "energy_pointing", "pointing_chance", "topk_off_evidence")


def _row(rows: Sequence[Mapping[str, Any]], **match: Any) -> Mapping[str, Any] | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def _values(row: Mapping[str, Any] | None, metric: str) -> list[float] | None:
    if row is None:
        return None
    per_image = row.get("per_image") or {}
    if metric == "accuracy":
        return per_image.get("correct")
    return per_image.get(metric)


def mean_of(row: Mapping[str, Any] | None, metric: str, first: int | None = None) -> float:
    """A row's mean of ``metric``: its column, else the mean of its per-image values; with
    ``first``, the mean over its first ``first`` images when it has per-image values."""
    if row is None:
        return math.nan
    per_image = _values(row, metric)
    value = row.get(metric)
    if (first is None or per_image is None) and (
        value is not None and not (isinstance(value, float) and math.isnan(value))
    ):
        return float(value)
    values = [v for v in (per_image or [])[:first] if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


def difference(
    a: Mapping[str, Any] | None, b: Mapping[str, Any] | None, metric: str
) -> Interval | None:
    """Paired ``a - b`` of ``metric`` over the images both rows scored; None without
    per-image scores.

    Rows of one target and split score the same reference images in the same order; a Kernel
    SHAP row may score only the first of them (``SweepConfig.kernel_shap_images``), so the
    pairs are the common first images (the interval's ``n``).
    """
    first, second = _values(a, metric), _values(b, metric)
    if first is None or second is None:
        return None
    pairs = min(len(first), len(second))
    nan = math.nan
    return paired_difference(
        [nan if v is None else v for v in first[:pairs]],
        [nan if v is None else v for v in second[:pairs]],
    )


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _fmt_diff(interval: Interval | None, digits: int = 3) -> str:
    if interval is None:
        return "n/a"
    mark = " *" if interval.excludes_zero else ""
    return interval.format(digits) + mark


def _images(row: Mapping[str, Any] | None, column: str = "images") -> str:
    if row is None:
        return "n/a"
    value = row.get(column)
    # Rows stored before accuracy_images existed measured accuracy on the reference's images.
    return str(int(value if value is not None else row["images"]))


def target_claims(
    rows: Sequence[Mapping[str, Any]], target: str, chosen: float, reference_budget: int | None
) -> dict[str, Any]:
    """The differences the docs claim for one target, on test, against lambda 0: at the chosen
    lambda (``d_*``) and at the grid's largest lambda (``max_d_*``, what the vector does to a
    target whatever lambda was chosen)."""
    zero = _row(rows, target=target, method="sem", split="test", **{"lambda": 0.0})
    picked = _row(rows, target=target, method="sem", split="test", **{"lambda": chosen})
    grid = [
        float(r["lambda"])
        for r in rows
        if r["target"] == target and r["method"] == "sem" and r["split"] == "test"
    ]
    largest = max(grid, default=math.nan)
    at_max = _row(rows, target=target, method="sem", split="test", **{"lambda": largest})
    claims: dict[str, Any] = {
        "lambda_0": zero,
        "chosen": picked,
        "lambda_max": largest,
        "at_max": at_max,
    }
    for metric in ("accuracy", "pearson", "deletion_auc", "deletion_normalised", *EXTRA_METRICS):
        claims[f"d_{metric}"] = difference(picked, zero, metric)
    for metric in ("accuracy", "pearson", "deletion_auc"):
        claims[f"max_d_{metric}"] = difference(at_max, zero, metric)
    ceiling = None
    if reference_budget is not None:
        ceiling = _row(
            rows, target=target, method="kernel_shap", split="test", inferences=reference_budget
        )
    claims["ceiling"] = ceiling
    return claims


def render_report(
    rows: Sequence[Mapping[str, Any]],
    chosen: Mapping[str, float],
    *,
    reference_budget: int | None = None,
    compare_budget: int = 150,
    title: str = "Sweep report",
    alignment: Mapping[str, float] | None = None,
) -> str:
    """The markdown report of one sweep.

    Args:
        rows: the sweep's rows (with ``per_image`` where available).
        chosen: target -> lambda chosen on validation.
        reference_budget: the references' budget; the Kernel SHAP row at that budget with
            another seed is the reference's reliability (the ceiling of agreement scores).
        compare_budget: the Kernel SHAP budget the single SEM pass is compared with.
        title: the first heading.
        alignment: target -> alpha of :func:`tasks.sweep.inputs.head_alignment` (None or
            empty: no column).
    """
    lines = [f"## {title}", ""]
    lines += [
        "Test split. Differences are a lambda minus lambda 0 on the same images, with "
        "paired bootstrap 95% intervals (2,000 resamples over images); `*` marks an interval "
        "that excludes zero. Accuracy in points of fraction (0.010 = 1 point), measured on "
        "`accuracy images` images (forward passes only: the target's whole split when its data "
        "is given); the explanation metrics on the reference's `images`.",
        "",
        "### At the chosen lambda",
        "",
        "| target | images | accuracy images | lambda* | accuracy at 0 | d accuracy "
        "| Pearson at 0 | d Pearson | ceiling | deletion at 0 | d deletion "
        "| d deletion / p(full) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    sources = [t for t in chosen if is_source(rows, t)]
    targets = [t for t in chosen if t not in sources]
    claims = {t: target_claims(rows, t, chosen[t], reference_budget) for t in targets}
    for target in targets:
        c = claims[target]
        zero = c["lambda_0"]
        lines.append(
            f"| {target} | {_images(zero)} | {_images(zero, 'accuracy_images')} "
            f"| {chosen[target]:g} | {_fmt(mean_of(zero, 'accuracy'))} "
            f"| {_fmt_diff(c['d_accuracy'])} | {_fmt(mean_of(zero, 'pearson'))} "
            f"| {_fmt_diff(c['d_pearson'])} | {_fmt(mean_of(c['ceiling'], 'pearson'))} "
            f"| {_fmt(mean_of(zero, 'deletion_auc'))} | {_fmt_diff(c['d_deletion_auc'])} "
            f"| {_fmt_diff(c['d_deletion_normalised'])} |"
        )
    lines += [
        "",
        "`ceiling`: Pearson between the reference and an independent Kernel SHAP estimate at the "
        "reference's own budget (another seed): the agreement a perfect method could show.",
        "",
        "### At the largest lambda",
        "",
        "What the vector does to each target at the grid's largest lambda, whichever lambda was "
        "chosen (a target that chose 0, e.g. an unrelated one, still shows its effect here).",
        "",
        "| target | lambda max | accuracy images | d accuracy | d Pearson | d deletion |"
        + (" alpha |" if alignment else ""),
        "|---|---|---|---|---|---|" + ("---|" if alignment else ""),
    ]
    for target in targets:
        c = claims[target]
        lines.append(
            f"| {target} | {c['lambda_max']:g} "
            f"| {_images(c['at_max'], 'accuracy_images')} "
            f"| {_fmt_diff(c['max_d_accuracy'])} | {_fmt_diff(c['max_d_pearson'])} "
            f"| {_fmt_diff(c['max_d_deletion_auc'])} |"
            + (f" {_fmt(alignment.get(target, math.nan))} |" if alignment else "")
        )
    if alignment:
        lines += [
            "",
            "`alpha`: the mean cosine of the target's class embeddings with the normalised mean "
            "of the source's. The SEM reads a map through the target's head, so what the vector "
            "does along the source's head reaches the target scaled by alpha; a negative alpha "
            "turns a transferred map around.",
        ]
    lines += _edited(rows, targets, chosen)
    lines += [
        "",
        "### Where the maps point (test; evidence mask = the object, for `scenes` the background)",
        "",
        "| target | pointing at 0 | at lambda* | chance | energy at 0 | d energy "
        "| top-5 off evidence at 0 | d off evidence |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for target in targets:
        c = claims[target]
        lines.append(
            f"| {target} | {_fmt(mean_of(c['lambda_0'], 'pointing'))} "
            f"| {_fmt(mean_of(c['chosen'], 'pointing'))} "
            f"| {_fmt(mean_of(c['lambda_0'], 'pointing_chance'))} "
            f"| {_fmt(mean_of(c['lambda_0'], 'energy_pointing'))} "
            f"| {_fmt_diff(c['d_energy_pointing'])} "
            f"| {_fmt(mean_of(c['lambda_0'], 'topk_off_evidence'))} "
            f"| {_fmt_diff(c['d_topk_off_evidence'])} |"
        )
    lines += [
        "",
        "### The single SEM pass at lambda* against Kernel SHAP of theta_T (test, Pearson)",
        "",
        "| target | SEM | KS images | "
        + " | ".join(f"KS-{b}" for b in _budgets(rows))
        + f" | SEM - KS-{compare_budget} |",
        "|---|---|---|" + "---|" * len(_budgets(rows)) + "---|",
    ]
    for target in targets:
        picked = claims[target]["chosen"]
        shap = {
            b: _row(rows, target=target, method="kernel_shap", split="test", inferences=b)
            for b in _budgets(rows)
        }
        lines.append(
            f"| {target} | {_fmt(mean_of(picked, 'pearson'))} "
            f"| {_images(shap.get(compare_budget))} | "
            + " | ".join(_fmt(mean_of(shap[b], "pearson")) for b in _budgets(rows))
            + f" | {_fmt_diff(difference(picked, shap.get(compare_budget), 'pearson'))} |"
        )
    lines += [
        "",
        "`SEM` is the mean over the reference's images; the Kernel SHAP columns and the paired "
        "difference over the first `KS images` of them.",
    ]
    lines += _edited_agreement(rows, targets, chosen)
    if sources:
        lines += ["", *_in_domain(rows, sources, compare_budget)]
    lines += ["", "### Every row", "", _table(rows), ""]
    return "\n".join(lines)


def _edited(
    rows: Sequence[Mapping[str, Any]], targets: Sequence[str], chosen: Mapping[str, float]
) -> list[str]:
    """Insertion/deletion of the SEM pass at lambda* beside Kernel SHAP of that edited model."""
    found = {
        t: _row(rows, target=t, method="kernel_shap_edited", split="test", **{"lambda": chosen[t]})
        for t in targets
    }
    found = {t: row for t, row in found.items() if row is not None}
    if not found:
        return []
    lines = [
        "",
        "### Insertion and deletion at lambda*: the SEM pass beside Kernel SHAP of the same "
        "edited model (test)",
        "",
        "Both explain theta_T + lambda* tau, on the same first `KS images` test images (Kernel "
        "SHAP at `budget` evaluations per image); the difference is paired over them. Higher "
        "insertion and lower deletion are more faithful.",
        "",
        "| target | lambda* | budget | KS images | SEM insertion | KS insertion | SEM deletion "
        "| KS deletion | SEM - KS deletion |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for target, shap in found.items():
        sem = _row(rows, target=target, method="sem", split="test", **{"lambda": chosen[target]})
        n = int(shap["images"])
        lines.append(
            f"| {target} | {chosen[target]:g} | {int(shap['inferences'])} | {n} "
            f"| {_fmt(mean_of(sem, 'insertion_auc', first=n))} "
            f"| {_fmt(mean_of(shap, 'insertion_auc'))} "
            f"| {_fmt(mean_of(sem, 'deletion_auc', first=n))} "
            f"| {_fmt(mean_of(shap, 'deletion_auc'))} "
            f"| {_fmt_diff(difference(sem, shap, 'deletion_auc'))} |"
        )
    return lines


def _edited_agreement(
    rows: Sequence[Mapping[str, Any]], targets: Sequence[str], chosen: Mapping[str, float]
) -> list[str]:
    """The transferred pass against Kernel SHAP of the same edited model, on its reference."""

    def found(target: str, method: str, **match: Any) -> Mapping[str, Any] | None:
        at = {"lambda": chosen[target]}
        return _row(rows, target=target, method=method, split="test", **at, **match)

    budgets = sorted({int(r["inferences"]) for r in rows if r["method"] == "kernel_shap_vs_edited"})
    present = [t for t in targets if found(t, "sem_vs_edited") is not None]
    if not present or not budgets:
        return []
    lines = [
        "",
        "### The transferred maps against Kernel SHAP of the same edited model (test, Pearson)",
        "",
        "Everything here explains theta_T + lambda* tau and is scored against a Kernel SHAP "
        "reference of that edited model (the references' budget and seed; the rows above are "
        "scored against the reference of theta_T), on the first `images` test images; the "
        "differences are paired over them. `matches`: the largest budget whose Kernel SHAP the "
        "single pass is not below (its difference's interval reaches zero or above); `< KS-b` "
        "when it is below every budget, `> KS-b` when above the largest.",
        "",
        "| target | lambda* | images | SEM | "
        + " | ".join(f"KS-{b}" for b in budgets)
        + " | "
        + " | ".join(f"SEM - KS-{b}" for b in budgets)
        + " | matches |",
        "|---|---|---|---|" + "---|" * (2 * len(budgets)) + "---|",
    ]
    for target in present:
        sem = found(target, "sem_vs_edited")
        shap = {b: found(target, "kernel_shap_vs_edited", inferences=b) for b in budgets}
        diffs = {b: difference(sem, shap[b], "pearson") for b in budgets}
        lines.append(
            f"| {target} | {chosen[target]:g} | {_images(sem)} | {_fmt(mean_of(sem, 'pearson'))} | "
            + " | ".join(_fmt(mean_of(shap[b], "pearson")) for b in budgets)
            + " | "
            + " | ".join(_fmt_diff(diffs[b]) for b in budgets)
            + f" | {_matched_budget(diffs)} |"
        )
    return lines


def _matched_budget(diffs: Mapping[int, Interval | None]) -> str:
    """The largest budget the single pass is not below, from its paired differences."""
    known = {b: d for b, d in sorted(diffs.items()) if d is not None and math.isfinite(d.high)}
    if not known:
        return "n/a"
    largest = max(known)
    if known[largest].low > 0:
        return f"> KS-{largest}"
    reached = [b for b, d in known.items() if d.high >= 0]
    return f"KS-{max(reached)}" if reached else f"< KS-{min(known)}"


def is_source(rows: Sequence[Mapping[str, Any]], target: str) -> bool:
    """Whether ``target``'s rows are the source's in-domain evaluation (role ``source``)."""
    return any(r["target"] == target and r.get("role") == "source" for r in rows)


def in_domain_claims(
    rows: Sequence[Mapping[str, Any]], source: str, compare_budget: int = 150
) -> dict[str, float]:
    """One seed's in-domain point estimates: theta_X's SEM and KS-``compare_budget`` Pearson."""
    sem = _row(rows, target=source, method="sem", split="test", **{"lambda": 0.0})
    shap = _row(rows, target=source, method="kernel_shap", split="test", inferences=compare_budget)
    sem_pearson, shap_pearson = mean_of(sem, "pearson"), mean_of(shap, "pearson")
    # Paired over the images both scored (Kernel SHAP may cover only the first ones).
    paired = difference(sem, shap, "pearson")
    return {
        "sem_pearson": sem_pearson,
        "kernel_shap_pearson": shap_pearson,
        "sem_minus_kernel_shap": sem_pearson - shap_pearson if paired is None else paired.estimate,
    }


def _in_domain(
    rows: Sequence[Mapping[str, Any]], sources: Sequence[str], compare_budget: int
) -> list[str]:
    """The paper's in-domain claim: theta_X's one pass against Kernel SHAP of theta_X."""
    budgets = _budgets(rows)
    lines = [
        "### In domain: theta_X's single pass against Kernel SHAP of theta_X (source test, Pearson)",
        "",
        "Both against the reference of theta_X itself (no vector added). The paper's claim is "
        f"SEM >= KS-{compare_budget}.",
        "",
        "| source | images | accuracy | SEM | KS images | "
        + " | ".join(f"KS-{b}" for b in budgets)
        + f" | SEM - KS-{compare_budget} |",
        "|---|---|---|---|---|" + "---|" * len(budgets) + "---|",
    ]
    for source in sources:
        sem = _row(rows, target=source, method="sem", split="test", **{"lambda": 0.0})
        shap = {
            b: _row(rows, target=source, method="kernel_shap", split="test", inferences=b)
            for b in budgets
        }
        images = int(sem["images"]) if sem else 0
        lines.append(
            f"| {source} | {images} | {_fmt(mean_of(sem, 'accuracy'))} "
            f"| {_fmt(mean_of(sem, 'pearson'))} | {_images(shap.get(compare_budget))} | "
            + " | ".join(_fmt(mean_of(shap[b], "pearson")) for b in budgets)
            + f" | {_fmt_diff(difference(sem, shap.get(compare_budget), 'pearson'))} |"
        )
    return lines


def _budgets(rows: Sequence[Mapping[str, Any]]) -> list[int]:
    return sorted(
        {
            int(r["inferences"])
            for r in rows
            if r["method"] == "kernel_shap" and r["split"] == "test"
        }
    )


def _table(rows: Sequence[Mapping[str, Any]]) -> str:
    columns = ("accuracy", "pearson", "insertion_auc", "deletion_auc", "pointing")
    out = [
        "| target | split | method | lambda | inferences | images | accuracy images | "
        + " | ".join(columns)
        + " | chosen |",
        "|---|---|---|---|---|---|---|" + "---|" * len(columns) + "---|",
    ]
    for row in rows:
        coef = row["lambda"]
        out.append(
            f"| {row['target']} | {row['split']} | {row['method']} "
            f"| {'' if coef is None or math.isnan(coef) else f'{coef:g}'} | {row['inferences']} "
            f"| {row['images']} | {_images(row, 'accuracy_images')} | "
            + " | ".join(_fmt(mean_of(row, c)) for c in columns)
            + f" | {'yes' if row.get('chosen') else ''} |"
        )
    return "\n".join(out)


def render_seeds_report(reports: Mapping[int, Mapping[str, Any]]) -> str:
    """Mean and Student-t interval over seeds of each target's claimed differences.

    Args:
        reports: seed -> ``{target: {"chosen": lambda, "d_pearson": x, "d_deletion_auc": y,
            "d_accuracy": z}}`` (point estimates of one seed's sweep); a source's entry is
            ``{"role": "source", **in_domain_claims(...)}``.
    """
    from tasks.sweep.statistics import over_seeds

    targets = sorted(
        {t for r in reports.values() for t, c in r.items() if c.get("role") != "source"}
    )
    sources = sorted(
        {t for r in reports.values() for t, c in r.items() if c.get("role") == "source"}
    )
    metrics = ("d_accuracy", "d_pearson", "d_deletion_auc", "max_d_pearson")
    lines = [
        f"## Over {len(reports)} seeds (mean [95% t-interval])",
        "",
        "Differences at each seed's lambda* minus lambda 0 (test); `max_d_pearson`: the same "
        "at the grid's largest lambda, whichever was chosen.",
        "",
        "| target | lambda* per seed | " + " | ".join(metrics) + " |",
        "|---|---|" + "---|" * len(metrics),
    ]
    for target in targets:
        per_seed = [r[target] for r in reports.values() if target in r]
        lambdas = ", ".join(f"{p['chosen']:g}" for p in per_seed)
        cells = [over_seeds([p[m] for p in per_seed]).format() for m in metrics]
        lines.append(f"| {target} | {lambdas} | " + " | ".join(cells) + " |")
    if sources:
        in_domain = ("sem_pearson", "kernel_shap_pearson", "sem_minus_kernel_shap")
        lines += [
            "",
            "In domain (the source's theta_X, test, Pearson with the reference of theta_X; "
            "Kernel SHAP at 150 evaluations):",
            "",
            "| source | SEM | Kernel SHAP | SEM - Kernel SHAP |",
            "|---|---|---|---|",
        ]
        for source in sources:
            per_seed = [r[source] for r in reports.values() if source in r]
            cells = [over_seeds([p[m] for p in per_seed]).format() for m in in_domain]
            lines.append(f"| {source} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compose_results(preamble: str, report: str) -> str:
    """``docs/results.md``: the hand-written preamble, then the sweep's report unchanged."""
    marker = "<!-- generated by the sweep (report.md); do not edit below -->"
    return f"{preamble.rstrip()}\n\n{marker}\n\n{report.lstrip()}"

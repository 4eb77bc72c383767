"""``explain-transfer datasets``: the X-dataset versions under a root, one of them, and gc.

``datasets list URI`` prints a table of every version (name, split, version, the explained
model's fingerprint, the labelling settings, shards done and failed, samples, size, age, status
and how many records use it); ``datasets show URI/NAME/VERSION`` one version in full;
``datasets gc URI --keep N`` what removing superseded versions would free, and with ``--yes``
removes them; ``datasets extend URI/NAME/VERSION --budget B`` labels a version at a larger
budget by evaluating only the coalitions its kept games lack; ``datasets resolve URI/NAME/VERSION
--shrinkage S`` solves a version's kept games
again into a new version (a Prefect flow run; no model). Each takes ``--json`` for scripts. The
logic lives in :mod:`storage.catalogue` and :mod:`tasks.build_dataset.resolve`; this module
parses arguments and formats. Errors follow :mod:`flows.cli_errors`: one
``error:`` line and exit status 2.

``python -m flows.datasets_cli datasets list out`` runs it without the rest of the CLI.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from flows.cli_errors import EXPECTED_ERRORS, error_lines

#: Columns of the version tables: (header, right-aligned).
_COLUMNS = (
    ("NAME", False),
    ("SPLIT", False),
    ("VERSION", False),
    ("MODEL", False),
    ("LABELLING", False),
    ("SHARDS", True),
    ("FAILED", True),
    ("SAMPLES", True),
    ("SIZE", True),
    ("CREATED", True),
    ("STATUS", False),
    ("USED BY", True),
)

_URI_HELP = (
    "output root holding xdata/ (what --out of demo/run takes), its xdata folder, or the "
    "--out folder of build-dataset; a path or s3://bucket/prefix"
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``datasets list|show|gc`` under ``subparsers`` (the CLI's subcommands).

    Each command sets ``func`` to a ``(args) -> exit status`` callable, as the other
    subcommands do; expected failures are raised for the caller to print.
    """
    parser = subparsers.add_parser(
        "datasets",
        help="list, show and remove X-dataset versions",
        description="The X-dataset versions under an output root: what made each, how "
        "complete it is, what uses it; and removing superseded ones.",
    )
    commands = parser.add_subparsers(dest="datasets_command", required=True)

    listing = commands.add_parser("list", help="every version: model, settings, size, age")
    listing.add_argument("uri", metavar="URI", help=_URI_HELP)
    _add_common(listing)
    listing.set_defaults(func=cmd_list)

    show = commands.add_parser("show", help="one version in full")
    show.add_argument(
        "uri",
        metavar="URI/NAME/VERSION",
        help="a version folder, e.g. out/xdata/shapes-x/v-0123abcd (as list prints it)",
    )
    _add_common(show)
    show.set_defaults(func=cmd_show)

    gc = commands.add_parser(
        "gc",
        help="remove superseded versions (dry run unless --yes)",
        description="For each dataset name and split, keep the N newest complete versions "
        "and every newer one (a build running or waiting for a rerun); remove the older ones "
        "and half-deleted folders, unless a model sidecar, vector or sweep summary under the "
        "root (or --refs-from) names them. A dry run unless --yes. A version some run reads "
        "without recording it (a fine-tuning in progress) is not protected: run gc between runs.",
    )
    gc.add_argument("uri", metavar="URI", help=_URI_HELP)
    gc.add_argument(
        "--keep",
        type=_at_least_one,
        required=True,
        metavar="N",
        help="complete versions kept per dataset name and split",
    )
    gc.add_argument(
        "--yes", "--delete", dest="yes", action="store_true", help="delete (default: dry run)"
    )
    _add_common(gc)
    gc.set_defaults(func=cmd_gc)

    resolve = commands.add_parser(
        "resolve",
        help="solve a version again from its kept games, without the model",
        description="Solve the labels of a version labelled with keep_game again with another "
        "solve setting (shrinkage, error estimate), from the coalitions and values kept in "
        "each sample's game.npz: no model runs. The result is a new version beside the source "
        "(its config.json names the source in resolved_from), holding the labels a fresh build "
        "with those settings would give. A rerun completes a partial one.",
    )
    resolve.add_argument(
        "uri",
        metavar="URI/NAME/VERSION",
        help="the source version folder, e.g. out/xdata/shapes-x/v-0123abcd",
    )
    resolve.add_argument(
        "--shrinkage",
        type=_unit_interval,
        metavar="S",
        help="the leverage solve's shrinkage in [0, 1] (0: plain least squares)",
    )
    resolve.add_argument(
        "--error-estimate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="estimate each attribution's standard error (shap_err.npy)",
    )
    resolve.add_argument("--json", action="store_true", help="print JSON instead of a line")
    resolve.set_defaults(func=cmd_resolve)

    extend = commands.add_parser(
        "extend",
        help="label a version again at a larger budget, evaluating only the extra coalitions",
        description="Extend a version labelled with keep_game to a larger Kernel SHAP budget: "
        "every coalition its games hold is kept and only the ones the larger design adds are "
        "evaluated, by the version's own model (checked against its fingerprint and the kept "
        "values). The result is a new version beside the source (its config.json names the "
        "source in extended_from); its labels are an estimate of a fresh labelling's quality at "
        "that budget, not its bits (another draw of the same design). A rerun completes a "
        "partial one.",
    )
    extend.add_argument("uri", metavar="URI/NAME/VERSION", help="the source version folder")
    extend.add_argument(
        "--budget", type=int, required=True, help="the new budget, larger than the source's"
    )
    extend.add_argument(
        "--shrinkage", type=_unit_interval, metavar="S", help="the solve's shrinkage as well"
    )
    extend.add_argument(
        "--error-estimate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="estimate each attribution's standard error (shap_err.npy)",
    )
    extend.add_argument(
        "--device",
        help="where the model runs: auto, cpu, cuda[:i] (default: as the source's build)",
    )
    extend.add_argument("--json", action="store_true", help="print JSON instead of a line")
    extend.set_defaults(func=cmd_resolve)
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--refs-from",
        action="append",
        default=[],
        metavar="URI",
        help="another output root whose models and sweeps count as users (repeatable)",
    )


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cmd_list(args: argparse.Namespace) -> int:
    """``datasets list``: a table (or JSON) of every version under the root."""
    from storage.catalogue import list_versions

    versions = list_versions(args.uri, references_from=args.refs_from)
    if args.json:
        _print_json([version.to_dict() for version in versions])
    else:
        print(version_table(versions))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """``datasets show``: one version's facts, the shards it misses, what uses it."""
    from storage.catalogue import show_version

    version = show_version(args.uri, references_from=args.refs_from)
    if args.json:
        _print_json(version.to_dict())
    else:
        print(describe_version(version))
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    """``datasets gc``: the plan (dry run), or the plan applied with ``--yes``."""
    from storage.catalogue import apply_gc, plan_gc

    plan = plan_gc(args.uri, args.keep, references_from=args.refs_from)
    for record in plan.unreadable_records:
        print(f"warning: record {record} cannot be read; it protects nothing", file=sys.stderr)
    if not args.yes:
        if args.json:
            _print_json({"dry_run": True, **plan.to_dict()})
            return 0
        total = len(plan.remove) + len(plan.kept)
        print(
            f"would remove {len(plan.remove)} of {total} version(s) under {plan.uri}, "
            f"{human_size(plan.bytes)} (dry run: pass --yes to delete)"
        )
        if plan.remove:
            print(_decision_table(plan.remove))
        if plan.kept:
            print(f"\nkept ({len(plan.kept)}):")
            print(_decision_table(plan.kept))
        return 0
    result = apply_gc(plan)
    if args.json:
        _print_json({"dry_run": False, **result.to_dict()})
        return 0
    print(
        f"removed {len(result.removed)} version(s) under {plan.uri}: {result.objects} "
        f"object(s), {human_size(result.bytes)} freed"
    )
    if result.removed:
        print(version_table(result.removed))
    if result.skipped:
        print(f"\nleft alone ({len(result.skipped)}):")
        print(_decision_table(result.skipped))
    return 0


def cmd_resolve(args: argparse.Namespace) -> int:
    """``datasets resolve`` and ``datasets extend``: a new version from the source's games (and,
    for an extension, its model on the extra coalitions), as a Prefect flow run."""
    from flows.cli_checks import check_file
    from storage import join_uri, layout, open_storage

    budget = getattr(args, "budget", None)
    if budget is not None and budget < 3:
        raise ValueError(f"--budget {budget}: a budget counts the empty and full coalitions")
    source = open_storage(args.uri)
    check_file(join_uri(source.uri, layout.DATASET_CONFIG_FILE), "X-dataset version config")
    if budget is None and args.shrinkage is None and args.error_estimate is None:
        raise ValueError("give --shrinkage and/or --(no-)error-estimate: the settings to change")
    from flows.build_dataset import resolve_explanation_dataset
    from flows.cli_prefect import prefect_api

    # The run's logs go where build-dataset puts them: under the X-data root (NAME's parent).
    root = source.uri.rstrip("/").rsplit("/", 2)[0]
    with prefect_api(root, verbose=getattr(args, "verbose", False)):
        summary = resolve_explanation_dataset(
            source.uri,
            shrinkage=args.shrinkage,
            error_estimate=args.error_estimate,
            budget=budget,
            device=getattr(args, "device", None),
        )
    if args.json:
        _print_json(summary)
    else:
        how = "extended" if "extended_from" in summary else "re-solved"
        print(
            f"{summary['version']}: {summary['samples']} samples in {len(summary['complete'])} "
            f"shards at {summary['dataset_uri']} ({how} from "
            f"{summary.get('extended_from') or summary['resolved_from']})"
        )
    if summary["missing"]:
        from flows.cli_errors import ShardsFailedError

        # One line naming the first failure's path and cause; the rerun finishes the rest.
        raise ShardsFailedError({**summary, "failed_errors": summary["failed"]})
    return 0


def version_table(versions: Sequence[Any], now: datetime | None = None) -> str:
    """Versions as an aligned table: one row each, sizes and ages for people."""
    return render_table([header for header, _ in _COLUMNS], [_row(v, now) for v in versions])


def _row(version: Any, now: datetime | None) -> list[str]:
    expected = "?" if version.shards_expected is None else str(version.shards_expected)
    return [
        version.name,
        version.split or "-",
        version.version,
        version.model_fingerprint or "-",
        version.labelling,
        f"{version.shards_done}/{expected}",
        str(version.shards_failed),
        str(version.samples),
        human_size(version.bytes),
        human_age(version.created, now),
        version.status,
        str(len(version.references)),
    ]


def _decision_table(decisions: Sequence[Any]) -> str:
    headers = ["NAME", "SPLIT", "VERSION", "STATUS", "SAMPLES", "SIZE", "CREATED", "REASON"]
    rows = [
        [
            d.version.name,
            d.version.split or "-",
            d.version.version,
            d.version.status,
            str(d.version.samples),
            human_size(d.version.bytes),
            human_age(d.version.created),
            d.reason,
        ]
        for d in decisions
    ]
    return render_table(headers, rows, right={"SAMPLES", "SIZE", "CREATED"})


def render_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[str] | None = None
) -> str:
    """Columns padded to their widest cell, two spaces apart; ``right`` names the
    right-aligned columns (by default those of :data:`_COLUMNS` marked so)."""
    right = right if right is not None else {header for header, flush in _COLUMNS if flush}
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.rjust(width) if header in right else cell.ljust(width)
            for header, cell, width in zip(headers, cells, widths, strict=True)
        ]
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), *(line(row) for row in rows)])


def describe_version(version: Any, now: datetime | None = None) -> str:
    """One version as ``field: value`` lines, for ``datasets show``."""
    from storage.catalogue import STATUS_MEANINGS

    expected = "?" if version.shards_expected is None else str(version.shards_expected)
    label = ", ".join(f"{key}={value}" for key, value in sorted(version.label.items())) or "-"
    fields: list[tuple[str, str]] = [
        ("name", version.name),
        ("split", version.split or "-"),
        ("version", version.version),
        ("uri", version.uri),
        ("status", f"{version.status} ({STATUS_MEANINGS[version.status]})"),
        ("model", f"{version.model_name or '-'} (fingerprint {version.model_fingerprint or '-'})"),
        ("checkpoint", version.checkpoint or "- (random initialisation)"),
        ("input", version.input or "-"),
        ("derived", version.derived_from or "- (labelled from its input)"),
        ("labelling", version.labelling),
        ("label settings", label),
        ("shards", f"{version.shards_done} of {expected} done, {version.shards_failed} failed"),
        ("samples", str(version.samples)),
        ("size", f"{human_size(version.bytes)} in {version.objects} objects"),
        ("created", _when(version.created, now)),
        ("updated", _when(version.updated, now)),
    ]
    if version.missing_shards:
        shown = ", ".join(version.missing_shards[:10])
        more = len(version.missing_shards) - 10
        fields.append(("missing shards", shown + (f" and {more} more" if more > 0 else "")))
    width = max(len(key) for key, _ in fields) + 1
    lines = [f"{key + ':':<{width}} {value}" for key, value in fields]
    if version.references:
        lines.append(f"{'used by:':<{width}}")
        lines.extend(f"  {ref.kind} {ref.record} ({ref.field})" for ref in version.references)
    else:
        lines.append(f"{'used by:':<{width}} nothing under the root")
    return "\n".join(lines)


def _when(moment: datetime | None, now: datetime | None) -> str:
    if moment is None:
        return "-"
    stamp = moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{stamp} ({human_age(moment, now)})"


def human_size(size: int) -> str:
    """``532 B``, ``1.2 KiB``, ``3.4 GiB``: binary units, one decimal."""
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def human_age(moment: datetime | None, now: datetime | None = None) -> str:
    """How long ago ``moment`` was: ``42s ago``, ``5m ago``, ``3h ago``, ``12d ago``."""
    if moment is None:
        return "-"
    seconds = max(0.0, ((now or datetime.now(UTC)) - moment).total_seconds())
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{int(seconds // length)}{unit} ago"
    return f"{int(seconds)}s ago"


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def main(argv: Sequence[str] | None = None) -> int:
    """``explain-transfer datasets ...`` on its own: the CLI's parsing and error convention."""
    parser = argparse.ArgumentParser(prog="explain-transfer")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except EXPECTED_ERRORS as exc:
        print("\n".join(error_lines(exc)), file=sys.stderr)
        return 2


if __name__ == "__main__":
    from flows.cli_errors import configure_logging

    configure_logging(verbose=False)
    sys.exit(main())

"""Prefect assets of the pipeline's outputs: lineage from data to the sweep, with metadata.

Every stage output is an asset keyed by its storage URI (a local path becomes ``file:///...``,
``s3://`` stays as it is): the domain shards, each X-dataset version, the P and X checkpoints,
the explainability vector and the sweep table. The task that writes an output materialises its
asset (``prefect.assets.materialize``), names the assets it read as upstream (``asset_deps``)
and adds what its result says about it (fingerprint, counts, sizes, accuracy) as metadata.
Prefect records each as a ``prefect.asset.materialization.succeeded`` event whose related
resources are the upstream assets; Prefect Cloud draws them as the asset graph.

Keys are only known at call time (an X-dataset's version is fixed by its plan, a model's folder
by its config), so :func:`materializing` turns a stage's task into a materialising one when the
flow calls it; the stage code in ``tasks/`` knows nothing of assets.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from prefect.assets import Asset, AssetProperties, add_asset_metadata
from prefect.tasks import MaterializingTask, Task
from pydantic import ValidationError

logger = logging.getLogger(__name__)

R = TypeVar("R")

#: The kinds of asset the pipeline materialises, in the order the pipeline makes them.
KINDS = ("domain", "x-dataset", "checkpoint", "vector", "sweep")

#: The event Prefect emits when a materialising task completes.
MATERIALIZED = "prefect.asset.materialization.succeeded"

# Task attributes whose names differ from Task.__init__'s parameters (as Prefect's own
# MaterializingTask.with_options maps them).
_ATTRIBUTE_OF = {
    "on_completion": "on_completion_hooks",
    "on_failure": "on_failure_hooks",
    "on_running": "on_running_hooks",
    "on_rollback": "on_rollback_hooks",
    "on_commit": "on_commit_hooks",
    "persist_result": "_user_persist_result",
    "cache_policy": "_user_cache_policy",
}


def asset_key(uri: str) -> str:
    """The asset key of a storage URI: ``file://`` + the absolute path for a local one.

    ``s3://bucket/x`` and other URIs are kept as they are; a local path (or ``file:`` URI) is
    made absolute, so the same file has one key whichever folder a run started in.
    """
    text = str(uri)
    if "://" in text and not text.startswith("file://"):
        return text
    path = text.removeprefix("file://")
    return "file://" + os.path.abspath(os.path.expanduser(path))


def stage_asset(uri: str, kind: str, name: str) -> Asset | None:
    """The asset of one stage output, or None when its URI cannot be an asset key.

    Prefect refuses keys with spaces, ``%``, ``#`` and a few other characters, and longer than
    512 characters; lineage is only a view of the run, so such an output is written without it
    (a warning says so) rather than failing the stage.

    Args:
        uri: where the output lives (a local path or an ``s3://`` URI).
        kind: one of :data:`KINDS`, shown as the asset's description.
        name: a short human name, shown in the UI instead of the key.
    """
    if kind not in KINDS:
        raise ValueError(f"asset kind {kind!r} is not one of {KINDS}")
    try:
        return Asset(
            key=asset_key(uri),
            properties=AssetProperties(name=name, description=f"explain-transfer {kind}"),
        )
    except ValidationError as exc:
        logger.warning("no asset for %s (not a valid asset key: %s)", uri, exc.errors()[0]["msg"])
        return None


def upstream_assets(uris: Iterable[str | None]) -> list[Asset]:
    """Assets of the inputs an output was made from (no properties: referenced, not written).

    Inputs that are not storage URIs (a built-in synthetic domain's name, no checkpoint) and
    repeated ones are left out.
    """
    found: dict[str, Asset] = {}
    for uri in uris:
        if not uri or ("/" not in str(uri)):
            continue
        try:
            asset = Asset(key=asset_key(uri))
        except ValidationError:
            continue
        found.setdefault(asset.key, asset)
    return list(found.values())


def _task_options(task: Task[..., Any]) -> dict[str, Any]:
    """The options ``task`` was made with, as keyword arguments of ``Task.__init__``."""
    options = {}
    for name in inspect.signature(Task.__init__).parameters:
        if name in ("self", "fn"):
            continue
        options[name] = getattr(task, _ATTRIBUTE_OF.get(name, name))
    return options


def _with_metadata(
    fn: Callable[..., R], asset: Asset, metadata: Callable[[R], Mapping[str, Any]]
) -> Callable[..., R]:
    """``fn``, adding ``metadata(result)`` to ``asset``'s materialization before returning."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> R:
        result = fn(*args, **kwargs)
        add_asset_metadata(asset, dict(metadata(result)))
        return result

    return run


def materializing(
    task: Task[..., R],
    asset: Asset | None,
    upstream: Iterable[Asset] = (),
    metadata: Callable[[R], Mapping[str, Any]] | None = None,
) -> Task[..., R]:
    """``task`` as a Prefect materialising task of ``asset``, made from ``upstream``.

    The task keeps its name, run name, retries and every other option; when it completes,
    Prefect emits ``prefect.asset.materialization.succeeded`` for ``asset`` with the upstream
    assets as related resources and ``metadata(result)`` as the payload (and
    ``...materialization.failed`` when it fails).

    Args:
        task: the stage's task.
        asset: what it writes (None: ``task`` itself, without lineage).
        upstream: the assets it reads.
        metadata: facts about the output, from the task's result.
    """
    if asset is None:
        return task
    options = _task_options(task)
    options["asset_deps"] = list(upstream) or None
    fn = task.fn if metadata is None else _with_metadata(task.fn, asset, metadata)
    return MaterializingTask(fn=fn, assets=[asset], **options)


def model_metadata(result: Mapping[str, Any]) -> dict[str, Any]:
    """A fine-tuned checkpoint's facts: fingerprints, steps and its last val accuracy."""
    metrics = result.get("metrics") or []
    last = metrics[-1] if metrics else {}
    facts = {
        "fingerprint": result.get("fingerprint"),
        "base_fingerprint": result.get("base_fingerprint"),
        "steps": result.get("steps"),
        "val_accuracy": last.get("val_accuracy"),
        "skipped": result.get("skipped"),
    }
    return {k: v for k, v in facts.items() if v is not None}


def dataset_metadata(summary: Mapping[str, Any], model_fingerprint: str | None) -> dict[str, Any]:
    """An X-dataset version's facts: version, explained model, shards and samples."""
    facts = {
        "version": summary.get("version"),
        "model_fingerprint": model_fingerprint,
        "shards_complete": len(summary.get("complete") or []),
        "shards_missing": len(summary.get("missing") or []),
        "samples": summary.get("samples"),
        "inputs": summary.get("inputs"),
        "quarantined": summary.get("quarantined"),
    }
    return {k: v for k, v in facts.items() if v is not None}


@dataclass(frozen=True)
class AssetRecord:
    """The latest materialization of one asset, as the Prefect API's events record it.

    Attributes:
        key: the asset key (the output's URI).
        name: its human name (the ``prefect.resource.name`` of the event).
        kind: one of :data:`KINDS` (from the asset's description), or None.
        upstream: the keys of the assets it was made from.
        metadata: what the materialising task added (fingerprint, counts, accuracy...).
        occurred: when it was materialised.
        flow_run_id: the flow run whose task materialised it.
    """

    key: str
    name: str | None
    kind: str | None
    upstream: tuple[str, ...]
    metadata: dict[str, Any] = field(default_factory=dict)
    occurred: datetime | None = None
    flow_run_id: str | None = None


def read_lineage(key_prefix: str = "", since: datetime | None = None) -> dict[str, AssetRecord]:
    """The assets whose key starts with ``key_prefix``, from the events of the Prefect API.

    Prefect Cloud draws these events as its asset graph; on a self-hosted server the same
    records are in its event feed, and this reads them back (the current ``PREFECT_API_URL``).
    The events reach the API a moment after the task completes: poll to wait for them.

    Args:
        key_prefix: e.g. ``file:///data/run1/`` for every output under one root.
        since: only materializations from then on (default: Prefect's, 180 days).

    Returns:
        The newest :class:`AssetRecord` of each key.
    """
    from prefect.client.orchestration import get_client
    from prefect.events.filters import (
        EventFilter,
        EventNameFilter,
        EventOccurredFilter,
        EventResourceFilter,
    )

    query = EventFilter(
        event=EventNameFilter(name=[MATERIALIZED]),
        resource=EventResourceFilter(id_prefix=[key_prefix]) if key_prefix else None,
        **({"occurred": EventOccurredFilter(since=since)} if since else {}),
    )
    records: dict[str, AssetRecord] = {}
    with get_client(sync_client=True) as client:
        page = client.read_events(filter=query, limit=50)  # the API's largest page
        while True:
            for event in page.events:
                record = _record(event)
                newest = records.get(record.key)
                if newest is None or (record.occurred and record.occurred > newest.occurred):
                    records[record.key] = record
            if page.next_page is None:
                break
            page = client.read_events_page(str(page.next_page))
    return records


def _record(event: Any) -> AssetRecord:
    resource = event.resource
    description = resource.get("prefect.asset.description") or ""
    kind = description.removeprefix("explain-transfer ") if description else None
    upstream = tuple(
        sorted(r.id for r in event.related if r.get("prefect.resource.role") == "asset")
    )
    flow_runs = [r.id for r in event.related if r.get("prefect.resource.role") == "flow-run"]
    return AssetRecord(
        key=resource.id,
        name=resource.get("prefect.resource.name"),
        kind=kind if kind in KINDS else None,
        upstream=upstream,
        metadata=dict(event.payload or {}),
        occurred=event.occurred,
        flow_run_id=flow_runs[0].removeprefix("prefect.flow-run.") if flow_runs else None,
    )


def ancestors(records: Mapping[str, AssetRecord], key: str) -> dict[str, AssetRecord | None]:
    """``key`` and every asset it was made from, transitively (None: referenced, not recorded).

    What a sweep table was made from is the lineage of one pipeline run, whatever older
    versions the same root holds.
    """
    found: dict[str, AssetRecord | None] = {}
    pending = [key]
    while pending:
        current = pending.pop()
        if current in found:
            continue
        record = records.get(current)
        found[current] = record
        if record is not None:
            pending.extend(record.upstream)
    return found


def lineage_layers(graph: Mapping[str, AssetRecord | None]) -> dict[str, int]:
    """Each asset's column in a left-to-right drawing: 1 + the deepest of its upstream."""
    depth: dict[str, int] = {}

    def visit(key: str, seen: frozenset[str]) -> int:
        if key not in depth:
            record = graph.get(key)
            upstream = [u for u in (record.upstream if record else ()) if u not in seen]
            depth[key] = 1 + max((visit(u, seen | {key}) for u in upstream), default=-1)
        return depth[key]

    for key in graph:
        visit(key, frozenset())
    return depth


#: Box colours of the lineage drawing, by kind (referenced inputs are grey).
_KIND_COLOURS = {
    "domain": "#dbe9f6",
    "x-dataset": "#fde2c4",
    "checkpoint": "#d9f0d3",
    "vector": "#e8dcf2",
    "sweep": "#f9d3d3",
}


def _label(key: str, record: AssetRecord | None, root: str) -> str:
    name = record.name if record and record.name else key.removeprefix(root).strip("/")
    if len(name) > 30:
        name = name[:14] + "…" + name[-14:]
    facts = (record.metadata if record else {}) or {}
    detail = []
    if "val_accuracy" in facts:
        detail.append(f"val acc {facts['val_accuracy']:.2f}")
    if "samples" in facts:
        detail.append(f"{facts['samples']} samples")
    if "norm" in facts:
        detail.append(f"norm {facts['norm']:.3f}")
    if "rows" in facts:
        detail.append(f"{facts['rows']} rows")
    kind = record.kind if record and record.kind else "referenced"
    return f"{name}\n{kind}" + (f" · {', '.join(detail)}" if detail else "")


def draw_lineage(graph: Mapping[str, AssetRecord | None], root: str = "") -> bytes:
    """A PNG of the lineage: one box per asset, columns by depth, arrows from upstream.

    Args:
        graph: from :func:`ancestors`.
        root: a key prefix left out of the labels of unnamed assets.
    """
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    depth = lineage_layers(graph)
    columns: dict[int, list[str]] = {}
    for key in sorted(graph, key=lambda k: (depth[k], k)):
        columns.setdefault(depth[key], []).append(key)
    rows = max(len(keys) for keys in columns.values())
    figure = Figure(figsize=(2.6 * len(columns) + 0.4, 0.85 * rows + 0.8), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_xlim(-0.6, len(columns) - 0.4)
    axes.set_ylim(-0.7, rows - 0.3)
    axes.axis("off")
    position = {}
    for column, keys in columns.items():
        offset = (rows - len(keys)) / 2
        for row, key in enumerate(keys):
            position[key] = (column, rows - 1 - (offset + row))
    for key, record in graph.items():
        for upstream in record.upstream if record else ():
            if upstream in position:
                axes.annotate(
                    "",
                    xy=(position[key][0] - 0.42, position[key][1]),
                    xytext=(position[upstream][0] + 0.42, position[upstream][1]),
                    arrowprops={"arrowstyle": "->", "color": "#555555", "lw": 0.8},
                )
    for key, (x, y) in position.items():
        record = graph[key]
        colour = _KIND_COLOURS.get(record.kind if record else "", "#eeeeee")
        axes.text(
            x,
            y,
            _label(key, record, root),
            ha="center",
            va="center",
            fontsize=7,
            bbox={"boxstyle": "round,pad=0.35", "facecolor": colour, "edgecolor": "#888888"},
        )
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def lineage_rows(graph: Mapping[str, AssetRecord | None]) -> list[dict[str, Any]]:
    """The lineage as table rows (asset, kind, made from, metadata), upstream first."""
    depth = lineage_layers(graph)
    rows = []
    for key in sorted(graph, key=lambda k: (depth[k], k)):
        record = graph[key]
        rows.append(
            {
                "asset": key,
                "kind": (record.kind if record else None) or "referenced",
                "made from": ", ".join(record.upstream) if record else "",
                "metadata": ", ".join(
                    f"{k}={v}" for k, v in (record.metadata if record else {}).items()
                ),
            }
        )
    return rows

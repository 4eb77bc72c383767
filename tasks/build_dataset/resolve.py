"""Re-solve an X-dataset version from its kept games, without the model.

A version labelled with ``keep_game`` holds, beside each label, the coalitions evaluated and
their values (``game.npz``). Changing only the solve (``shrinkage``, ``error_estimate``) then
needs no model evaluation. :func:`resolve_samples` solves samples again from their games;
over a whole version, :func:`plan_resolve` fixes a new version next to the source (its
``config.json`` names the source in ``resolved_from``), :func:`resolve_shard` solves one shard
again (skipped when already complete, so a rerun resumes) and :func:`finalize_resolve` writes
the manifest. Every other setting is in the games and can only change by labelling again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from storage import join_uri, layout, open_storage
from storage.shards import ShardWriter, complete_shards, read_shard, write_manifest
from tasks.algorithms.games import CoalitionGame
from tasks.algorithms.kernel_shap import solve_games
from tasks.build_dataset.config import LabelConfig
from tasks.build_dataset.stage import LABELLER_REVISION, _npy_bytes, _unique_in_order

logger = logging.getLogger(__name__)

#: The label settings a re-solve may change: the solve's.
SOLVE_FIELDS = ("shrinkage", "error_estimate")


def resolve_samples(samples: Sequence[dict[str, Any]], label: LabelConfig) -> list[dict[str, Any]]:
    """X-dataset samples with their labels solved again from their games, without the model.

    Only the solve's settings can differ from the ones the samples were labelled with:
    ``label.shrinkage`` and ``label.error_estimate``. Everything else a label depends on (the
    coalitions, hence grid, budget, sampler and seed; the values, hence model, baseline,
    output and precision) is in the game. With the labelling's own settings the labels come
    back bit for bit; with others they are what a fresh labelling with those settings gives
    (the same coalitions, the same values, the same solve).

    Args:
        samples: as read from an X-dataset (``game.npz`` as bytes or as the mapping that
            webdataset's ``.decode()`` makes of it, ``json`` as bytes or a dict).
        label: the settings to solve with.

    Returns:
        The samples with ``shap.npy`` (and ``shap_err.npy`` with ``label.error_estimate``, and
        ``relative_error`` in ``json``) replaced; every other field as it was.

    Raises:
        ValueError: a sample has no ``game.npz`` (labelled with ``keep_game`` off, or before
            games were kept), or its games cannot be solved together.
    """
    missing = [str(s.get("__key__")) for s in samples if "game.npz" not in s]
    if missing:
        raise ValueError(
            f"sample {missing[0]} has no game.npz: it was labelled without keep_game, so only "
            "the model can label it again"
        )
    games = [CoalitionGame.from_npz(s["game.npz"]) for s in samples]
    out: list[dict[str, Any]] = []
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, game in enumerate(games):  # one batched solve per kind of game
        kind = (game.grid, game.budget, game.sampler, game.front_load, len(game.classes))
        groups.setdefault(kind, []).append(i)
    solved: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for members in groups.values():
        phi, err = solve_games(
            [games[i] for i in members],
            error_estimate=label.error_estimate,
            shrinkage=label.shrinkage,
        )
        for j, i in enumerate(members):
            solved[i] = (phi[j], None if err is None else err[j])
    for i, sample in enumerate(samples):
        keep = [games[i].classes.index(c) for c in _unique_in_order(list(games[i].classes))]
        phi, err = solved[i]
        meta = sample["json"]
        meta = dict(json.loads(meta) if isinstance(meta, (bytes, str)) else meta)
        new = {k: v for k, v in sample.items() if k not in ("shap_err.npy", "json")}
        new["shap.npy"] = _npy_bytes(phi[keep].numpy().astype(np.float32))
        meta.pop("relative_error", None)
        if err is not None:
            new["shap_err.npy"] = _npy_bytes(err[keep].numpy().astype(np.float32))
            norms = phi[keep].flatten(1).norm(dim=1).clamp_min(1e-12)
            meta["relative_error"] = [float(v) for v in err[keep].flatten(1).norm(dim=1) / norms]
        new["json"] = meta
        out.append(new)
    return out


@dataclass(frozen=True)
class ResolvePlan:
    """A re-solve: where from, where to, with what.

    Attributes:
        source_uri: the source version's folder.
        dataset_uri: the new version's folder (beside the source, under the same name).
        version: the new version, ``v-<hash>`` of (the source version, the new label settings).
        name, split: the dataset's name and split.
        label: the new label settings (the source's with the solve's fields changed).
        shards: the source's complete shards (file names), each re-solved into its namesake.
        model_fingerprint: the explained model's, as the source recorded it.
    """

    source_uri: str
    dataset_uri: str
    version: str
    name: str
    split: str
    label: LabelConfig
    shards: tuple[str, ...]
    model_fingerprint: str | None = None


def plan_resolve(
    source_uri: str, *, shrinkage: float | None = None, error_estimate: bool | None = None
) -> ResolvePlan:
    """Check that ``source_uri`` can be solved again with these settings, and fix its version.

    Args:
        source_uri: an X-dataset version folder (``.../xdata/{name}/v-...``).
        shrinkage: the new solve's shrinkage (None: the source's).
        error_estimate: whether to estimate the labels' errors (None: as the source).

    Raises:
        FileNotFoundError: no ``config.json`` or no complete shard under ``source_uri``.
        ValueError: the settings are the source's own, or its samples have no game.
    """
    source = open_storage(source_uri)
    try:
        recorded = source.read_json(layout.DATASET_CONFIG_FILE)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{source.uri} is not an X-dataset version: it has no {layout.DATASET_CONFIG_FILE}"
        ) from None
    build = recorded["config"]
    old = LabelConfig(**build["label"])
    changes = {
        field: value
        for field, value in (("shrinkage", shrinkage), ("error_estimate", error_estimate))
        if value is not None
    }
    label = old.model_copy(update=changes)
    label = LabelConfig(**label.model_dump())  # validated (shrinkage needs the leverage sampler)
    if label.fingerprint() == old.fingerprint():
        raise ValueError(
            f"nothing to solve again: {source.uri} was labelled with these settings "
            f"({', '.join(f'{f}={getattr(old, f)}' for f in SOLVE_FIELDS)})"
        )
    shards = complete_shards(source, build["name"], build["split"])
    if not shards:
        raise FileNotFoundError(
            f"no complete shards of {build['name']}-{build['split']} in {source.uri}"
        )
    with closing(read_shard(source, shards[0])) as samples:  # the first sample only
        first = next(samples, None)
    if first is not None and "game.npz" not in first:
        raise ValueError(
            f"{source.uri} was labelled without keep_game (its samples have no game.npz), so "
            "only the model can label it again: build it with the new settings instead"
        )
    version = "v-" + label.fingerprint(LABELLER_REVISION, "resolved", recorded["version"])
    dataset_uri = join_uri(source.uri.rstrip("/").rsplit("/", 1)[0], version)
    target = open_storage(dataset_uri)
    if not target.exists(layout.DATASET_CONFIG_FILE):
        target.write_json(
            layout.DATASET_CONFIG_FILE,
            {
                **recorded,
                "config": {**build, "label": label.to_dict()},
                "version": version,
                "resolved_from": {"uri": source.uri, "version": recorded["version"]},
            },
        )
        target.write_json(layout.CLASS_NAMES_FILE, {"class_names": recorded.get("class_names", [])})
    logger.info(
        "re-solving %s (%d shards) as %s with %s", source.uri, len(shards), version, changes
    )
    return ResolvePlan(
        source_uri=source.uri,
        dataset_uri=target.uri,
        version=version,
        name=build["name"],
        split=build["split"],
        label=label,
        shards=tuple(shards),
        model_fingerprint=recorded.get("model_fingerprint"),
    )


def _batches(samples: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def resolve_shard(plan: ResolvePlan, shard: str) -> dict[str, Any]:
    """Solve one source shard again into the new version (skipped when already complete).

    Returns:
        ``{"shard", "samples", "skipped"}``.
    """
    source, target = open_storage(plan.source_uri), open_storage(plan.dataset_uri)
    if target.is_done(shard, plan.version):
        return {
            "shard": shard,
            "samples": int(target.completion_info(shard)["samples"]),
            "skipped": True,
        }
    with ShardWriter(target, shard, fingerprint=plan.version) as writer:
        for batch in _batches(read_shard(source, shard), max(plan.label.images_per_batch, 64)):
            for sample in resolve_samples(batch, plan.label):
                writer.write({k: v for k, v in sample.items() if k != "__skipped__"})
    return {"shard": shard, "samples": writer.samples, "skipped": False}


def finalize_resolve(plan: ResolvePlan) -> dict[str, Any]:
    """The manifest of the new version's complete shards, and a summary of the re-solve."""
    target = open_storage(plan.dataset_uri)
    done = target.done_units(list(plan.shards), plan.version, lambda s: (s,))
    complete = [s for s in plan.shards if s in done]
    table = write_manifest(target, complete, infos=done)
    samples = int(sum(table.column("samples").to_pylist())) if table.num_rows else 0
    return {
        "dataset_uri": plan.dataset_uri,
        "version": plan.version,
        "resolved_from": plan.source_uri,
        "complete": complete,
        "missing": [s for s in plan.shards if s not in done],
        "samples": samples,
    }

"""Re-solve or extend an X-dataset version from its kept games.

A version labelled with ``keep_game`` holds, beside each label, the coalitions evaluated and
their values (``game.npz``). Changing only the solve (``shrinkage``, ``error_estimate``) then
needs no model evaluation: :func:`resolve_samples` solves samples again from their games. A
larger budget needs only the coalitions the games lack: :func:`extend_samples` keeps every
evaluated coalition, draws the extra ones (:func:`~tasks.algorithms.leverage_shap.
extend_leverage_coalitions`), evaluates those alone with the version's model and baseline, and
solves the union. Over a whole version, :func:`plan_resolve` fixes a new version next to the
source (its ``config.json`` names the source in ``resolved_from``, or ``extended_from``),
:func:`resolve_shard` does one shard (skipped when already complete, so a rerun resumes) and
:func:`finalize_resolve` writes the manifest. Every other setting is in the games and can only
change by labelling again.
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
from tasks.algorithms.kernel_shap import (
    KernelShapConfig,
    derive_seed,
    evaluate_coalitions,
    layout_coalitions,
    solve_games,
)
from tasks.algorithms.leverage_shap import extend_leverage_coalitions
from tasks.build_dataset.batches import sample_images
from tasks.build_dataset.config import BuildConfig, LabelConfig
from tasks.build_dataset.stage import (
    LABELLER_REVISION,
    _classifier,
    _explain_settings,
    _npy_bytes,
    _unique_in_order,
    explained_model_fingerprint,
    load_explained_model,
)

logger = logging.getLogger(__name__)

#: The label settings a re-solve may change: the solve's.
SOLVE_FIELDS = ("shrinkage", "error_estimate")


def _kept_games(samples: Sequence[dict[str, Any]], otherwise: str) -> list[CoalitionGame]:
    """The samples' games; a sample without one is an error saying what ``otherwise`` can do."""
    missing = [str(s.get("__key__")) for s in samples if "game.npz" not in s]
    if missing:
        raise ValueError(
            f"sample {missing[0]} has no game.npz: it was labelled without keep_game, so only "
            f"{otherwise}"
        )
    return [CoalitionGame.from_npz(s["game.npz"]) for s in samples]


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
    games = _kept_games(samples, "the model can label it again")
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


#: Relative tolerance of the check that an extension's model gives the kept empty and full
#: values (float32 forwards on another device or batch differ in their last bits only).
VALUE_TOLERANCE = 1e-3


def extend_samples(
    model: torch.nn.Module,
    samples: Sequence[dict[str, Any]],
    label: LabelConfig,
    *,
    image_size: int,
    baseline_mean: Sequence[float] | None,
    decode: str = "host",
) -> list[dict[str, Any]]:
    """X-dataset samples labelled again at the larger ``label.budget``, reusing their games.

    Each sample's kept coalitions and values stay; only the coalitions the larger design adds
    are evaluated (plus the empty and full ones, which must give the kept values: the check
    that ``model`` and the baseline are the ones the samples were labelled with). The labels are
    the solve of the union with ``label``'s solve settings. They are not bit for bit a fresh
    labelling at that budget (its design draws other pairs), but an estimate of the same
    quality (the same stratified design law), and exact where the budget enumerates every
    stratum (:func:`~tasks.algorithms.leverage_shap.extend_leverage_coalitions`).

    Args:
        model: the explained model (the version's checkpoint).
        samples: as read from the version (with ``game.npz``).
        label: the source's label settings with the larger budget (and any solve setting).
        image_size: the model's input size.
        baseline_mean: the version's dataset mean (its ``mean`` baseline).
        decode: where the version decoded its images (``BuildConfig.decode``): the extra
            coalitions must see the pixels the kept ones saw.

    Raises:
        ValueError: a sample has no game, a game is not a leverage design of a smaller budget,
            or the model's values of the empty or full coalition differ from the kept ones.
    """
    games = _kept_games(samples, "a fresh labelling can reach another budget")
    for sample, game in zip(samples, games, strict=True):
        if game.sampler != "leverage" or game.front_load:
            raise ValueError(
                f"sample {sample['__key__']}: only the uniform leverage design extends (this "
                f"game: sampler {game.sampler}, front_load {game.front_load})"
            )
        if game.budget >= label.budget:
            raise ValueError(
                f"sample {sample['__key__']} was labelled at budget {game.budget}: extending "
                f"needs a larger one, got {label.budget}"
            )
    designs = []
    for sample, game in zip(samples, games, strict=True):
        seed = derive_seed(f"{sample['__key__']}/extend/{game.budget}", label.seed)
        designs.append(
            extend_leverage_coalitions(
                game.masks, label.budget - 2, torch.Generator().manual_seed(seed)
            )
        )
    device = next(model.parameters()).device
    classifier = _classifier(model)
    config = KernelShapConfig(**_explain_settings(label, baseline_mean, device))
    new_masks = torch.cat(
        [masks[len(g.masks) :] for (masks, *_), g in zip(designs, games, strict=True)]
    )
    counts = torch.tensor([new for *_, new in designs], dtype=torch.long)
    plan = layout_coalitions(
        [g.seed for g in games],
        new_masks,
        torch.ones(len(new_masks), dtype=torch.float64),
        None,
        counts,
    )
    images = sample_images(samples, image_size, device, decode=decode)
    classes = torch.tensor([list(g.classes) for g in games], dtype=torch.long)
    evaluated = evaluate_coalitions(classifier, config, plan, images, classes)
    evaluated.wait()
    values = evaluated.values.double()
    extended = []
    for i, (sample, game, (masks, weights, strata, new)) in enumerate(
        zip(samples, games, designs, strict=True)
    ):
        first = int(plan.first_row[i])
        for name, kept, got in (
            ("empty", game.v_empty, values[first]),
            ("full", game.v_full, values[first + 1]),
        ):
            if not np.allclose(got.numpy(), kept, rtol=VALUE_TOLERANCE, atol=VALUE_TOLERANCE):
                raise ValueError(
                    f"sample {sample['__key__']}: the model gives the {name} coalition "
                    f"{got.tolist()}, the kept game {kept.tolist()}: this is not the model "
                    "(or baseline) the version was labelled with"
                )
        rows = values[first + 2 : first + 2 + new].numpy()
        extended.append(
            CoalitionGame(
                masks=masks.numpy(),
                weights=weights.numpy(),
                strata=strata.numpy(),
                values=np.concatenate([game.values, rows]),
                v_empty=game.v_empty,
                v_full=game.v_full,
                classes=game.classes,
                grid=game.grid,
                budget=label.budget,
                seed=game.seed,
                sampler=game.sampler,
            )
        )
    out = []
    for sample, game in zip(samples, extended, strict=True):
        meta = sample["json"]
        meta = dict(json.loads(meta) if isinstance(meta, (bytes, str)) else meta)
        meta.update(budget=label.budget, evaluations=len(game.masks) + 2)
        out.append({**sample, "game.npz": game.to_npz(), "json": meta})
    return resolve_samples(out, label)


@dataclass(frozen=True)
class ResolvePlan:
    """A re-solve or an extension: where from, where to, with what.

    Attributes:
        source_uri: the source version's folder.
        dataset_uri: the new version's folder (beside the source, under the same name).
        version: the new version, ``v-<hash>`` of (the source version, the new label settings).
        name, split: the dataset's name and split.
        label: the new label settings (the source's with the solve's fields or the budget
            changed).
        shards: the source's complete shards (file names), each re-solved into its namesake.
        model_fingerprint: the explained model's, as the source recorded it.
        build: the source's build config, when the new version extends it to a larger budget
            (its model runs on the extra coalitions); None for a re-solve.
        class_names: the explained model's classes (an extension's model head).
        baseline_mean: the source's dataset mean (an extension's ``mean`` baseline).
    """

    source_uri: str
    dataset_uri: str
    version: str
    name: str
    split: str
    label: LabelConfig
    shards: tuple[str, ...]
    model_fingerprint: str | None = None
    build: dict[str, Any] | None = None
    class_names: tuple[str, ...] = ()
    baseline_mean: tuple[float, ...] | None = None

    @property
    def extends(self) -> bool:
        """Whether the new version is an extension to a larger budget (the model runs)."""
        return self.build is not None


def plan_resolve(
    source_uri: str,
    *,
    shrinkage: float | None = None,
    error_estimate: bool | None = None,
    budget: int | None = None,
    device: str | None = None,
) -> ResolvePlan:
    """Check that ``source_uri`` can be solved again (or extended) so, and fix its version.

    Args:
        source_uri: an X-dataset version folder (``.../xdata/{name}/v-...``).
        shrinkage: the new solve's shrinkage (None: the source's).
        error_estimate: whether to estimate the labels' errors (None: as the source).
        budget: a larger budget to extend the source to (None: the source's: a re-solve,
            no model runs).
        device: where an extension's model runs (None: the source build's setting).

    Raises:
        FileNotFoundError: no ``config.json`` or no complete shard under ``source_uri``.
        ValueError: the settings are the source's own, its samples have no game, or the budget
            is not larger than the source's or its design cannot be extended.
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
    if budget is not None and budget != old.budget:
        if budget < old.budget:
            raise ValueError(
                f"{source.uri} was labelled at budget {old.budget}: an extension needs a larger "
                f"budget, got {budget} (a smaller one is a fresh build)"
            )
        if old.sampler != "leverage" or old.front_load:
            raise ValueError(
                f"{source.uri}: only the uniform leverage design extends (sampler "
                f"{old.sampler}, front_load {old.front_load}); build it at budget {budget}"
            )
        changes["budget"] = budget
    label = old.model_copy(update=changes)
    label = LabelConfig(**label.model_dump())  # validated (shrinkage needs the leverage sampler)
    extends = label.budget != old.budget
    if device is not None:
        if not extends:
            raise ValueError("device is where an extension's model runs: a re-solve runs none")
        BuildConfig.model_validate({**build, "device": device})  # a device the config takes
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
    how = "extended" if extends else "resolved"
    version = "v-" + label.fingerprint(LABELLER_REVISION, how, recorded["version"])
    dataset_uri = join_uri(source.uri.rstrip("/").rsplit("/", 1)[0], version)
    target = open_storage(dataset_uri)
    if not target.exists(layout.DATASET_CONFIG_FILE):
        target.write_json(
            layout.DATASET_CONFIG_FILE,
            {
                **{
                    k: v for k, v in recorded.items() if k not in ("resolved_from", "extended_from")
                },
                "config": {**build, "label": label.to_dict()},
                "version": version,
                f"{how}_from": {"uri": source.uri, "version": recorded["version"]},
            },
        )
        target.write_json(layout.CLASS_NAMES_FILE, {"class_names": recorded.get("class_names", [])})
    logger.info("%s %s (%d shards) as %s with %s", how, source.uri, len(shards), version, changes)
    mean = recorded.get("baseline_mean")
    return ResolvePlan(
        source_uri=source.uri,
        dataset_uri=target.uri,
        version=version,
        name=build["name"],
        split=build["split"],
        label=label,
        shards=tuple(shards),
        model_fingerprint=recorded.get("model_fingerprint"),
        build={**build, **({"device": device} if device else {})} if extends else None,
        class_names=tuple(recorded.get("class_names", [])),
        baseline_mean=None if mean is None else tuple(float(v) for v in mean),
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
    if plan.extends:
        build = BuildConfig.model_validate(plan.build)
        model = load_explained_model(build, plan.class_names)
        fingerprint = explained_model_fingerprint(build, plan.class_names)
        if plan.model_fingerprint and fingerprint != plan.model_fingerprint:
            raise ValueError(
                f"the checkpoint {build.checkpoint} is not the model {plan.source_uri} was "
                f"labelled with (fingerprint {fingerprint}, recorded {plan.model_fingerprint}): "
                "an extension must evaluate the same model; build a fresh version instead"
            )
        size, batch_size = build.image_size, plan.label.images_per_batch

        def relabel(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return extend_samples(
                model,
                batch,
                plan.label,
                image_size=size,
                baseline_mean=plan.baseline_mean,
                decode=build.decode,
            )
    else:
        batch_size = max(plan.label.images_per_batch, 64)

        def relabel(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return resolve_samples(batch, plan.label)

    with ShardWriter(target, shard, fingerprint=plan.version) as writer:
        for batch in _batches(read_shard(source, shard), batch_size):
            for sample in relabel(batch):
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
        ("extended_from" if plan.extends else "resolved_from"): plan.source_uri,
        "complete": complete,
        "missing": [s for s in plan.shards if s not in done],
        "samples": samples,
    }

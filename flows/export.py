"""Flows of the data stage: export a domain (built-in synthetic, or any DomainSpec) as shards.

An ImageFolder domain (ImageNet: 1.28M files, 5,000 shards) is listed once, cut into shards from
that listing alone (:func:`~tasks.data.domains.domain_shards`) and exported one task per shard:
at most ``shard_workers`` shard tasks run at once on the flow's task runner, each reading its
files on ``read_workers`` threads; a complete shard is passed over without reading any image; a
shard that fails is retried, and those still failing are named at the end (the complete ones
are kept, so a rerun fills only the rest). Other kinds are exported by one task.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.artifacts import Progress
from flows.assets import materializing, stage_asset, upstream_assets
from storage import open_storage
from tasks.data.domains import (
    DEFAULT_SHARD_WORKERS,
    DomainPlan,
    DomainShard,
    DomainSpec,
    check_domain,
    domain_shards,
    export_domain,
    export_domain_shard,
    finish_domain_export,
)
from tasks.data.export import DEFAULT_READ_WORKERS, ShardOutcome, export_synthetic_domain
from tasks.data.synthetic import SPLITS

#: Retries of a failed shard before it is reported as failed (the other shards go on).
SHARD_RETRIES = 2


def shard_counts(shards: dict[str, list[str]]) -> dict[str, Any]:
    """A domain's asset metadata: its shards per split."""
    return {f"{split}_shards": len(keys) for split, keys in shards.items()}


def _domain_asset(out_uri: str, name: str):
    return stage_asset(open_storage(out_uri).uri, "domain", f"data {name}")


@task(name="export-split", task_run_name="export-{domain}", cache_policy=NO_CACHE, retries=1)
def export_domain_task(
    domain: str, out_uri: str, per_class: dict[str, int] | None, image_size: int, seed: int
) -> dict[str, list[str]]:
    """Write a synthetic domain's splits as WebDataset shards (complete shards are kept)."""
    return export_synthetic_domain(
        open_storage(out_uri),
        domain,
        seed=seed,
        per_class=per_class,
        image_size=image_size,
    )


@flow(name="export-synthetic-domain", flow_run_name="export-{domain}")
def export_domain_flow(
    domain: str,
    out_uri: str,
    per_class: dict[str, int] | None = None,
    image_size: int = 56,
    seed: int = 0,
) -> dict[str, list[str]]:
    """Export a built-in synthetic domain (train/val/test shards, classes.json, manifest).

    Args:
        domain: a built-in synthetic domain.
        out_uri: the dataset folder (local path or s3:// URI).
        per_class: samples per class for each split (None: the domain's defaults).
        image_size: image side in pixels.
        seed: generation seed.
    """
    export = materializing(
        export_domain_task, _domain_asset(out_uri, domain), metadata=shard_counts
    )
    shards = export(domain, out_uri, per_class, image_size, seed)
    get_run_logger().info(
        "%s exported to %s: %s", domain, out_uri, {k: len(v) for k, v in shards.items()}
    )
    return shards


@task(name="check-domain", task_run_name="check-{spec.name}", cache_policy=NO_CACHE)
def check_domain_task(spec: DomainSpec) -> DomainPlan:
    """List and check a domain's inputs (listings and class files only, no image)."""
    return check_domain(spec)


@task(name="export-domain-splits", task_run_name="export-{name}", cache_policy=NO_CACHE)
def export_domain_plan_task(
    plan: DomainPlan,
    name: str,
    out_uri: str,
    per_class: dict[str, int],
    image_size: int,
    seed: int,
    samples_per_shard: int,
) -> dict[str, list[str]]:
    """Write a checked synthetic or WebDataset domain's splits (complete shards are kept)."""
    return export_domain(
        plan,
        open_storage(out_uri),
        per_class=per_class,
        image_size=image_size,
        seed=seed,
        samples_per_shard=samples_per_shard,
    )


@task(
    name="export-shard",
    task_run_name="export-{shard.name}-{shard.split}-{shard.index:06d}",
    retries=SHARD_RETRIES,
    retry_delay_seconds=[2, 10],
    cache_policy=NO_CACHE,
)
def export_shard_task(
    shard: DomainShard, out_uri: str, read_workers: int, overwrite: bool
) -> dict[str, Any]:
    """Export one shard of an ImageFolder domain (skipped, reading nothing, when complete)."""
    outcome = export_domain_shard(
        shard, open_storage(out_uri), workers=read_workers, overwrite=overwrite
    )
    return outcome.to_dict()


@task(name="finish-domain-export", task_run_name="finish-{spec.name}", cache_policy=NO_CACHE)
def finish_domain_export_task(
    out_uri: str,
    spec: DomainSpec,
    class_names: list[str],
    shard_keys: dict[str, list[str]],
    fingerprints: dict[str, str],
    outcomes: list[dict[str, Any]],
) -> dict[str, list[str]]:
    """Write ``classes.json``, each split's report and the manifest of every complete shard."""
    return finish_domain_export(
        open_storage(out_uri),
        spec,
        class_names,
        shard_keys,
        fingerprints,
        [ShardOutcome.from_dict(outcome) for outcome in outcomes],
    )


def export_planned_domain(
    plan: DomainPlan,
    out_uri: str,
    *,
    per_class: dict[str, int],
    image_size: int,
    seed: int,
    samples_per_shard: int = 256,
    shard_workers: int = DEFAULT_SHARD_WORKERS,
    read_workers: int = DEFAULT_READ_WORKERS,
    overwrite: bool = False,
) -> dict[str, list[str]]:
    """Export a checked domain from inside a running flow, one task per ImageFolder shard.

    The plan's listing is used as it is (no folder is listed again), so a flow that has checked
    its domains already passes its plans here. Shard tasks run on the calling flow's task
    runner, at most ``shard_workers`` at once.

    Args:
        plan: the domain, from :func:`~tasks.data.domains.check_domain`.
        out_uri: its dataset folder.
        per_class: synthetic: images per class and split.
        image_size: synthetic: image side in pixels (unless the spec sets it).
        seed: synthetic: generation seed.
        samples_per_shard: samples per output shard.
        shard_workers: ImageFolder shards exported at once.
        read_workers: threads reading the files of each shard.
        overwrite: ImageFolder: rewrite complete shards too.

    Returns:
        The shard keys of each split.

    Raises:
        RuntimeError: shards still failing after their retries (named; the others are kept).
        ValueError: a split holds no usable image.
    """
    name = plan.spec.name
    # The exported shards are an asset; a stored domain's own folder is what they are made from.
    asset = _domain_asset(out_uri, name)
    upstream = upstream_assets([plan.spec.uri if plan.spec.kind != "synthetic" else None])
    if plan.spec.kind != "imagefolder":
        export = materializing(export_domain_plan_task, asset, upstream, metadata=shard_counts)
        return export(plan, name, out_uri, per_class, image_size, seed, samples_per_shard)
    logger = get_run_logger()
    listed = domain_shards(plan, samples_per_shard=samples_per_shard)
    everything = [shard for split in SPLITS for shard in listed[split]]
    progress = Progress(len(everything), f"{name}: shards exported")
    outcomes: list[dict[str, Any]] = []
    failed: list[str] = []
    pending: deque = deque()

    def collect() -> None:
        key, future = pending.popleft()
        try:
            outcomes.append(future.result())
        except Exception as exc:
            failed.append(f"{key} ({str(exc) or type(exc).__name__})")
        progress.advance()

    for shard in everything:
        if len(pending) >= max(1, shard_workers):
            collect()
        future = export_shard_task.submit(shard, out_uri, read_workers, overwrite)
        pending.append((shard.key, future))
    while pending:
        collect()
    written = [o for o in outcomes if not o["skipped"]]
    logger.info(
        "%s: %d shards written, %d already complete, %d failed",
        name,
        len(written),
        len(outcomes) - len(written),
        len(failed),
    )
    if failed:
        raise RuntimeError(
            f"domain {name!r}: {len(failed)} of {len(everything)} shards failed after "
            f"{SHARD_RETRIES} retries: "
            f"{', '.join(failed[:5])}{' ...' if len(failed) > 5 else ''} (rerun to fill them; "
            "complete shards are kept)"
        )
    finish = materializing(finish_domain_export_task, asset, upstream, metadata=shard_counts)
    return finish(
        out_uri,
        plan.spec,
        list(plan.class_names),
        {split: [shard.key for shard in shards] for split, shards in listed.items()},
        {split: shards[0].fingerprint for split, shards in listed.items() if shards},
        outcomes,
    )


@flow(name="export-domain", flow_run_name="export-{spec.name}")
def export_domain_spec_flow(
    spec: DomainSpec,
    out_uri: str,
    per_class: dict[str, int] | None = None,
    image_size: int = 56,
    seed: int = 0,
    samples_per_shard: int = 256,
    shard_workers: int = DEFAULT_SHARD_WORKERS,
    read_workers: int = DEFAULT_READ_WORKERS,
    overwrite: bool = False,
) -> dict[str, list[str]]:
    """Materialise any domain (synthetic, ImageFolder, WebDataset) as shards under ``out_uri``.

    The domain's inputs are listed once, here; an ImageFolder's shards are then exported in
    parallel (:func:`export_planned_domain`).

    Args:
        spec: the domain.
        out_uri: its dataset folder (``data/{name}`` of the pipeline).
        per_class: synthetic: images per class and split (None: the domain's defaults).
        image_size: synthetic: image side in pixels (unless the spec sets it).
        seed: synthetic: generation seed.
        samples_per_shard: samples per output shard.
        shard_workers: ImageFolder shards exported at once.
        read_workers: threads reading (fetching, decoding) the files of each shard.
        overwrite: ImageFolder: rewrite complete shards too.
    """
    plan = check_domain_task(spec)
    shards = export_planned_domain(
        plan,
        out_uri,
        per_class=dict(per_class or {}),
        image_size=image_size,
        seed=seed,
        samples_per_shard=samples_per_shard,
        shard_workers=shard_workers,
        read_workers=read_workers,
        overwrite=overwrite,
    )
    get_run_logger().info(
        "%s (%s) exported to %s: %s",
        spec.name,
        spec.kind,
        out_uri,
        {k: len(v) for k, v in shards.items()},
    )
    return shards

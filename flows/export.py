"""Flows of the data stage: export a domain (built-in synthetic, or any DomainSpec) as shards."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from storage import open_storage
from tasks.data.domains import DomainSpec, check_domain, export_domain
from tasks.data.export import export_synthetic_domain


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
    shards = export_domain_task(domain, out_uri, per_class, image_size, seed)
    get_run_logger().info(
        "%s exported to %s: %s", domain, out_uri, {k: len(v) for k, v in shards.items()}
    )
    return shards


@task(name="export-domain-splits", task_run_name="export-{spec.name}", cache_policy=NO_CACHE)
def export_domain_spec_task(
    spec: DomainSpec, out_uri: str, per_class: dict[str, int], image_size: int, seed: int
) -> dict[str, list[str]]:
    """Check a domain, then write its splits as WebDataset shards (complete shards are kept)."""
    return export_domain(
        check_domain(spec),
        open_storage(out_uri),
        per_class=per_class,
        image_size=image_size,
        seed=seed,
    )


@flow(name="export-domain", flow_run_name="export-{spec.name}")
def export_domain_spec_flow(
    spec: DomainSpec,
    out_uri: str,
    per_class: dict[str, int] | None = None,
    image_size: int = 56,
    seed: int = 0,
) -> dict[str, list[str]]:
    """Materialise any domain (synthetic, ImageFolder, WebDataset) as shards under ``out_uri``.

    Args:
        spec: the domain.
        out_uri: its dataset folder (``data/{name}`` of the pipeline).
        per_class: synthetic: images per class and split (None: the domain's defaults).
        image_size: synthetic: image side in pixels (unless the spec sets it).
        seed: synthetic: generation seed.
    """
    shards = export_domain_spec_task(spec, out_uri, dict(per_class or {}), image_size, seed)
    get_run_logger().info(
        "%s (%s) exported to %s: %s",
        spec.name,
        spec.kind,
        out_uri,
        {k: len(v) for k, v in shards.items()},
    )
    return shards

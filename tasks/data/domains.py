"""Domains as data: a built-in synthetic domain, an ImageFolder or existing WebDataset shards.

A :class:`DomainSpec` says where a domain's images are, what its classes are called, which prompt
templates build its zero-shot head and how its train/val/test splits are made. The parent flow
*materialises* every domain the same way, whatever its kind: its splits become WebDataset shards
``{name}-{split}-NNNNNN.tar`` under ``data/{name}`` with a ``classes.json`` (names, templates,
related flag), written by :func:`tasks.data.export.export_to_shards`, so stages 2-4 read one
format only.

- ``synthetic``: a built-in domain (:data:`tasks.data.synthetic.SYNTHETIC_DOMAINS`), drawn at the
  spec's (or the pipeline's) image size; exactly what the embedded default always exported.
- ``imagefolder``: a local or ``s3://`` folder, one sub-folder per class (ImageNet layout). Splits
  are the sub-folders ``train/``, ``val/``, ``test/``, or are *carved* from one folder: each file
  goes to the split where ``sha256(seed:key)`` falls among the fixed fractions, so a file's split
  never depends on which other files exist. Original image bytes are kept (readers convert other
  formats to PNG); every stage resizes to the model's input.
- ``webdataset``: existing shards ``{shards_name}-{split}-NNNNNN.tar`` and a classes file. They
  are *re-exported*, not used in place: foreign shards carry no completion markers, manifest or
  quarantine report, and re-exporting validates every sample once, applies ``per_class`` caps and
  gives every domain the same layout. The cost is one copy of the data.

:func:`check_domain` reads only listings and class files: it is run before any compute, so a
missing path, unknown classes or an empty split fail at once with one line (``ValueError``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from storage import Storage, StorageError, join_uri, layout, open_file, open_storage
from storage.fingerprints import fingerprint_of
from tasks.config import StageConfig
from tasks.data.quarantine import QuarantineReport
from tasks.data.readers import list_image_folder, read_image_file, read_shard_samples
from tasks.data.synthetic import SPLITS, SYNTHETIC_DOMAINS
from tasks.model.sem import DEFAULT_TEMPLATES

logger = logging.getLogger(__name__)

DomainKind = Literal["synthetic", "imagefolder", "webdataset"]


class SplitCarving(StageConfig):
    """Fixed fractions that carve train/val/test out of one folder, by hashing each file's key.

    Attributes:
        fractions: share of the files per split; positive, summing to 1.
        seed: changes which files land where (the fractions stay).
    """

    fractions: dict[str, float] = {"train": 0.8, "val": 0.1, "test": 0.1}
    seed: int = 0

    @field_validator("fractions")
    @classmethod
    def _valid_fractions(cls, value: dict[str, float]) -> dict[str, float]:
        if set(value) != set(SPLITS) or any(v <= 0 for v in value.values()):
            raise ValueError(f"carve fractions need positive {list(SPLITS)}, got {value}")
        if abs(sum(value.values()) - 1.0) > 1e-6:
            raise ValueError(f"carve fractions must sum to 1, got {sum(value.values()):g}")
        return value

    def split_of(self, key: str) -> str:
        """The split of the file with this key (stable: depends on the key and seed only)."""
        digest = hashlib.sha256(f"{self.seed}:{key}".encode()).digest()
        position = int.from_bytes(digest[:8], "big") / 2**64
        total = 0.0
        for split in SPLITS:
            total += self.fractions[split]
            if position < total:
                return split
        return SPLITS[-1]


class DomainSpec(StageConfig):
    """One domain of the pipeline (source or target): where its images are and what they show.

    Attributes:
        name: the domain's name (``data/{name}``, shard names, the sweep's ``target`` column).
        kind: ``synthetic``, ``imagefolder`` or ``webdataset`` (module docstring).
        uri: the folder (imagefolder) or the shards' folder (webdataset); local path or s3://.
            None for a synthetic domain, whose ``name`` is the built-in one.
        shards_name: webdataset: the dataset name in the shard file names (None: ``name``).
        class_names: readable names in class-id order; None reads them from
            ``class_names_file``, else from the folder names (imagefolder), the shards'
            ``classes.json`` (webdataset) or the built-in domain (synthetic).
        class_names_file: imagefolder: wnid -> name as text lines or JSON (a dict, or a list
            in class-id order); webdataset: a JSON list or ``{"class_names": [...]}``, or text
            with one name per line (None: ``classes.json`` beside the shards).
        templates: prompt templates of the zero-shot head, one ``{}`` for the class name.
        related: whether the domain is related to the source (a column of the sweep; None:
            the built-in domain's flag for synthetic, else True).
        image_size: synthetic only: the side images are drawn at (None: the pipeline's).
            Stored kinds keep their images' bytes and every stage resizes to the model input.
        per_class: per split, synthetic: images drawn per class (None: the pipeline's
            ``per_class``); stored kinds: at most this many per class (those whose key hashes
            lowest), a missing split meaning all.
        carve: imagefolder: carve the splits from ``uri`` itself (None: ``uri/train``,
            ``uri/val`` and ``uri/test`` are the splits).
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.]*$")
    kind: DomainKind = "synthetic"
    uri: str | None = None
    shards_name: str | None = None
    class_names: tuple[str, ...] | None = None
    class_names_file: str | None = None
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    related: bool | None = None
    image_size: int | None = Field(None, ge=16, le=1024)
    per_class: dict[str, int] | None = None
    carve: SplitCarving | None = None

    @model_validator(mode="after")
    def _consistent(self) -> DomainSpec:
        where = f"domain {self.name!r}"
        if not self.templates or any("{}" not in t for t in self.templates):
            raise ValueError(f"{where}: every prompt template needs one '{{}}' for the class name")
        if self.per_class and any(s not in SPLITS or n < 1 for s, n in self.per_class.items()):
            raise ValueError(f"{where}: per_class needs splits {list(SPLITS)} and counts >= 1")
        if self.kind == "synthetic":
            if self.name not in SYNTHETIC_DOMAINS:
                raise ValueError(
                    f"unknown synthetic domain {self.name!r}; built in: {sorted(SYNTHETIC_DOMAINS)}"
                )
            if self.class_names is not None and tuple(self.class_names) != tuple(
                SYNTHETIC_DOMAINS[self.name].class_names
            ):
                raise ValueError(f"{where}: a synthetic domain's classes are built in")
            if self.uri or self.carve or self.class_names_file or self.shards_name:
                raise ValueError(
                    f"{where}: uri, carve, class_names_file and shards_name are not for synthetic"
                )
            return self
        if not self.uri:
            raise ValueError(f"{where}: a {self.kind} domain needs uri (a folder or s3:// URI)")
        if self.image_size is not None:
            raise ValueError(
                f"{where}: image_size is for synthetic domains; {self.kind} images keep their "
                "bytes and every stage resizes them to the model's input"
            )
        if self.kind == "webdataset" and self.carve is not None:
            raise ValueError(f"{where}: webdataset shards already have their splits; drop carve")
        return self

    @property
    def is_related(self) -> bool:
        """The related flag, resolved (module docstring of :mod:`tasks.sweep`)."""
        if self.related is not None:
            return self.related
        return SYNTHETIC_DOMAINS[self.name].related if self.kind == "synthetic" else True

    @classmethod
    def builtin_domain(cls, name: str) -> DomainSpec:
        """The spec of a built-in synthetic domain (what a bare name in a config means)."""
        return cls(name=name, kind="synthetic")


def as_domain_spec(domain: str | DomainSpec) -> DomainSpec:
    """A domain given as a built-in name or a spec, as a spec."""
    return domain if isinstance(domain, DomainSpec) else DomainSpec.builtin_domain(domain)


@dataclass(frozen=True)
class DomainPlan:
    """What a domain holds, found by :func:`check_domain` from listings alone.

    Attributes:
        spec: the domain.
        class_names: the classes in id order.
        units: per split, what will be exported: ``(path, key, class_id)`` files (imagefolder),
            shard keys (webdataset) or nothing (synthetic, drawn on demand).
    """

    spec: DomainSpec
    class_names: tuple[str, ...]
    units: Mapping[str, tuple[Any, ...]]

    def listing_fingerprint(self, split: str) -> str:
        """What the split's shards are made from (recorded in their completion markers)."""
        return fingerprint_of(
            self.spec.kind,
            self.spec.uri,
            split,
            list(self.units.get(split, ())),
            self.class_names,
            (self.spec.per_class or {}).get(split),
        )


def check_domain(spec: DomainSpec) -> DomainPlan:
    """Check a domain before any compute: its path exists, its classes are known, no split empty.

    Reads listings and class files only, never an image.

    Raises:
        ValueError: one line saying what is wrong and where.
    """
    where = f"domain {spec.name!r}"
    try:
        if spec.kind == "synthetic":
            names = tuple(SYNTHETIC_DOMAINS[spec.name].class_names)
            return DomainPlan(spec, names, {})
        if spec.kind == "imagefolder":
            return _plan_image_folder(spec, where)
        return _plan_webdataset(spec, where)
    except StorageError as exc:
        raise ValueError(f"{where}: cannot read {spec.uri}: {exc}") from exc


def _plan_image_folder(spec: DomainSpec, where: str) -> DomainPlan:
    assert spec.uri is not None
    roots = {None: spec.uri} if spec.carve else {s: join_uri(spec.uri, s) for s in SPLITS}
    listings = {}
    for split, root in roots.items():
        listing = list_image_folder(open_storage(root), class_names_file=spec.class_names_file)
        if not listing.files:
            what = f"split {split!r} folder {root}" if split else f"folder {root}"
            raise ValueError(
                f"{where}: no images in {what} (missing or empty; imagefolder splits are "
                "train/ val/ test/ sub-folders of class folders, or set carve)"
            )
        listings[split] = listing
    reference = listings[None if spec.carve else "train"]
    wnids = reference.wnids
    for split, listing in listings.items():
        unknown = sorted(set(listing.wnids) - set(wnids))
        if unknown:
            raise ValueError(f"{where}: split {split!r} has classes not in train: {unknown[:5]}")
    names = _image_folder_names(spec, where, wnids, reference.class_names)
    ids = {wnid: i for i, wnid in enumerate(wnids)}
    units: dict[str, list[tuple[str, str, int]]] = {s: [] for s in SPLITS}
    for split, listing in listings.items():
        for (path, local), key in zip(listing.files, listing.keys, strict=True):
            target = spec.carve.split_of(key) if spec.carve else split
            units[target].append((path, key, ids[listing.wnids[local]]))
    caps = spec.per_class or {}
    chosen = {s: tuple(_cap_per_class(units[s], caps.get(s), s)) for s in SPLITS}
    for split, files in chosen.items():
        if not files:
            raise ValueError(f"{where}: split {split!r} is empty after carving {spec.uri}")
    return DomainPlan(spec, names, chosen)


def _image_folder_names(
    spec: DomainSpec, where: str, wnids: Sequence[str], listed: Sequence[str]
) -> tuple[str, ...]:
    if spec.class_names is not None:
        if len(spec.class_names) != len(wnids):
            raise ValueError(
                f"{where}: {len(spec.class_names)} class names for {len(wnids)} class folders"
            )
        return tuple(spec.class_names)
    if spec.class_names_file:
        missing = [w for w, n in zip(wnids, listed, strict=True) if n == w]
        named = [n for n in listed if n not in wnids]
        if missing and not named:
            raise ValueError(
                f"{where}: class names file {spec.class_names_file} names none of the class "
                f"folders (e.g. {missing[0]!r})"
            )
        if missing:
            raise ValueError(
                f"{where}: class names file {spec.class_names_file} has no name for "
                f"{len(missing)} class folders (e.g. {missing[0]!r})"
            )
    return tuple(listed)


def _cap_per_class(files: list[tuple[str, str, int]], cap: int | None, split: str) -> list:
    """At most ``cap`` files per class (lowest key hashes), in sorted path order."""
    files = sorted(files)
    if cap is None:
        return files
    ranked = sorted(files, key=lambda f: hashlib.sha256(f"{split}:{f[1]}".encode()).digest())
    kept: set[tuple[str, str, int]] = set()
    counts: dict[int, int] = {}
    for item in ranked:
        if counts.get(item[2], 0) < cap:
            counts[item[2]] = counts.get(item[2], 0) + 1
            kept.add(item)
    return [f for f in files if f in kept]


def _plan_webdataset(spec: DomainSpec, where: str) -> DomainPlan:
    assert spec.uri is not None
    storage = open_storage(spec.uri)
    keys = storage.list()
    if not keys:
        raise ValueError(f"{where}: no shards under {spec.uri} (missing or empty folder)")
    shards_name = spec.shards_name or spec.name
    units = {s: tuple(layout.shards_of(keys, shards_name, s)) for s in SPLITS}
    for split, shards in units.items():
        if not shards:
            raise ValueError(
                f"{where}: no shards {shards_name}-{split}-NNNNNN.tar under {spec.uri}"
            )
    if spec.class_names is not None:
        return DomainPlan(spec, tuple(spec.class_names), units)
    names = _read_names_file(spec.class_names_file or join_uri(spec.uri, "classes.json"), where)
    return DomainPlan(spec, names, units)


def _read_names_file(uri: str, where: str) -> tuple[str, ...]:
    folder, key = open_file(uri)
    if not folder.exists(key):
        raise ValueError(f"{where}: classes file {uri} does not exist")
    raw = folder.read_bytes(key).decode("utf-8-sig")
    try:
        data: Any = json.loads(raw)
    except json.JSONDecodeError:
        data = [line.strip() for line in raw.splitlines() if line.strip()]
    if isinstance(data, dict):
        data = data.get("class_names")
    if not isinstance(data, list) or not data:
        raise ValueError(f"{where}: classes file {uri} lists no class names")
    return tuple(str(name) for name in data)


def export_domain(
    plan: DomainPlan,
    storage: Storage,
    *,
    per_class: Mapping[str, int],
    image_size: int,
    seed: int,
    samples_per_shard: int = 256,
) -> dict[str, list[str]]:
    """Materialise a checked domain as WebDataset shards and ``classes.json`` in ``storage``.

    A rerun fills only missing shards (their markers record the listing they came from).

    Args:
        plan: the domain, checked by :func:`check_domain`.
        storage: the domain's dataset folder (``data/{name}``).
        per_class: synthetic: images per class per split, unless the spec sets its own.
        image_size: synthetic: the side images are drawn at, unless the spec sets its own.
        seed: synthetic: generation seed.
        samples_per_shard: samples per output shard.

    Returns:
        The shard keys of each split.

    Raises:
        ValueError: a split left without any usable image.
    """
    from tasks.data.export import export_synthetic_domain, export_to_shards

    spec = plan.spec
    if spec.kind == "synthetic":
        shards = export_synthetic_domain(
            storage,
            spec.name,
            seed=seed,
            per_class=spec.per_class or dict(per_class),
            image_size=spec.image_size or image_size,
            samples_per_shard=samples_per_shard,
        )
        if spec.templates != DEFAULT_TEMPLATES or spec.related is not None:
            _record_spec(storage, plan)
        return shards
    _record_spec(storage, plan)
    shards = {}
    for split in SPLITS:
        report = QuarantineReport()
        samples = (
            _image_folder_samples(plan, split, report)
            if spec.kind == "imagefolder"
            else _webdataset_samples(plan, split, report)
        )
        shards[split] = export_to_shards(
            samples,
            storage,
            spec.name,
            split,
            samples_per_shard=samples_per_shard,
            num_classes=len(plan.class_names),
            report=report,
            fingerprint=plan.listing_fingerprint(split),
        )
        if not shards[split]:
            raise ValueError(f"domain {spec.name!r}: split {split!r} has no usable image")
    return shards


def _record_spec(storage: Storage, plan: DomainPlan) -> None:
    from tasks.data.export import write_class_names

    write_class_names(
        storage,
        plan.class_names,
        domain=plan.spec.name,
        kind=plan.spec.kind,
        source=plan.spec.uri,
        templates=list(plan.spec.templates),
        related=plan.spec.is_related,
    )


def _image_folder_samples(plan: DomainPlan, split: str, report: QuarantineReport):
    assert plan.spec.uri is not None
    root = open_storage(plan.spec.uri if plan.spec.carve else join_uri(plan.spec.uri, split))
    for path, key, class_id in plan.units[split]:
        sample = read_image_file(root, path, key, class_id, report)
        if sample is not None:
            yield sample


def _webdataset_samples(plan: DomainPlan, split: str, report: QuarantineReport):
    assert plan.spec.uri is not None
    storage = open_storage(plan.spec.uri)
    cap = (plan.spec.per_class or {}).get(split)
    counts: dict[int, int] = {}
    for shard in plan.units[split]:
        for sample in read_shard_samples(storage, shard, report):
            label = int(sample["cls"])
            if cap is not None and counts.get(label, 0) >= cap:
                continue
            counts[label] = counts.get(label, 0) + 1
            yield {k: v for k, v in sample.items() if k in ("__key__", "jpg", "png", "cls")}

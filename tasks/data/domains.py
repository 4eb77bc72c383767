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
  formats to PNG); every stage resizes to the model's input. Each split is exported in a *mixed
  order* (:func:`mixed_order`): round ``r`` holds the ``r``-th file of every class, so every
  shard holds many classes (a listing sorted by class folder would give shards, and hence the
  training stream's shuffle buffer, of one class each) and the first ``N`` files of each class
  are the first rounds. Shard ``i`` is positions ``[i * s, (i + 1) * s)`` of that order: shards
  are fixed by the listing alone, so :func:`domain_shards` cuts a split into independent units
  of work that a flow fans out, and a rerun passes over a complete shard without reading it.
- ``webdataset``: existing shards ``{shards_name}-{split}-NNNNNN.tar`` and a classes file. They
  are *re-exported*, not used in place: foreign shards carry no completion markers, manifest or
  quarantine report, and re-exporting validates every sample once, applies ``per_class`` caps and
  gives every domain the same layout. The cost is one copy of the data. The input's order is
  kept (a class-sorted input stays class-sorted: reordering it would read every input shard
  once per output shard).

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
from tasks.data.export import (
    DEFAULT_READ_WORKERS,
    ShardOutcome,
    export_listed_shard,
    export_synthetic_domain,
    export_to_shards,
    finish_split,
    listed_shards,
    write_class_names,
    write_complete_manifest,
)
from tasks.data.prefetch import ordered_map
from tasks.data.quarantine import QuarantineReport
from tasks.data.readers import list_image_folder, read_image_file, read_shard_samples
from tasks.data.synthetic import SPLITS, SYNTHETIC_DOMAINS
from tasks.model.names import DEFAULT_TEMPLATES

logger = logging.getLogger(__name__)

DomainKind = Literal["synthetic", "imagefolder", "webdataset"]

#: Shards of one domain exported at once by :func:`export_domain` by default (each reads its
#: files on :data:`~tasks.data.export.DEFAULT_READ_WORKERS` threads).
DEFAULT_SHARD_WORKERS = 4


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
        units: per split, what will be exported: ``(path, key, class_id)`` files in their
            export order (imagefolder, :func:`mixed_order`), shard keys (webdataset) or nothing
            (synthetic, drawn on demand).
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

    def shards_fingerprint(self, split: str, samples_per_shard: int) -> str:
        """What each listed shard of the split is made from: the listing and the shard size
        (which decides where each file goes)."""
        return fingerprint_of(self.listing_fingerprint(split), samples_per_shard)


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
    chosen = {s: tuple(_cap_per_class(mixed_order(units[s], s), caps.get(s))) for s in SPLITS}
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


def mixed_order(files: Sequence[tuple[str, str, int]], split: str) -> list[tuple[str, str, int]]:
    """The export order of a split's ``(path, key, class_id)`` files: class rounds, shuffled.

    Each class's files are ranked by ``sha256("{split}:{key}")``; round ``r`` holds the file
    of rank ``r`` of every class that has one, and a round is ordered by the other half of the
    same digest. So consecutive files come from different classes (a shard of ``s`` files
    holds up to ``min(s, classes)`` classes), the first ``N`` files of each class in this order
    are its ``N`` lowest-hashed ones (what ``per_class`` keeps, and the first ``N`` rounds: a
    prefix of the split), and the order depends on the files' keys and classes only, not on
    the order the listing gave them in.
    """
    by_class: dict[int, list[tuple[bytes, tuple[str, str, int]]]] = {}
    for item in files:
        digest = hashlib.sha256(f"{split}:{item[1]}".encode()).digest()
        by_class.setdefault(item[2], []).append((digest, item))
    placed = []
    for ranked in by_class.values():
        ranked.sort()
        # The rank comes from the digest's leading bytes; its last 16 bytes, independent of
        # those, shuffle the round.
        placed.extend((r, digest[16:], item) for r, (digest, item) in enumerate(ranked))
    placed.sort()
    return [item for _, _, item in placed]


def _cap_per_class(
    ordered: list[tuple[str, str, int]], cap: int | None
) -> list[tuple[str, str, int]]:
    """The first ``cap`` files of each class in :func:`mixed_order` (its lowest key hashes)."""
    if cap is None:
        return ordered
    counts: dict[int, int] = {}
    kept = []
    for item in ordered:
        counts[item[2]] = counts.get(item[2], 0) + 1
        if counts[item[2]] <= cap:
            kept.append(item)
    return kept


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


@dataclass(frozen=True)
class DomainShard:
    """One output shard of an ImageFolder domain's split, fixed by the listing alone.

    Small and self-contained (the shard's own files, not the split's), so a flow can hand it to
    a task on another worker; :func:`export_domain_shard` exports it.

    Attributes:
        name: the dataset name (the domain's).
        split: the split.
        index: the shard's index in the split.
        root: the folder the files' paths are relative to (URI).
        files: the shard's ``(path, key, class_id)`` files, in export order.
        num_classes: labels are below this.
        fingerprint: the split's listing and the shard size, recorded in the shard's marker.
    """

    name: str
    split: str
    index: int
    root: str
    files: tuple[tuple[str, str, int], ...]
    num_classes: int
    fingerprint: str

    @property
    def key(self) -> str:
        """The shard's key, ``{name}-{split}-NNNNNN.tar``."""
        return layout.shard_name(self.name, self.split, self.index)


def domain_shards(
    plan: DomainPlan, *, samples_per_shard: int = 256
) -> dict[str, list[DomainShard]]:
    """The output shards of every split of a checked ImageFolder domain, from its plan alone.

    Shard ``i`` of a split holds positions ``[i * s, (i + 1) * s)`` of the split's files in
    export order (:func:`mixed_order`). Nothing is read: a complete shard can be recognised
    before any of its images is.

    Raises:
        ValueError: the domain is not an ImageFolder, or ``samples_per_shard`` is not positive.
    """
    spec = plan.spec
    if spec.kind != "imagefolder" or spec.uri is None:
        raise ValueError(f"domain {spec.name!r}: only an imagefolder domain has listed shards")
    shards: dict[str, list[DomainShard]] = {}
    for split in SPLITS:
        files = plan.units[split]
        root = open_storage(spec.uri if spec.carve else join_uri(spec.uri, split)).uri
        fingerprint = plan.shards_fingerprint(split, samples_per_shard)
        shards[split] = [
            DomainShard(
                spec.name,
                split,
                index,
                root,
                tuple(files[positions.start : positions.stop]),
                len(plan.class_names),
                fingerprint,
            )
            for index, positions in enumerate(listed_shards(len(files), samples_per_shard))
        ]
    return shards


def export_domain_shard(
    shard: DomainShard,
    storage: Storage,
    *,
    workers: int = DEFAULT_READ_WORKERS,
    overwrite: bool = False,
) -> ShardOutcome:
    """Export one shard of an ImageFolder domain (skipped, reading nothing, when complete).

    Its files are fetched and decoded once each, on ``workers`` threads, by
    :func:`tasks.data.readers.read_image_file`; the export does not decode them again.

    Args:
        shard: from :func:`domain_shards`.
        storage: the domain's dataset folder.
        workers: threads reading the shard's files.
        overwrite: rewrite the shard even when it is complete.
    """
    root = open_storage(shard.root)

    def read(file: tuple[str, str, int]) -> tuple[dict[str, Any] | None, QuarantineReport]:
        report = QuarantineReport()
        path, key, class_id = file
        return read_image_file(root, path, key, class_id, report), report

    return export_listed_shard(
        shard.files,
        read,
        storage,
        shard.name,
        shard.split,
        shard.index,
        num_classes=shard.num_classes,
        fingerprint=shard.fingerprint,
        workers=workers,
        overwrite=overwrite,
        check_images=False,
    )


def finish_domain_export(
    storage: Storage,
    spec: DomainSpec,
    class_names: Sequence[str],
    shard_keys: Mapping[str, Sequence[str]],
    fingerprints: Mapping[str, str],
    outcomes: Sequence[ShardOutcome],
) -> dict[str, list[str]]:
    """Close the export of an ImageFolder domain: ``classes.json``, each split's report, then
    the manifest once.

    Args:
        storage: the domain's dataset folder.
        spec: the domain.
        class_names: its classes in id order (:attr:`DomainPlan.class_names`).
        shard_keys: the shards of each split (:func:`domain_shards`).
        fingerprints: the fingerprint of each split's shards (:attr:`DomainShard.fingerprint`):
            complete shards of the split beyond ``shard_keys`` made from other inputs are
            retired (:func:`tasks.data.export.finish_split`).
        outcomes: what exporting each shard did, in any order.

    Returns:
        The shard keys of each split.

    Raises:
        ValueError: a split holds no usable image.
    """
    name = spec.name
    record_domain(storage, spec, class_names)
    by_shard = {outcome.shard: outcome for outcome in outcomes}
    for split, keys in shard_keys.items():
        report = QuarantineReport()
        for key in keys:
            if key in by_shard:
                report.merge(by_shard[key].report)
        total = finish_split(
            storage,
            name,
            split,
            keys,
            report,
            manifest=False,
            retire_fingerprint=fingerprints.get(split),
        )
        if not total.counts["written"]:
            raise ValueError(f"domain {name!r}: split {split!r} has no usable image")
    write_complete_manifest(storage)
    return {split: list(keys) for split, keys in shard_keys.items()}


def export_domain(
    plan: DomainPlan,
    storage: Storage,
    *,
    per_class: Mapping[str, int],
    image_size: int,
    seed: int,
    samples_per_shard: int = 256,
    shard_workers: int = DEFAULT_SHARD_WORKERS,
    read_workers: int = DEFAULT_READ_WORKERS,
    overwrite: bool = False,
) -> dict[str, list[str]]:
    """Materialise a checked domain as WebDataset shards and ``classes.json`` in ``storage``.

    A rerun fills only missing shards (their markers record the listing they came from). An
    ImageFolder domain is exported shard by shard from its plan (:func:`domain_shards`),
    ``shard_workers`` shards at a time: a complete shard is passed over without reading any of
    its images, and the listing is the plan's (no folder is listed again).

    Args:
        plan: the domain, checked by :func:`check_domain`.
        storage: the domain's dataset folder (``data/{name}``).
        per_class: synthetic: images per class per split, unless the spec sets its own.
        image_size: synthetic: the side images are drawn at, unless the spec sets its own.
        seed: synthetic: generation seed.
        samples_per_shard: samples per output shard.
        shard_workers: imagefolder: shards exported at once (1: one after the other).
        read_workers: imagefolder: threads reading the files of each shard.
        overwrite: imagefolder: rewrite complete shards too.

    Returns:
        The shard keys of each split.

    Raises:
        ValueError: a split left without any usable image.
    """
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
            record_domain(storage, spec, plan.class_names)
        return shards
    if spec.kind == "imagefolder":
        listed = domain_shards(plan, samples_per_shard=samples_per_shard)
        everything = [shard for split in SPLITS for shard in listed[split]]

        def export(shard: DomainShard) -> ShardOutcome:
            return export_domain_shard(shard, storage, workers=read_workers, overwrite=overwrite)

        outcomes = list(ordered_map(export, everything, workers=shard_workers))
        return finish_domain_export(
            storage,
            spec,
            plan.class_names,
            {split: [shard.key for shard in shards] for split, shards in listed.items()},
            {split: shards[0].fingerprint for split, shards in listed.items() if shards},
            outcomes,
        )
    record_domain(storage, spec, plan.class_names)
    shards = {}
    for split in SPLITS:
        report = QuarantineReport()
        shards[split] = export_to_shards(
            _webdataset_samples(plan, split, report),
            storage,
            spec.name,
            split,
            samples_per_shard=samples_per_shard,
            num_classes=len(plan.class_names),
            report=report,
            fingerprint=plan.listing_fingerprint(split),
            # The reader decodes every image already, so that an unusable one never counts
            # towards its class's per_class cap.
            check_images=False,
        )
        if not shards[split]:
            raise ValueError(f"domain {spec.name!r}: split {split!r} has no usable image")
    return shards


def record_domain(storage: Storage, spec: DomainSpec, class_names: Sequence[str]) -> None:
    """Write the domain's ``classes.json``: class names, prompt templates, related flag."""
    write_class_names(
        storage,
        class_names,
        domain=spec.name,
        kind=spec.kind,
        source=spec.uri,
        templates=list(spec.templates),
        related=spec.is_related,
    )


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

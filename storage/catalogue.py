"""The catalogue of X-dataset versions under a root: what each holds, what uses it, what may go.

An X-dataset version is a folder ``{name}/v-{hash}/`` (:func:`storage.layout.xdata_version_key`)
under an X-data root: ``xdata/`` of a pipeline's output root, or the ``--out`` folder of a
standalone ``build-dataset``. Its ``config.json`` (written first, by ``plan_build``) says which
model and labelling settings made it and how many shards it should hold; the shards' completion
markers say which are done; ``manifest.parquet`` appears when the build was finalized. Nothing
here reads a tar.

What *uses* a version is read from the records the other stages write under the same output
root: a fine-tuned model's sidecar (``models/{run}/model.json``: ``config.data``, ``val_data``),
a vector's sidecar (``vectors/*.json``) and a sweep's ``sweeps/{name}/summary.json``
(``config.targets[].val_reference``/``test_reference``). Every string in such a record that
names ``{name}/{version}`` as consecutive path segments counts, whatever the URI before it: a
version is content-addressed, so a reference to the same version through another URI (a local
copy, another endpoint) still protects it.

Garbage collection keeps, for each dataset name and split, the ``keep`` newest *complete*
versions and every version newer than those (a build still running or waiting for a rerun to
fill its failed shards); the older ones are candidates unless a record references them. A folder
whose ``config.json`` is gone is a version a crash left half-deleted and is a candidate too.
Deletion goes in the reverse order of writing, so that no reader ever takes a half-deleted
version for a usable one: ``config.json`` first (the version stops being one), then the
manifest, then the completion markers (no shard is readable any more), then the rest.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from os import PathLike
from typing import Any, Literal

from storage import layout
from storage.core import COMPLETIONS_PREFIX, IO_WORKERS, Storage, map_concurrently
from storage.errors import ObjectNotFoundError
from storage.local import LocalStorage
from storage.uri import open_storage

logger = logging.getLogger(__name__)

Status = Literal["complete", "incomplete", "failed", "orphaned", "unreadable"]

#: What each status means, for the command line's help and ``show``.
STATUS_MEANINGS: dict[str, str] = {
    "complete": "every planned shard is done",
    "incomplete": "planned, shards still missing and never finalized (running or interrupted)",
    "failed": "finalized with shards missing (rerun the build to fill them)",
    "orphaned": "no config.json: left half-deleted by an interrupted gc",
    "unreadable": "config.json cannot be parsed: left alone",
}

_EPOCH = datetime.fromtimestamp(0, tz=UTC)
#: Versions described at once by a listing (each reading its own markers concurrently).
_VERSIONS_AT_ONCE = 4


@dataclass(frozen=True)
class StoredObject:
    """One object of a listing, with what the listing itself tells about it.

    Attributes:
        key: the key, relative to the listed storage.
        size: its size in bytes.
        modified: when it was last written (UTC); None when the backend cannot tell.
    """

    key: str
    size: int
    modified: datetime | None


def list_objects(storage: Storage, prefix: str = "") -> list[StoredObject]:
    """Every object under ``prefix`` with its size and modification time, sorted by key.

    One listing on an object store (S3 listings carry both), one ``stat`` per file in a local
    folder. A backend this module does not know costs one :meth:`Storage.size` per object and
    gives no times.

    Args:
        storage: the storage to list.
        prefix: a key prefix, as :meth:`Storage.list` takes it.
    """
    if isinstance(storage, LocalStorage):
        return _local_objects(storage, prefix)
    # Only an imported storage.s3 can have made an S3Storage: local runs never import boto3.
    s3 = sys.modules.get("storage.s3")
    if s3 is not None and isinstance(storage, s3.S3Storage):
        return _s3_objects(storage, prefix)
    return [StoredObject(key, storage.size(key), None) for key in storage.list(prefix)]


def _local_objects(storage: LocalStorage, prefix: str) -> list[StoredObject]:
    found = []
    for key in storage.list(prefix):
        try:
            stat = os.stat(storage.url(key))
        except FileNotFoundError:  # removed since the listing
            continue
        found.append(StoredObject(key, stat.st_size, datetime.fromtimestamp(stat.st_mtime, UTC)))
    return found


def _s3_objects(storage: Any, prefix: str) -> list[StoredObject]:
    """The S3 listing's own sizes and times, through the backend's client and error
    translation (this module is part of storage/, like :func:`storage.checkpoints._s3_head`)."""
    full_prefix = storage.prefix + prefix
    found = []
    with storage._translated("list", full_prefix):
        paginator = storage._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=storage.bucket, Prefix=full_prefix):
            for item in page.get("Contents", ()):
                modified = item.get("LastModified")
                if modified is not None and modified.tzinfo is None:
                    modified = modified.replace(tzinfo=UTC)
                found.append(
                    StoredObject(item["Key"][len(storage.prefix) :], int(item["Size"]), modified)
                )
    return sorted(found, key=lambda obj: obj.key)


@dataclass(frozen=True)
class Reference:
    """A record that names a dataset version as its input.

    Attributes:
        record: the URI of the record (a model's sidecar, a vector's sidecar, a sweep summary).
        kind: ``"model"``, ``"vector"`` or ``"sweep"``.
        field: where in the record the version is named, e.g. ``config.data``.
    """

    record: str
    kind: str
    field: str

    def to_dict(self) -> dict[str, str]:
        return {"record": self.record, "kind": self.kind, "field": self.field}


@dataclass(frozen=True)
class DatasetVersion:
    """One X-dataset version folder, as its files describe it.

    Attributes:
        name: the dataset name (``{name}-{split}-NNNNNN.tar``).
        version: ``v-{hash}``.
        split: the split it labels (None for an orphaned or unreadable version).
        uri: the version folder.
        status: one of :data:`STATUS_MEANINGS`.
        model_fingerprint: content fingerprint of the explained model's weights.
        model_name: the explained model's architecture.
        checkpoint: URI of the explained model's weights (None: random initialisation).
        input: what was labelled, ``{input_kind}:{input_uri}``.
        label: the labelling settings (:class:`~tasks.build_dataset.config.LabelConfig` fields).
        shards_expected: shards the build planned (None when unknown).
        shards_done: shards with their tar and completion marker.
        shards_failed: shards still missing after the build was finalized (0 before that).
        missing_shards: the planned shards that are not done.
        samples: samples in the done shards.
        bytes: bytes of every object in the folder (shards, markers, plan, reports).
        objects: objects in the folder.
        created: when ``config.json`` was written (the folder's oldest object without one).
        updated: when the folder's newest object was written.
        finalized: whether the build wrote its manifest.
        references: the records that name this version as an input.
        derived_from: ``"resolved from URI"`` or ``"extended from URI"`` for a version made
            from another one's kept games (``datasets resolve`` / ``datasets extend``), else None.
        keys: the folder's object keys, relative to it (what :func:`apply_gc` deletes).
    """

    name: str
    version: str
    split: str | None
    uri: str
    status: Status
    model_fingerprint: str | None = None
    model_name: str | None = None
    checkpoint: str | None = None
    input: str | None = None
    label: dict[str, Any] = field(default_factory=dict)
    shards_expected: int | None = None
    shards_done: int = 0
    shards_failed: int = 0
    missing_shards: tuple[str, ...] = ()
    samples: int = 0
    bytes: int = 0
    objects: int = 0
    created: datetime | None = None
    updated: datetime | None = None
    finalized: bool = False
    references: tuple[Reference, ...] = ()
    derived_from: str | None = None
    keys: tuple[str, ...] = field(default=(), repr=False)

    @property
    def labelling(self) -> str:
        """The labelling settings in one short line, e.g. ``7x7 budget=150 mean/logit top_k=1``."""
        label = self.label
        if not label:
            return "-"
        text = (
            f"{label.get('grid_h', '?')}x{label.get('grid_w', '?')} "
            f"budget={label.get('budget', '?')} "
            f"{label.get('baseline', '?')}/{label.get('output', '?')} "
            f"top_k={label.get('top_k', '?')}"
        )
        if label.get("sampler", "leverage") != "leverage":
            text += f" {label['sampler']}"
        if label.get("seed", 0):
            text += f" seed={label['seed']}"
        if label.get("shrinkage") is not None:
            text += f" shrinkage={label['shrinkage']:g}"
        if label.get("front_load"):
            text += " front_load"
        return text

    def to_dict(self) -> dict[str, Any]:
        """The version as JSON-able facts (times in ISO 8601, UTC); no object keys."""
        return {
            "name": self.name,
            "version": self.version,
            "split": self.split,
            "uri": self.uri,
            "status": self.status,
            "model_fingerprint": self.model_fingerprint,
            "model_name": self.model_name,
            "checkpoint": self.checkpoint,
            "input": self.input,
            "label": dict(self.label),
            "labelling": self.labelling,
            "derived_from": self.derived_from,
            "shards_expected": self.shards_expected,
            "shards_done": self.shards_done,
            "shards_failed": self.shards_failed,
            "missing_shards": list(self.missing_shards),
            "samples": self.samples,
            "bytes": self.bytes,
            "objects": self.objects,
            "created": _iso(self.created),
            "updated": _iso(self.updated),
            "finalized": self.finalized,
            "references": [ref.to_dict() for ref in self.references],
        }


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat()


@dataclass(frozen=True)
class _Roots:
    """Where versions live (``xdata``) and where the records that use them live."""

    uri: str
    xdata: Storage
    records: tuple[Storage, ...]


def _open_roots(
    uri: str | PathLike[str], references_from: Sequence[str], probe: str = ""
) -> tuple[_Roots, list[StoredObject]]:
    """The roots of ``uri`` and the objects under ``probe`` in its X-data root.

    ``uri`` is an output root holding ``xdata/`` (records: the root), an ``xdata`` folder
    itself (records: its parent) or any other X-data root (records: that root).
    """
    text = str(uri).rstrip("/") or "/"
    root = open_storage(text)
    if isinstance(root, LocalStorage) and not root.root.is_dir():
        raise ObjectNotFoundError(f"no X-dataset versions under {text}: no such folder")
    extra = tuple(open_storage(str(other)) for other in references_from)
    nested = list_objects(root, f"{layout.XDATA_PREFIX}/{probe}")
    if nested:
        start = len(layout.XDATA_PREFIX) + 1
        objects = [StoredObject(o.key[start:], o.size, o.modified) for o in nested]
        return _Roots(text, root.child(layout.XDATA_PREFIX), (root, *extra)), objects
    records: tuple[Storage, ...] = (root,)
    parent, _, last = text.rpartition("/")
    if last == layout.XDATA_PREFIX and not parent.endswith(":/"):
        # An xdata folder given itself: the models and sweeps that used it are beside it.
        records = (open_storage(parent or ("/" if text.startswith("/") else ".")),)
    return _Roots(text, root, (*records, *extra)), list_objects(root, probe)


def _group_versions(objects: Iterable[StoredObject]) -> dict[tuple[str, str], list[StoredObject]]:
    """Objects by (name, version) folder, keys made relative to the version folder."""
    grouped: dict[tuple[str, str], list[StoredObject]] = defaultdict(list)
    for obj in objects:
        version = layout.version_of(obj.key)
        if version is None:
            continue
        name = obj.key.split("/", 1)[0]
        relative = obj.key[len(layout.xdata_version_key(name, version)) + 1 :]
        grouped[(name, version)].append(StoredObject(relative, obj.size, obj.modified))
    return dict(grouped)


def _describe(
    xdata: Storage,
    name: str,
    version: str,
    objects: list[StoredObject],
    workers: int = IO_WORKERS,
) -> DatasetVersion:
    """A version from its listing, its ``config.json``, its manifest or its shard markers
    (``workers`` marker reads at a time)."""
    folder = xdata.child(layout.xdata_version_key(name, version))
    by_key = {obj.key: obj for obj in objects}
    times = [obj.modified for obj in objects if obj.modified is not None]
    common: dict[str, Any] = {
        "name": name,
        "version": version,
        "uri": folder.uri,
        "bytes": sum(obj.size for obj in objects),
        "objects": len(objects),
        "updated": max(times, default=None),
        "keys": tuple(sorted(by_key)),
    }
    config_object = by_key.get(layout.DATASET_CONFIG_FILE)
    if config_object is None:
        return DatasetVersion(
            split=None, status="orphaned", created=min(times, default=None), **common
        )
    try:
        meta = folder.read_json(layout.DATASET_CONFIG_FILE)
        build = dict(meta["config"])
        split = str(build["split"])
    except FileNotFoundError:  # removed since the listing: a gc is deleting it
        return DatasetVersion(
            split=None, status="orphaned", created=min(times, default=None), **common
        )
    except (ValueError, KeyError, TypeError) as exc:
        logger.warning("%s: config.json cannot be read (%s); left alone", folder.uri, exc)
        return DatasetVersion(
            split=None, status="unreadable", created=config_object.modified, **common
        )
    shards = [
        key for key in layout.shards_of(by_key, name, split) if "/" not in key
    ]  # the tars at the top of the folder, not plan/ or reports/ files
    marked = [shard for shard in shards if f"{COMPLETIONS_PREFIX}{shard}.json" in by_key]
    finalized = layout.MANIFEST_FILE in by_key
    done, samples = _done_shards(folder, version, marked, finalized, workers)
    expected = meta.get("output_shards")
    expected = int(expected) if isinstance(expected, int) else None
    planned = (
        [layout.shard_name(name, split, index) for index in range(expected)]
        if expected is not None
        else []
    )
    missing = tuple(shard for shard in planned if shard not in done)
    if expected is not None and not missing:
        status: Status = "complete"
    elif finalized:
        status = "failed"
    else:
        status = "incomplete"
    return DatasetVersion(
        split=split,
        status=status,
        model_fingerprint=meta.get("model_fingerprint"),
        model_name=build.get("model_name"),
        checkpoint=build.get("checkpoint"),
        input=f"{build.get('input_kind')}:{build.get('input_uri')}",
        label=dict(build.get("label") or {}),
        shards_expected=expected,
        shards_done=len(done),
        shards_failed=len(missing) if finalized else 0,
        missing_shards=missing,
        samples=samples,
        created=config_object.modified,
        finalized=finalized,
        derived_from=_derived_from(meta),
        **common,
    )


def _derived_from(meta: dict[str, Any]) -> str | None:
    """How a version was made from another's kept games, from its ``config.json``."""
    for how in ("extended", "resolved"):
        source = meta.get(f"{how}_from")
        if isinstance(source, dict) and source.get("uri"):
            return f"{how} from {source['uri']}"
    return None


def _done_shards(
    folder: Storage, version: str, marked: list[str], finalized: bool, workers: int
) -> tuple[set[str], int]:
    """The done shards among ``marked`` and their samples: from the manifest when it lists
    exactly them (one read), else from their completion markers (one read each, concurrent)."""
    if finalized:
        try:
            manifest = folder.read_parquet(layout.MANIFEST_FILE)
        except FileNotFoundError:
            manifest = None
        if manifest is not None and set(manifest.column("name").to_pylist()) == set(marked):
            return set(marked), int(sum(manifest.column("samples").to_pylist()))

    def info(shard: str) -> dict[str, Any] | None:
        try:
            return folder.completion_info(shard)
        except FileNotFoundError:  # removed since the listing
            return None

    done, samples = set(), 0
    for shard, found in zip(marked, map_concurrently(info, marked, workers=workers), strict=True):
        # A marker of other inputs does not make the shard part of this version.
        if found is not None and found.get("fingerprint", version) == version:
            done.add(shard)
            samples += int(found.get("samples", 0))
    return done, samples


def _record_keys(root: Storage) -> list[tuple[str, str]]:
    """``(key, kind)`` of the records under an output root that may name an input dataset."""
    found = []
    for key in root.list(f"{layout.MODELS_PREFIX}/"):
        parts = key.split("/")
        # models/{run}/{file}.json; a folder named v-... is a dataset version, not a model run.
        if len(parts) == 3 and parts[2].endswith(".json") and not parts[1].startswith("v-"):
            found.append((key, "model"))
    for key in root.list(f"{layout.VECTORS_PREFIX}/"):
        parts = key.split("/")
        if len(parts) == 2 and parts[1].endswith(".json"):
            found.append((key, "vector"))
    for key in root.list(f"{layout.SWEEPS_PREFIX}/"):
        parts = key.split("/")
        if len(parts) == 3 and parts[2] == layout.SWEEP_SUMMARY_FILE:
            found.append((key, "sweep"))
    return found


def _strings(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Every string in a JSON value, with where it is (``config.targets[0].test_reference``)."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings(item, f"{path}[{index}]")


def _find_references(
    records: Sequence[Storage], wanted: Iterable[tuple[str, str]]
) -> tuple[dict[tuple[str, str], list[Reference]], list[str]]:
    """The records naming each wanted (name, version), and the records that could not be read."""
    wanted = set(wanted)
    found: dict[tuple[str, str], list[Reference]] = defaultdict(list)
    unreadable: list[str] = []
    if not wanted:
        return found, unreadable
    for root in records:
        keys = _record_keys(root)

        def read(key: str, root: Storage = root) -> Any:
            try:
                return root.read_json(key)
            except FileNotFoundError:  # removed since the listing: it names nothing now
                return None
            except ValueError as exc:  # not JSON: whatever it meant, nothing can read it
                logger.warning("record %s cannot be read (%s): ignored", root.url(key), exc)
                return exc

        for (key, kind), record in zip(
            keys, map_concurrently(read, [key for key, _ in keys]), strict=True
        ):
            if isinstance(record, ValueError):
                unreadable.append(root.url(key))
                continue
            for where, text in _strings(record):
                parts = [part for part in text.split("/") if part]
                for pair in zip(parts, parts[1:], strict=False):
                    if pair in wanted:
                        found[pair].append(Reference(root.url(key), kind, where))
    return found, unreadable


def _catalogue(
    roots: _Roots, objects: list[StoredObject]
) -> tuple[list[DatasetVersion], list[str]]:
    """Every version among ``objects``, with its references; and the unreadable records."""
    grouped = _group_versions(objects)
    # Versions described a few at a time, each reading its markers a few at a time: requests
    # in flight stay within the S3 client's connection pool.
    outer = max(1, min(_VERSIONS_AT_ONCE, len(grouped)))
    versions = map_concurrently(
        lambda item: _describe(roots.xdata, *item[0], item[1], workers=IO_WORKERS // outer),
        sorted(grouped.items()),
        workers=outer,
    )
    references, unreadable = _find_references(roots.records, grouped)
    described = [
        _with_references(version, references.get((version.name, version.version), []))
        for version in versions
    ]
    return described, unreadable


def _with_references(version: DatasetVersion, references: list[Reference]) -> DatasetVersion:
    return replace(version, references=tuple(references)) if references else version


def _sorted(versions: Iterable[DatasetVersion]) -> list[DatasetVersion]:
    """By name, split, then newest first."""
    newest_first = sorted(versions, key=lambda v: (v.created or _EPOCH, v.version), reverse=True)
    return sorted(newest_first, key=lambda v: (v.name, v.split or ""))


def list_versions(
    uri: str | PathLike[str], *, references_from: Sequence[str] = ()
) -> list[DatasetVersion]:
    """Every X-dataset version under ``uri``, by name and split, newest first.

    Args:
        uri: an output root (holding ``xdata/``), its ``xdata`` folder, or the output folder
            of a standalone ``build-dataset``; a path or an ``s3://`` URI.
        references_from: other output roots whose models, vectors and sweeps count as users
            of these versions.

    Raises:
        ObjectNotFoundError: no such folder, or no X-dataset version under it.
        StorageError: the root cannot be read (missing bucket, refused credentials).
    """
    roots, objects = _open_roots(uri, references_from)
    versions, _ = _catalogue(roots, objects)
    if not versions:
        raise ObjectNotFoundError(f"no X-dataset versions under {roots.uri}")
    return _sorted(versions)


def show_version(
    uri: str | PathLike[str], *, references_from: Sequence[str] = ()
) -> DatasetVersion:
    """One version, named by its folder's URI ``ROOT/NAME/VERSION``.

    ``ROOT`` is what :func:`list_versions` takes: ``out/xdata/shapes-x/v-0123abcd`` and
    ``out/shapes-x/v-0123abcd`` both name a version of the pipeline root ``out``.

    Raises:
        ValueError: ``uri`` does not end with ``NAME/v-HASH``.
        ObjectNotFoundError: no such version.
    """
    text = str(uri).rstrip("/")
    parts = text.rsplit("/", 2)
    if len(parts) == 2:  # a relative NAME/VERSION: under the current folder
        parts.insert(0, ".")
    root, name, version = parts if len(parts) == 3 else ("", "", "")
    if not version.startswith("v-") or not name or root.endswith((":/", ":")):
        raise ValueError(f"{text!r} does not name an X-dataset version: give ROOT/NAME/v-HASH")
    roots, objects = _open_roots(root or "/", references_from, f"{name}/{version}/")
    versions, _ = _catalogue(roots, objects)
    if not versions:
        raise ObjectNotFoundError(f"no X-dataset version {name}/{version} under {roots.uri}")
    return versions[0]


@dataclass(frozen=True)
class GcDecision:
    """What gc does with one version, and why."""

    version: DatasetVersion
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {**self.version.to_dict(), "reason": self.reason}


@dataclass(frozen=True)
class GcPlan:
    """The versions gc would remove and those it keeps, each with its reason.

    Attributes:
        uri: the root planned.
        keep: complete versions kept per dataset name and split.
        remove: the versions :func:`apply_gc` deletes.
        kept: the others.
        unreadable_records: records that could not be read (so they protect nothing).
    """

    uri: str
    keep: int
    remove: tuple[GcDecision, ...]
    kept: tuple[GcDecision, ...]
    unreadable_records: tuple[str, ...] = ()
    _roots: _Roots | None = field(default=None, repr=False, compare=False)

    @property
    def bytes(self) -> int:
        """What removing :attr:`remove` frees."""
        return sum(decision.version.bytes for decision in self.remove)

    def to_dict(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "keep": self.keep,
            "bytes": self.bytes,
            "remove": [decision.to_dict() for decision in self.remove],
            "kept": [decision.to_dict() for decision in self.kept],
            "unreadable_records": list(self.unreadable_records),
        }


def plan_gc(uri: str | PathLike[str], keep: int, *, references_from: Sequence[str] = ()) -> GcPlan:
    """Which versions under ``uri`` are superseded and used by nothing: deletes nothing.

    For each (name, split), versions are ordered by creation, newest first; the ``keep`` newest
    complete ones are kept, with every version newer than the last of them (a build running or
    waiting for a rerun). The older ones are removed, and so are orphaned folders (half-deleted
    versions), unless a model, vector or sweep record names them. Unreadable versions are kept.

    Args:
        uri: as :func:`list_versions` takes it.
        keep: complete versions kept per dataset name and split (at least 1).
        references_from: other output roots whose records protect versions too.

    Raises:
        ValueError: ``keep`` is below 1.
        ObjectNotFoundError: no such folder, or no X-dataset version under it.
    """
    if keep < 1:
        raise ValueError(f"--keep must be at least 1, got {keep}")
    roots, objects = _open_roots(uri, references_from)
    versions, unreadable = _catalogue(roots, objects)
    if not versions:
        raise ObjectNotFoundError(f"no X-dataset versions under {roots.uri}")
    remove, kept = [], []
    for decision, removable in _decide(versions, keep):
        if removable and decision.version.references:
            first = decision.version.references[0]
            more = len(decision.version.references) - 1
            reason = f"used by {first.record} ({first.field})" + (
                f" and {more} more" if more else ""
            )
            kept.append(GcDecision(decision.version, reason))
        elif removable:
            remove.append(decision)
        else:
            kept.append(decision)
    order = {id(v): i for i, v in enumerate(_sorted(versions))}
    return GcPlan(
        uri=roots.uri,
        keep=keep,
        remove=tuple(sorted(remove, key=lambda d: order[id(d.version)])),
        kept=tuple(sorted(kept, key=lambda d: order[id(d.version)])),
        unreadable_records=tuple(unreadable),
        _roots=roots,
    )


def _decide(versions: Iterable[DatasetVersion], keep: int) -> Iterator[tuple[GcDecision, bool]]:
    """``(decision, removable)`` for every version, before looking at references."""
    groups: dict[tuple[str, str], list[DatasetVersion]] = defaultdict(list)
    for version in versions:
        if version.status == "orphaned":
            yield GcDecision(version, "half-deleted: no config.json"), True
        elif version.status == "unreadable":
            yield GcDecision(version, "config.json unreadable: left alone"), False
        else:
            groups[(version.name, version.split or "")].append(version)
    for (name, split), group in groups.items():
        complete = 0
        for version in sorted(group, key=lambda v: (v.created or _EPOCH, v.version), reverse=True):
            if complete >= keep:
                reason = f"superseded by {keep} newer complete version(s) of {name}/{split}"
                yield GcDecision(version, reason), True
            elif version.status == "complete":
                complete += 1
                yield GcDecision(version, f"newest complete ({complete} of {keep})"), False
            else:
                reason = f"{version.status}, newer than the kept complete versions"
                yield GcDecision(version, reason), False


@dataclass(frozen=True)
class GcResult:
    """What :func:`apply_gc` did.

    Attributes:
        removed: the versions deleted.
        skipped: planned versions left alone, with why (used or changed since the plan).
        objects: objects deleted.
        bytes: bytes freed.
    """

    removed: tuple[DatasetVersion, ...]
    skipped: tuple[GcDecision, ...]
    objects: int
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "removed": [version.to_dict() for version in self.removed],
            "skipped": [decision.to_dict() for decision in self.skipped],
            "objects": self.objects,
            "bytes": self.bytes,
        }


def apply_gc(plan: GcPlan) -> GcResult:
    """Delete the versions ``plan`` removes, each as it is now, if still unused and unchanged.

    Each version is listed again first: one that a record names by now, or whose files changed
    since the plan (a rerun filling its shards), is skipped. A version is deleted in the
    reverse order of its writing: ``config.json``, the manifest, the completion markers, then
    shards, plan and reports, so that a crash midway leaves an orphaned folder (which the next
    gc removes), never a version that looks usable with files missing.

    Raises:
        ValueError: the plan was not made by :func:`plan_gc`.
    """
    if plan._roots is None:
        raise ValueError("apply_gc needs a plan made by plan_gc")
    roots = plan._roots
    planned = [decision.version for decision in plan.remove]
    references, _ = _find_references(roots.records, [(v.name, v.version) for v in planned])
    removed, skipped = [], []
    objects = freed = 0
    for version in planned:
        users = references.get((version.name, version.version), [])
        if users:
            skipped.append(GcDecision(version, f"used by {users[0].record} since the plan"))
            continue
        key = layout.xdata_version_key(version.name, version.version)
        listing = _group_versions(list_objects(roots.xdata, f"{key}/")).get(
            (version.name, version.version), []
        )
        now = _describe(roots.xdata, version.name, version.version, listing) if listing else None
        if now is None:
            skipped.append(GcDecision(version, "already gone"))
            continue
        if (now.keys, now.bytes, now.updated) != (version.keys, version.bytes, version.updated):
            skipped.append(GcDecision(version, "changed since the plan: left alone"))
            continue
        _delete_version(roots.xdata.child(key), now.keys)
        logger.info("removed X-dataset version %s (%d objects)", now.uri, len(now.keys))
        removed.append(now)
        objects += len(now.keys)
        freed += now.bytes
    return GcResult(tuple(removed), tuple(skipped), objects, freed)


def deletion_phases(keys: Iterable[str]) -> list[list[str]]:
    """A version's keys in the order they are deleted: what makes it a version first.

    ``config.json``, then ``manifest.parquet``, then ``_completions/`` (no shard is readable
    after that), then everything else (shards, plan files, reports).
    """
    keys = sorted(keys)
    first = [k for k in keys if k == layout.DATASET_CONFIG_FILE]
    manifest = [k for k in keys if k == layout.MANIFEST_FILE]
    markers = [k for k in keys if k.startswith(COMPLETIONS_PREFIX)]
    taken = set(first) | set(manifest) | set(markers)
    return [first, manifest, markers, [k for k in keys if k not in taken]]


def _delete_version(folder: Storage, keys: Iterable[str]) -> None:
    for phase in deletion_phases(keys):
        # Within a phase order does not matter; the phases run one after another.
        map_concurrently(folder.delete, phase)
    if isinstance(folder, LocalStorage):
        _remove_empty_folders(folder.root)


def _remove_empty_folders(top: os.PathLike[str]) -> None:
    """Remove ``top``'s empty subfolders, ``top`` and its parent when they end up empty.

    An object store has no folders; a local one would keep empty ``v-*/`` trees behind.
    """
    for dirpath, _dirnames, _filenames in os.walk(top, topdown=False):
        try:
            os.rmdir(dirpath)
        except OSError:  # not empty (written meanwhile): left as it is
            pass
    try:
        os.rmdir(os.path.dirname(os.fspath(top)))  # the dataset's folder, once its last version
    except OSError:
        pass

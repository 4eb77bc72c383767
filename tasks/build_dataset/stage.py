"""Stage 1: build an explanation dataset (an "X-dataset") with Kernel SHAP labels.

(About 600 lines: plan, label a shard and finalize share the :class:`BuildPlan` and its
completion rules; the config, the input listing and the batching live beside it.)

The builder turns any image-classification input (a synthetic domain, an ImageNet-style folder,
or existing WebDataset shards) into WebDataset shards whose samples carry, beside the original
image bytes and the label, the Kernel SHAP attributions of the explained model (``shap.npy``) and
the labelling metadata (``json``), as DESIGN.md specifies.

The work is split in three steps so that an orchestrator can fan out the middle one:

1. :func:`plan_build` validates the config, lists the input (sorted, deterministic), loads the
   explained model to fingerprint it, and derives the dataset *version* from a hash of
   (model fingerprint, labelling config, input listing). It writes ``config.json`` there.
2. :func:`label_shard` labels one output shard ``(shard_index, num_shards)`` and publishes it
   (tar upload first, completion marker last). A complete shard is skipped.
3. :func:`finalize_build` writes the Parquet manifest and the run's quarantine report.

A changed config, model or input gives a new version folder; the old one is never touched.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from storage import Storage, layout, open_storage
from storage.layout import shard_name, shard_report_key, split_report_key
from storage.shards import ShardWriter, write_manifest
from tasks.algorithms.kernel_shap import derive_seed, kernel_shap_explain
from tasks.build_dataset.batches import decode_workers, input_batches
from tasks.build_dataset.config import BuildConfig, LabelConfig
from tasks.build_dataset.inputs import (
    _dataset_mean,
    _image_tensor,
    _range_size,
    _sample_ranges,
    list_input,
)
from tasks.config import resolve_device
from tasks.data.images import IMAGE_FIELDS
from tasks.data.quarantine import QuarantineReport
from tasks.model import model_fingerprint
from tasks.model.loading import load_sem

logger = logging.getLogger(__name__)

#: Input fields an X-dataset sample carries over (DESIGN.md's format, plus the object mask the
#: synthetic domains give for the pointing game). Anything else an input sample holds (a
#: ``.pickle``, ``.pth`` or ``.pyd`` member that webdataset's default decoder would unpickle)
#: stays behind.
PASSED_FIELDS = ("__key__", *IMAGE_FIELDS, "cls", "mask.png")


@dataclass
class BuildPlan:
    """Everything a shard worker needs, derived once from a :class:`BuildConfig`.

    Attributes:
        config: the validated config.
        version: ``v-<hash>`` of (model fingerprint, labelling config, input listing).
        dataset_uri: where the shards of this version live.
        units: the sorted input listing (sample references or input shard keys).
        class_names: the classes of the explained model's head, in label order.
        model_fingerprint: content hash of the explained model's weights.
        baseline_mean: per-channel dataset mean in ``[0, 1]`` (the "mean" baseline).
        renamed_keys: new keys of WebDataset input samples whose key was used earlier in the
            listing, by ``"{shard}@{position}"``.
        listing_report: what listing the input skipped, with reasons (a
            :class:`QuarantineReport` as a dict), merged into the run's report.
    """

    config: BuildConfig
    version: str
    dataset_uri: str
    units: list[str]
    class_names: list[str]
    model_fingerprint: str
    baseline_mean: list[float] = field(default_factory=list)
    renamed_keys: dict[str, str] = field(default_factory=dict)
    listing_report: dict[str, Any] = field(default_factory=dict)

    def shard_key(self, shard_index: int) -> str:
        return shard_name(self.config.name, self.config.split, shard_index)

    def shard_units(self, shard_index: int) -> list[str]:
        """The contiguous block of the sorted listing that one output shard labels.

        For WebDataset input the listing is per input shard (``"{shard}@{samples}"``, counts
        from the completion markers), and the block is cut in samples, so output shards stay
        balanced however many input shards there are: the units returned are sample ranges
        ``"{shard}@{start}:{stop}"``.
        """
        shards = self.config.num_shards
        if not 0 <= shard_index < shards:
            raise ValueError(f"shard_index {shard_index} outside [0, {shards})")
        if self.config.preserve_layout:
            # Output shard i is input shard i, whole: the same samples in the same order.
            shard, samples = self.units[shard_index].rsplit("@", 1)
            return [f"{shard}@0:{samples}"]
        if self.config.input_kind == "webdataset":
            return _sample_ranges(self.units, shard_index, shards)
        n = len(self.units)
        return self.units[shard_index * n // shards : (shard_index + 1) * n // shards]

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "version": self.version,
            "dataset_uri": self.dataset_uri,
            "units": self.units,
            "class_names": self.class_names,
            "model_fingerprint": self.model_fingerprint,
            "baseline_mean": self.baseline_mean,
            "renamed_keys": self.renamed_keys,
            "listing_report": self.listing_report,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildPlan:
        return cls(
            config=BuildConfig.model_validate(data["config"]),
            version=data["version"],
            dataset_uri=data["dataset_uri"],
            units=list(data["units"]),
            class_names=list(data["class_names"]),
            model_fingerprint=data["model_fingerprint"],
            baseline_mean=list(data["baseline_mean"]),
            renamed_keys=dict(data.get("renamed_keys", {})),
            listing_report=dict(data.get("listing_report", {})),
        )


@dataclass
class ShardOutcome:
    """What labelling one shard did (``input_wait_seconds``: the model waiting for input)."""

    shard: str
    samples: int = 0
    quarantined: int = 0
    seconds: float = 0.0
    skipped: bool = False
    report: dict[str, Any] = field(default_factory=dict)
    input_wait_seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


@functools.lru_cache(maxsize=4)
def _cached_model(
    model_name: str,
    checkpoint: str | None,
    class_names: tuple[str, ...],
    grid: tuple[int, int],
    device: str,
) -> torch.nn.Module:
    loaded = load_sem(
        checkpoint, model_name=model_name, class_names=class_names, grid=grid, device=device
    )
    return loaded.sem


@functools.lru_cache(maxsize=4)
def _cached_fingerprint(
    model_name: str,
    checkpoint: str | None,
    class_names: tuple[str, ...],
    grid: tuple[int, int],
    device: str,
) -> str:
    model = _cached_model(model_name, checkpoint, class_names, grid, device)
    return model_fingerprint(model.clip)


def clear_model_cache() -> None:
    """Forget the explained models cached in this process (e.g. after changing torch threads)."""
    _cached_model.cache_clear()
    _cached_fingerprint.cache_clear()


def load_explained_model(config: BuildConfig, class_names: Sequence[str]) -> torch.nn.Module:
    """The explained model: a self-explaining CLIP whose ``predict`` is explained.

    Cached per process, so the shards a worker labels share one copy.
    """
    device = str(resolve_device(config.device))
    grid = config.label.grid
    return _cached_model(config.model_name, config.checkpoint, tuple(class_names), grid, device)


def explained_model_fingerprint(config: BuildConfig, class_names: Sequence[str]) -> str:
    """The fingerprint of :func:`load_explained_model`'s weights (cached per process)."""
    device = str(resolve_device(config.device))
    key = (config.model_name, config.checkpoint, tuple(class_names), config.label.grid, device)
    return _cached_fingerprint(*key)


def plan_build(config: BuildConfig) -> BuildPlan:
    """Validate a build, list its input, fingerprint the model, and fix the dataset version.

    Writes ``config.json`` (the full config, version, fingerprints) into the version folder.
    Everything that can be wrong with the config (unknown model, missing checkpoint, missing
    bucket, empty input) fails here, before any labelling.
    """
    output = open_storage(config.output_uri)
    # A missing bucket or refused credentials must fail here, before the model is loaded.
    output.exists(f"{config.name}/config.json")
    listing = list_input(config)
    units, class_names = listing.units, listing.class_names
    if config.preserve_layout:
        config = config.model_copy(update={"num_shards": len(units)})
    fingerprint = explained_model_fingerprint(config, class_names)
    mean = _dataset_mean(config, units) if config.label.baseline == "mean" else []
    listed = "\n".join(units)
    if listing.renames:
        # Renamed keys change the samples' keys and seeds, so they are part of the version.
        listed += "\n" + json.dumps(listing.renames, sort_keys=True)
    if config.max_per_class is not None:
        # A limit that happens to keep every image still names another build.
        listed += f"\nmax_per_class={config.max_per_class}"
    input_digest = hashlib.sha256(listed.encode()).hexdigest()
    version = "v-" + config.label.fingerprint(
        fingerprint,
        class_names,
        input_digest,
        config.input_kind,
        config.input_uri,
        config.source_split,
        config.image_size,
        config.num_shards,
        mean,
    )
    dataset = output.child(layout.xdata_version_key(config.name, version))
    plan = BuildPlan(
        config=config,
        version=version,
        dataset_uri=dataset.uri,
        units=units,
        class_names=class_names,
        model_fingerprint=fingerprint,
        baseline_mean=mean,
        renamed_keys=listing.renames,
        listing_report=listing.report.to_dict(),
    )
    if not dataset.exists(layout.DATASET_CONFIG_FILE):
        dataset.write_json(
            layout.DATASET_CONFIG_FILE,
            {
                "config": config.to_dict(),
                "version": version,
                "model_fingerprint": fingerprint,
                "input_digest": input_digest,
                "inputs": len(units),
                "class_names": class_names,
                "baseline_mean": mean,
            },
        )
        dataset.write_json("classes.json", {"class_names": class_names})
    logger.info(
        "explanation dataset %s %s: %d inputs in %d shards at %s",
        config.name,
        version,
        len(units),
        config.num_shards,
        dataset.uri,
    )
    return plan


def _classes_to_explain(labels: torch.Tensor, logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """``[N, 1 + top_k]``: the label first, then the top predicted classes."""
    if top_k == 0:
        return labels.unsqueeze(1)
    top = logits.topk(min(top_k, logits.shape[1]), dim=1).indices.cpu()
    return torch.cat([labels.unsqueeze(1), top], dim=1)


def _unique_in_order(values: Sequence[int]) -> list[int]:
    seen: list[int] = []
    for value in values:
        if value not in seen:
            seen.append(value)
    return seen


def label_samples(
    model: torch.nn.Module,
    samples: Sequence[dict[str, Any]],
    label: LabelConfig,
    *,
    image_size: int,
    baseline_mean: Sequence[float] | None,
    model_fingerprint: str,
    images: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """Kernel SHAP labels for a batch of decoded-able samples: X-dataset sample dicts.

    Each output sample keeps the input fields of :data:`PASSED_FIELDS` (the original image
    bytes unchanged, ``cls``, a mask if any), drops any other, and adds ``shap.npy`` (float32
    ``[k, gh, gw]``, label class first, then the top predicted classes that differ) and
    ``json`` (the labelling metadata). With ``label.error_estimate`` it also adds
    ``shap_err.npy`` (the bootstrap standard error of each attribution, same shape) and
    ``relative_error`` per class in ``json`` (``||err|| / ||phi||``).

    Args:
        images: the samples' images already decoded (``[N, 3, S, S]`` in ``[0, 1]``); decoded
            here when omitted.
    """
    device = next(model.parameters()).device
    if images is None:
        images = torch.stack([_image_tensor(s, image_size) for s in samples])
    # Pinned host memory (the input batches pin theirs for CUDA) copies without blocking.
    images = images.to(device, non_blocking=device.type == "cuda" and images.is_pinned())
    labels = torch.tensor([int(s["cls"]) for s in samples], dtype=torch.long)
    classifier = model.as_classifier() if hasattr(model, "as_classifier") else model
    classifier.eval()
    with torch.inference_mode():
        logits = classifier(images)
    classes = _classes_to_explain(labels, logits, label.top_k)
    baseline: str | torch.Tensor = label.baseline
    if label.baseline == "mean":
        baseline = torch.tensor(baseline_mean, dtype=images.dtype, device=device)
    result = kernel_shap_explain(
        classifier,
        images,
        classes.to(device),
        grid=label.grid,
        budget=label.budget,
        baseline=baseline,
        output=label.output,
        seed=[derive_seed(str(s["__key__"]), label.seed) for s in samples],
        batch_size=label.forward_batch_size,
        sampler=label.sampler,
        error_estimate=label.error_estimate,
    )
    relative_error = result.relative_error()
    labelled = []
    for i, sample in enumerate(samples):
        meta = result.image_metadata(i)
        row_classes = [int(c) for c in classes[i]]
        keep = [row_classes.index(c) for c in _unique_in_order(row_classes)]
        phi = result.phi[i][keep].numpy().astype(np.float32)
        meta.update(
            classes=[row_classes[j] for j in keep],
            v_empty=[meta["v_empty"][j] for j in keep],
            v_full=[meta["v_full"][j] for j in keep],
            predicted=int(logits[i].argmax()),
            baseline_mean=list(baseline_mean or []),
            model=model_fingerprint,
        )
        out = {k: v for k, v in sample.items() if k in PASSED_FIELDS}
        out["shap.npy"] = _npy_bytes(phi)
        if result.phi_err is not None and relative_error is not None:
            out["shap_err.npy"] = _npy_bytes(result.phi_err[i][keep].numpy().astype(np.float32))
            meta["relative_error"] = [float(relative_error[i][j]) for j in keep]
        out["json"] = meta
        labelled.append(out)
    return labelled


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def label_shard(
    plan: BuildPlan,
    shard_index: int,
    *,
    overwrite: bool = False,
    progress: Any = None,
) -> ShardOutcome:
    """Label and publish one output shard; skip it when already complete.

    The shard is written locally, uploaded, and only then marked complete, so a crash at any
    point leaves either the whole shard or nothing visible. Bad inputs are quarantined with a
    reason in ``reports/shards/{shard}.json`` (written before the marker).

    Args:
        plan: the build plan from :func:`plan_build`.
        shard_index: which output shard, in ``[0, num_shards)``.
        overwrite: relabel a complete shard.
        progress: optional callable ``(done_images, total_images)``.
    """
    config = plan.config
    dataset = open_storage(plan.dataset_uri)
    shard = plan.shard_key(shard_index)
    if not overwrite and dataset.is_done(shard, plan.version, shard):
        logger.info("shard %s already complete; skipped", shard)
        return ShardOutcome(shard=shard, skipped=True, **_marker_counts(dataset, shard))
    start = time.perf_counter()
    units = plan.shard_units(shard_index)
    report = QuarantineReport()
    model = load_explained_model(config, plan.class_names)
    fingerprint = explained_model_fingerprint(config, plan.class_names)
    if fingerprint != plan.model_fingerprint:
        # The checkpoint changed since the plan (or the model is not reproducible): labels from
        # another model would be published under this version's name.
        raise ValueError(
            f"explained model {config.model_name} ({config.checkpoint or 'random init'}) has "
            f"fingerprint {fingerprint}, but the plan of {plan.version} was made with "
            f"{plan.model_fingerprint}; plan the build again"
        )
    if config.input_kind == "webdataset":
        expected = sum(_range_size(unit) for unit in units)
    else:
        expected = len(units)
    device = next(model.parameters()).device
    workers = decode_workers(config, device)
    written = 0
    waited = 0.0
    errors: list[float] = []
    with (
        ShardWriter(dataset, shard, fingerprint=plan.version) as writer,
        # Streamed in batches, read and decoded ahead of the model by `workers` threads: each
        # image is decoded once, and a shard is never held whole.
        input_batches(
            config,
            units,
            num_classes=len(plan.class_names),
            workers=workers,
            pin_memory=device.type == "cuda",
            renames=plan.renamed_keys,
        ) as batches,
    ):
        while True:
            asked = time.perf_counter()
            batch = next(batches, None)
            waited += time.perf_counter() - asked
            if batch is None:
                break
            report.merge(batch.report)
            if not batch.samples:
                continue
            for out in label_samples(
                model,
                batch.samples,
                config.label,
                image_size=config.image_size,
                baseline_mean=plan.baseline_mean,
                model_fingerprint=plan.model_fingerprint,
                images=batch.images,
            ):
                writer.write(out)
                written += 1
                if "relative_error" in out["json"]:
                    errors.append(out["json"]["relative_error"][0])
            if progress is not None:
                progress(written, expected)
        dataset.write_json(shard_report_key(shard), report.to_dict())
        if errors:  # the label class's estimated relative error of every sample
            dataset.write_json(layout.shard_error_report_key(shard), {"relative_error": errors})
    seconds = time.perf_counter() - start
    logger.info(
        "shard %s: %d samples labelled, %d quarantined, %.1f images/s, "
        "%.0f%% of the time waiting for input (%d decode workers)",
        shard,
        written,
        report.num_quarantined(),
        written / seconds if seconds else 0.0,
        100 * waited / seconds if seconds else 0.0,
        workers,
    )
    return ShardOutcome(
        shard=shard,
        samples=written,
        quarantined=report.num_quarantined(),
        seconds=seconds,
        input_wait_seconds=waited,
        report=report.to_dict(),
    )


def _marker_counts(dataset: Storage, shard: str) -> dict[str, Any]:
    info = dataset.completion_info(shard)
    return {"samples": int(info.get("samples", 0))}


def finalize_build(plan: BuildPlan) -> dict[str, Any]:
    """Write the manifest of the complete shards and a summary of the build.

    Returns:
        ``{"dataset_uri", "version", "complete", "missing", "samples", "quarantined"}``;
        ``missing`` lists the shards without a completion marker (failed ones). With
        ``error_estimate`` labels, ``label_error`` summarises the label class's estimated
        relative error over the samples (``images``, ``mean``, ``median``, ``p90``; also written
        to ``reports/{name}-{split}-label-error.json``).
    """
    dataset = open_storage(plan.dataset_uri)
    expected = [plan.shard_key(i) for i in range(plan.config.num_shards)]
    complete = [s for s in expected if dataset.is_done(s, plan.version, s)]
    missing = [s for s in expected if s not in complete]
    table = write_manifest(dataset, complete)
    report = QuarantineReport()
    if plan.listing_report:
        report.merge(QuarantineReport.from_dict(plan.listing_report))
    for shard in complete:
        key = shard_report_key(shard)
        if dataset.exists(key):
            report.merge(QuarantineReport.from_dict(dataset.read_json(key)))
    dataset.write_json(split_report_key(plan.config.name, plan.config.split), report.to_dict())
    samples = int(sum(table.column("samples").to_pylist())) if table.num_rows else 0
    summary = {
        "dataset_uri": plan.dataset_uri,
        "version": plan.version,
        "complete": complete,
        "missing": missing,
        "samples": samples,
        "inputs": len(plan.units),
        "quarantined": report.num_quarantined(),
    }
    errors = [
        value
        for shard in complete
        if dataset.exists(layout.shard_error_report_key(shard))
        for value in dataset.read_json(layout.shard_error_report_key(shard))["relative_error"]
    ]
    if errors:
        values = np.asarray(errors)
        summary["label_error"] = {
            "images": len(values),
            "mean": float(values.mean()),
            "median": float(np.median(values)),
            "p90": float(np.quantile(values, 0.9)),
        }
        dataset.write_json(
            layout.split_error_report_key(plan.config.name, plan.config.split),
            summary["label_error"],
        )
    logger.info("explanation dataset %s: %s", plan.version, summary)
    return summary


class BuildProgress:
    """How many shards of a build are complete, for a progress bar beside the running build.

    The version being built is a version folder that appeared after this object was made, or
    an existing one planned from the same config (a rerun that fills missing shards).

    Args:
        config: the build being watched.
    """

    def __init__(self, config: BuildConfig) -> None:
        self.config = config
        self.output = open_storage(config.output_uri)
        self.before = self._versions()

    def _versions(self) -> set[str]:
        keys = self.output.list(f"{self.config.name}/")
        return {version for key in keys if (version := layout.version_of(key))}

    def _planned_from_this_config(self, version: str) -> bool:
        key = f"{layout.xdata_version_key(self.config.name, version)}/{layout.DATASET_CONFIG_FILE}"
        if not self.output.exists(key):
            return False
        # decode_workers changes how fast, not what, so a rerun with other workers is the same build.
        planned = dict(self.output.read_json(key).get("config") or {})
        planned.pop("decode_workers", None)
        current = self.config.to_dict()
        current.pop("decode_workers", None)
        return planned == current

    def complete_shards(self) -> int:
        """Complete shards of the build's split in the version being built."""
        versions = self._versions()
        built = (versions - self.before) or {
            v for v in versions if self._planned_from_this_config(v)
        }
        counts = [
            len(
                layout.shards_of(
                    self.output.child(layout.xdata_version_key(self.config.name, v)).completed(),
                    self.config.name,
                    self.config.split,
                )
            )
            for v in built
        ]
        return max(counts, default=0)

"""Stage 1: build an explanation dataset (an "X-dataset") with Kernel SHAP labels.

(About 800 lines: plan, label a shard and finalize share the :class:`BuildPlan` and its
completion rules; the config, the input listing and the batching live beside it.)

The builder turns any image-classification input (a synthetic domain, an ImageNet-style folder,
or existing WebDataset shards) into WebDataset shards whose samples carry, beside the original
image bytes and the label, the Kernel SHAP attributions of the explained model (``shap.npy``) and
the labelling metadata (``json``), as DESIGN.md specifies.

The work is split in three steps so that an orchestrator can fan out the middle one:

1. :func:`plan_build` validates the config, lists the input (sorted, deterministic), loads the
   explained model to fingerprint it, and derives the dataset *version* from a hash of
   (model fingerprint, labelling config, input listing). It writes ``config.json`` there and
   the plan of every output shard (``plan/{shard}.json``: the input units it labels), so that
   the :class:`BuildPlan` handed to the shard tasks stays small whatever the input's size.
2. :func:`label_task` labels the output shards of one task (:meth:`BuildPlan.task_shards`),
   each with :func:`label_shard`, which publishes it (tar upload first, completion marker last)
   and skips a complete one.
3. :func:`finalize_build` writes the Parquet manifest and the run's quarantine report.

A changed config, model or input gives a new version folder; the old one is never touched.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from storage import Storage, layout, open_storage
from storage.checkpoints import checkpoint_fingerprint
from storage.core import map_concurrently
from storage.layout import shard_name, shard_report_key, split_report_key
from storage.shards import ShardWriter, write_manifest
from tasks.algorithms.kernel_shap import KernelShapResult, derive_seed, kernel_shap_explain
from tasks.algorithms.kernel_shap_stream import ExplainRequest, kernel_shap_stream
from tasks.build_dataset.batches import decode_workers, input_batches
from tasks.build_dataset.config import BuildConfig, LabelConfig
from tasks.build_dataset.inputs import (
    _image_tensor,
    _range_size,
    _sample_ranges,
    _unit_span,
    dataset_mean,
    list_input,
)
from tasks.config import resolve_device
from tasks.data.images import IMAGE_FIELDS
from tasks.data.quarantine import QuarantineReport
from tasks.model import model_fingerprint
from tasks.model.loading import load_sem, weights_uri

logger = logging.getLogger(__name__)

#: Input fields an X-dataset sample carries over (DESIGN.md's format, plus the object mask the
#: synthetic domains give for the pointing game). Anything else an input sample holds (a
#: ``.pickle``, ``.pth`` or ``.pyd`` member that webdataset's default decoder would unpickle)
#: stays behind.
PASSED_FIELDS = ("__key__", *IMAGE_FIELDS, "cls", "mask.png")

#: Part of every dataset version: raised whenever the same settings give other labels or other
#: samples (the sampling design, the solve, the decoding, the fields written), so that a
#: version made by an older labeller is never taken for, or completed as, the current one.
#: 2: decoding at the model's size (only the centre crop resized), game.npz.
LABELLER_REVISION = 2


@dataclass
class BuildPlan:
    """Everything a shard worker needs, derived once from a :class:`BuildConfig`.

    Small whatever the input: the listing is not part of what :meth:`to_dict` gives a task.
    :func:`plan_build` writes the units of each output shard to ``plan/{shard}.json`` in the
    version folder, and a shard task reads its own (:meth:`shard_plan`). The planning process
    keeps the whole listing in memory (``units``), and uses it instead.

    Attributes:
        config: the validated config (``num_shards`` as given: under ``preserve_layout`` the
            number of tasks, see :attr:`output_shards`).
        version: ``v-<hash>`` of (model fingerprint, labelling config, input listing).
        dataset_uri: where the shards of this version live.
        class_names: the classes of the explained model's head, in label order.
        model_fingerprint: content hash of the explained model's weights.
        inputs: the input images listed (samples, for WebDataset input).
        output_shards: the shards the version holds: ``config.num_shards``, or one per input
            shard under ``preserve_layout``.
        baseline_mean: per-channel dataset mean in ``[0, 1]`` (the "mean" baseline).
        units: the sorted input listing (sample references or input shard keys); only in the
            process that planned (``None`` in a plan rebuilt by :meth:`from_dict`).
        renamed_keys: new keys of WebDataset input samples whose key was used earlier in the
            listing, by ``"{shard}@{position}"``; only in the process that planned.
        listing_report: what listing the input skipped, with reasons (a
            :class:`QuarantineReport` as a dict); only in the process that planned, and
            written beside the plan for :func:`finalize_build`.
    """

    config: BuildConfig
    version: str
    dataset_uri: str
    class_names: list[str]
    model_fingerprint: str
    inputs: int
    output_shards: int
    baseline_mean: list[float] = field(default_factory=list)
    units: list[str] | None = field(default=None, repr=False)
    renamed_keys: dict[str, str] | None = field(default=None, repr=False)
    listing_report: dict[str, Any] | None = field(default=None, repr=False)
    _renames_by_shard: dict[str, dict[int, str]] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def shard_key(self, shard_index: int) -> str:
        return shard_name(self.config.name, self.config.split, shard_index)

    @property
    def num_tasks(self) -> int:
        """Labelling tasks: one per output shard, or under ``preserve_layout`` ``num_shards``
        groups of consecutive output shards (never more tasks than shards)."""
        if self.config.preserve_layout:
            return min(self.config.num_shards, self.output_shards)
        return self.output_shards

    def task_shards(self, task_index: int) -> range:
        """The output shards one task labels: a contiguous block, blocks differing by one."""
        tasks, shards = self.num_tasks, self.output_shards
        if not 0 <= task_index < tasks:
            raise ValueError(f"task_index {task_index} outside [0, {tasks})")
        return range(task_index * shards // tasks, (task_index + 1) * shards // tasks)

    def shard_units(self, shard_index: int) -> list[str]:
        """The contiguous block of the sorted listing that one output shard labels.

        For WebDataset input the listing is per input shard (``"{shard}@{samples}"``, counts
        from the completion markers), and the block is cut in samples, so output shards stay
        balanced however many input shards there are: the units returned are sample ranges
        ``"{shard}@{start}:{stop}"``. Under ``preserve_layout`` output shard ``i`` is input
        shard ``i``, whole.
        """
        return self.shard_plan(shard_index)[0]

    def shard_plan(self, shard_index: int) -> tuple[list[str], dict[str, str]]:
        """``(units, renamed keys)`` of one output shard: computed from the listing in the
        planning process, read from ``plan/{shard}.json`` (one request) anywhere else."""
        if not 0 <= shard_index < self.output_shards:
            raise ValueError(f"shard_index {shard_index} outside [0, {self.output_shards})")
        if self.units is not None:
            units = _shard_units_of(self.config, self.units, shard_index, self.output_shards)
            if self._renames_by_shard is None:
                self._renames_by_shard = {}
                for where, key in (self.renamed_keys or {}).items():
                    shard, _, position = where.rpartition("@")
                    self._renames_by_shard.setdefault(shard, {})[int(position)] = key
            return units, _renames_within(units, self._renames_by_shard)
        stored = open_storage(self.dataset_uri).read_json(
            layout.plan_shard_key(self.shard_key(shard_index))
        )
        return list(stored["units"]), dict(stored.get("renames", {}))

    def to_dict(self) -> dict[str, Any]:
        """The plan as task parameters: O(1) in the size of the input (no listing)."""
        return {
            "config": self.config.to_dict(),
            "version": self.version,
            "dataset_uri": self.dataset_uri,
            "class_names": self.class_names,
            "model_fingerprint": self.model_fingerprint,
            "inputs": self.inputs,
            "output_shards": self.output_shards,
            "baseline_mean": self.baseline_mean,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildPlan:
        config = BuildConfig.model_validate(data["config"])
        return cls(
            config=config,
            version=data["version"],
            dataset_uri=data["dataset_uri"],
            class_names=list(data["class_names"]),
            model_fingerprint=data["model_fingerprint"],
            inputs=int(data["inputs"]),
            output_shards=int(data["output_shards"]),
            baseline_mean=list(data["baseline_mean"]),
        )


def _shard_units_of(
    config: BuildConfig, units: Sequence[str], shard_index: int, shards: int
) -> list[str]:
    if config.preserve_layout:
        shard, samples = units[shard_index].rsplit("@", 1)
        return [f"{shard}@0:{samples}"]
    if config.input_kind == "webdataset":
        return _sample_ranges(units, shard_index, shards)
    n = len(units)
    return list(units[shard_index * n // shards : (shard_index + 1) * n // shards])


def _renames_within(units: Sequence[str], renames: dict[str, dict[int, str]]) -> dict[str, str]:
    """The renamed keys (by input shard, then position) of the samples inside some ranges."""
    inside: dict[str, str] = {}
    if not renames:  # the usual case, and every input kind but WebDataset
        return inside
    for unit in units:
        shard, start, stop = _unit_span(unit)
        for position, key in renames.get(shard, {}).items():
            if start <= position < stop:
                inside[f"{shard}@{position}"] = key
    return inside


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


#: Explained models kept per process: a long-lived worker labels shards of a build or two.
MODEL_CACHE_SIZE = 2


@dataclass
class _CachedModel:
    content: str | None
    model: torch.nn.Module
    fingerprint: str


_models: OrderedDict[tuple[Any, ...], _CachedModel] = OrderedDict()
_models_lock = threading.Lock()


def _explained_model(config: BuildConfig, class_names: Sequence[str]) -> _CachedModel:
    """The explained model and its fingerprint, cached per process by checkpoint *content*.

    A long-lived worker (Dask) labels many shards; the checkpoint's content fingerprint (its
    sidecar's, or its bytes' hash cached per object version: one metadata request) is checked
    for each, so a checkpoint rewritten at the same URI is loaded again, never served stale.
    """
    device = str(resolve_device(config.device))
    key = (config.model_name, config.checkpoint, tuple(class_names), config.label.grid, device)
    content = checkpoint_fingerprint(weights_uri(config.checkpoint)) if config.checkpoint else None
    with _models_lock:
        cached = _models.get(key)
        if cached is not None and cached.content == content:
            _models.move_to_end(key)
            return cached
        if cached is not None:
            logger.info(
                "checkpoint %s changed (%s, was %s): loading it again",
                config.checkpoint,
                content,
                cached.content,
            )
            # Dropped before the new one loads: two large models need not fit at once.
            del _models[key]
        loaded = load_sem(
            config.checkpoint,
            model_name=config.model_name,
            class_names=tuple(class_names),
            grid=config.label.grid,
            device=device,
        )
        entry = _CachedModel(content, loaded.sem, model_fingerprint(loaded.sem.clip))
        _models[key] = entry
        while len(_models) > MODEL_CACHE_SIZE:
            _models.popitem(last=False)
        return entry


def clear_model_cache() -> None:
    """Forget the explained models cached in this process (e.g. after changing torch threads)."""
    with _models_lock:
        _models.clear()


def load_explained_model(config: BuildConfig, class_names: Sequence[str]) -> torch.nn.Module:
    """The explained model: a self-explaining CLIP whose ``predict`` is explained.

    Cached per process, so the shards a worker labels share one copy, as long as the
    checkpoint's content does not change.
    """
    return _explained_model(config, class_names).model


def explained_model_fingerprint(config: BuildConfig, class_names: Sequence[str]) -> str:
    """The fingerprint of :func:`load_explained_model`'s weights (cached with the model)."""
    return _explained_model(config, class_names).fingerprint


def plan_build(config: BuildConfig) -> BuildPlan:
    """Validate a build, list its input, fingerprint the model, and fix the dataset version.

    Writes ``config.json`` (the full config, version, fingerprints, how the baseline mean was
    estimated) into the version folder, then the plan of every output shard
    (``plan/{shard}.json``, concurrently) and the listing's report, and last the plan's
    completion marker; a rerun of the same version finds them and writes nothing. Everything
    that can be wrong with the config (unknown model, missing checkpoint, missing bucket,
    empty input) fails here, before any labelling.
    """
    output = open_storage(config.output_uri)
    # A missing bucket or refused credentials must fail here, before the model is loaded.
    output.exists(f"{config.name}/config.json")
    listing = list_input(config)
    units, class_names = listing.units, listing.class_names
    output_shards = len(units) if config.preserve_layout else config.num_shards
    if config.preserve_layout:
        logger.info(
            "preserve_layout: %d output shards, one per input shard (the layout wins over "
            "num_shards); num_shards=%d sets the labelling tasks: %d",
            output_shards,
            config.num_shards,
            min(config.num_shards, output_shards),
        )
    fingerprint = explained_model_fingerprint(config, class_names)
    mean, mean_sample = dataset_mean(config, units) if config.label.baseline == "mean" else ([], {})
    listed = "\n".join(units)
    if listing.renames:
        # Renamed keys change the samples' keys and seeds, so they are part of the version.
        listed += "\n" + json.dumps(listing.renames, sort_keys=True)
    if config.max_per_class is not None:
        # A limit that happens to keep every image still names another build.
        listed += f"\nmax_per_class={config.max_per_class}"
    input_digest = hashlib.sha256(listed.encode()).hexdigest()
    # Decoding on the device moves pixels by up to 1/255, so it names another version; the
    # host's decoding names the versions it always named.
    decoded_on = (config.decode,) if config.decode != "host" else ()
    version = "v-" + config.label.fingerprint(
        LABELLER_REVISION,
        fingerprint,
        class_names,
        input_digest,
        config.input_kind,
        config.input_uri,
        config.source_split,
        config.image_size,
        output_shards,
        mean,
        *decoded_on,
    )
    if config.input_kind == "webdataset":
        inputs = sum(_range_size(unit) for unit in units)
    else:
        inputs = len(units)
    dataset = output.child(layout.xdata_version_key(config.name, version))
    plan = BuildPlan(
        config=config,
        version=version,
        dataset_uri=dataset.uri,
        class_names=class_names,
        model_fingerprint=fingerprint,
        inputs=inputs,
        output_shards=output_shards,
        baseline_mean=mean,
        units=units,
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
                "inputs": inputs,
                "output_shards": output_shards,
                "class_names": class_names,
                "baseline_mean": mean,
                "baseline_mean_sample": mean_sample,
            },
        )
        dataset.write_json("classes.json", {"class_names": class_names})
    if not dataset.is_done(layout.PLAN_UNIT, version):
        _write_plan(plan, dataset)
    logger.info(
        "explanation dataset %s %s: %d inputs in %d shards (%d tasks) at %s",
        config.name,
        version,
        inputs,
        output_shards,
        plan.num_tasks,
        dataset.uri,
    )
    return plan


def _write_plan(plan: BuildPlan, dataset: Storage) -> None:
    """The plan of every output shard, the listing's report, then the plan's marker."""
    files = []
    for index in range(plan.output_shards):
        units, renames = plan.shard_plan(index)
        key = layout.plan_shard_key(plan.shard_key(index))
        files.append((key, {"shard": plan.shard_key(index), "units": units, "renames": renames}))
    files.append((layout.PLAN_LISTING_REPORT_KEY, plan.listing_report or {}))
    dataset.write_json_many(files)
    dataset.publish_done(layout.PLAN_UNIT, plan.version, shards=plan.output_shards)


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


def _explain_settings(
    label: LabelConfig, baseline_mean: Sequence[float] | None, device: torch.device
) -> dict[str, Any]:
    """The Kernel SHAP settings of a build (the same for every batch of it)."""
    baseline: str | torch.Tensor = label.baseline
    if label.baseline == "mean":
        baseline = torch.tensor(baseline_mean, dtype=torch.float32, device=device)
    return {
        "grid": label.grid,
        "budget": label.budget,
        "baseline": baseline,
        "output": label.output,
        "batch_size": label.forward_batch_size,
        "sampler": label.sampler,
        "error_estimate": label.error_estimate,
        "precision": label.precision,
        "shrinkage": label.shrinkage,
        "front_load": label.front_load,
    }


def _explain_request(
    classifier: torch.nn.Module,
    samples: Sequence[dict[str, Any]],
    label: LabelConfig,
    *,
    image_size: int,
    images: torch.Tensor | None,
    device: torch.device,
) -> ExplainRequest:
    """The labelling request of one input batch: its images on the device, the classes to explain.

    Runs where the model runs (the labeller's model thread): one classifier forward picks the
    top predicted classes. The context is ``(samples, classes [N, 1 + top_k], predicted [N])``.
    """
    if images is None:
        images = torch.stack([_image_tensor(s, image_size) for s in samples])
    # Pinned host memory (the input batches pin theirs for CUDA) copies without blocking.
    images = images.to(device, non_blocking=device.type == "cuda" and images.is_pinned())
    labels = torch.tensor([int(s["cls"]) for s in samples], dtype=torch.long)
    with torch.inference_mode():
        logits = classifier(images)
    classes = _classes_to_explain(labels, logits, label.top_k)
    return ExplainRequest(
        images=images,
        classes=classes.to(device),
        seeds=[derive_seed(str(s["__key__"]), label.seed) for s in samples],
        context=(samples, classes, logits.argmax(dim=1).cpu()),
    )


def _labelled_samples(
    request: ExplainRequest,
    result: KernelShapResult,
    *,
    baseline_mean: Sequence[float] | None,
    model_fingerprint: str,
    keep_game: bool,
) -> list[dict[str, Any]]:
    """The X-dataset samples of an explained request (see :func:`label_samples`)."""
    samples, classes, predicted = request.context
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
            predicted=int(predicted[i]),
            baseline_mean=list(baseline_mean or []),
            model=model_fingerprint,
        )
        out = {k: v for k, v in sample.items() if k in PASSED_FIELDS}
        out["shap.npy"] = _npy_bytes(phi)
        if result.phi_err is not None and relative_error is not None:
            out["shap_err.npy"] = _npy_bytes(result.phi_err[i][keep].numpy().astype(np.float32))
            meta["relative_error"] = [float(relative_error[i][j]) for j in keep]
        if keep_game and result.games is not None:
            out["game.npz"] = result.games[i].to_npz()
        out["json"] = meta
        labelled.append(out)
    return labelled


def _classifier(model: torch.nn.Module) -> torch.nn.Module:
    classifier = model.as_classifier() if hasattr(model, "as_classifier") else model
    return classifier.eval()


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
    ``relative_error`` per class in ``json`` (``||err|| / ||phi||``). With
    ``label.keep_game`` (the default) it adds ``game.npz``: the coalitions evaluated and their
    values (:mod:`tasks.algorithms.games`), from which
    :func:`tasks.build_dataset.resolve.resolve_samples` solves the labels
    again without the model. :func:`label_shard` labels its batches the same way, overlapped
    (:func:`kernel_shap_stream`).

    Args:
        images: the samples' images already decoded (``[N, 3, S, S]`` in ``[0, 1]``); decoded
            here when omitted.
    """
    device = next(model.parameters()).device
    classifier = _classifier(model)
    request = _explain_request(
        classifier, samples, label, image_size=image_size, images=images, device=device
    )
    result = kernel_shap_explain(
        classifier,
        request.images,
        request.classes,
        seed=request.seeds,
        **_explain_settings(label, baseline_mean, device),
    )
    return _labelled_samples(
        request,
        result,
        baseline_mean=baseline_mean,
        model_fingerprint=model_fingerprint,
        keep_game=label.keep_game,
    )


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

    A transient storage error (a 5xx, throttling, a dropped connection, after the storage
    layer's retries) while reading the inputs fails the shard, so that its task's retry reads
    them again; only inputs that are bad in themselves are quarantined.

    Args:
        plan: the build plan from :func:`plan_build`.
        shard_index: which output shard, in ``[0, plan.output_shards)``.
        overwrite: relabel a complete shard.
        progress: optional callable ``(done_images, total_images)``.
    """
    dataset = open_storage(plan.dataset_uri)
    shard = plan.shard_key(shard_index)
    done = None if overwrite else _done_info(dataset, shard, plan.version)
    if done is not None:
        logger.info("shard %s already complete; skipped", shard)
        return ShardOutcome(shard=shard, skipped=True, samples=int(done.get("samples", 0)))
    return _label(plan, shard_index, plan.shard_plan(shard_index), dataset, progress)


def _label(
    plan: BuildPlan,
    shard_index: int,
    shard_plan: tuple[list[str], dict[str, str]],
    dataset: Storage,
    progress: Any,
    explained: _CachedModel | None = None,
) -> ShardOutcome:
    """Label one output shard whose units are ``shard_plan`` (it is not complete)."""
    config = plan.config
    shard = plan.shard_key(shard_index)
    start = time.perf_counter()
    units, renames = shard_plan
    report = QuarantineReport()
    explained = explained or _explained_model(config, plan.class_names)
    model, fingerprint = explained.model, explained.fingerprint
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
    classifier = _classifier(model)
    written = 0
    waited = 0.0
    errors: list[float] = []

    def requests(batches: Iterator[Any]) -> Iterator[ExplainRequest]:
        """The input batches as labelling requests; runs in the labeller's model thread."""
        nonlocal waited
        while True:
            asked = time.perf_counter()
            batch = next(batches, None)
            waited += time.perf_counter() - asked
            if batch is None:
                return
            report.merge(batch.report)
            if batch.samples:
                yield _explain_request(
                    classifier,
                    batch.samples,
                    config.label,
                    image_size=config.image_size,
                    images=batch.images,
                    device=device,
                )

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
            renames=renames,
            decode_device=device if config.decode == "device" else None,
        ) as batches,
        # Coalitions of the next batch drawn and the last one solved while the model runs.
        kernel_shap_stream(
            classifier,
            requests(batches),
            **_explain_settings(config.label, plan.baseline_mean, device),
        ) as labelled,
    ):
        for request, result in labelled:
            for out in _labelled_samples(
                request,
                result,
                baseline_mean=plan.baseline_mean,
                model_fingerprint=plan.model_fingerprint,
                keep_game=config.label.keep_game,
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
        "%.0f%% of the time waiting for input (%d decode workers), model idle %.0f%%",
        shard,
        written,
        report.num_quarantined(),
        written / seconds if seconds else 0.0,
        100 * waited / seconds if seconds else 0.0,
        workers,
        100 * labelled.stats.model_wait_share,
    )
    return ShardOutcome(
        shard=shard,
        samples=written,
        quarantined=report.num_quarantined(),
        seconds=seconds,
        input_wait_seconds=waited,
        report=report.to_dict(),
    )


def label_task(
    plan: BuildPlan,
    task_index: int,
    *,
    overwrite: bool = False,
    progress: Any = None,
) -> list[ShardOutcome]:
    """Label the output shards of one task (:meth:`BuildPlan.task_shards`), in order.

    One task per output shard, except under ``preserve_layout``, where ``num_shards`` tasks
    share the input's shards in consecutive groups (each shard still published on its own),
    so that thousands of small input shards do not each pay a task's fixed cost.

    Args:
        plan: the build plan.
        task_index: which task, in ``[0, plan.num_tasks)``.
        overwrite: relabel complete shards.
        progress: optional callable ``(done_images, total_images)``, per shard.
    """
    indices = list(plan.task_shards(task_index))
    dataset = open_storage(plan.dataset_uri)

    def look(index: int) -> tuple[dict[str, Any] | None, tuple[list[str], dict[str, str]] | None]:
        done = None if overwrite else _done_info(dataset, plan.shard_key(index), plan.version)
        return done, (None if done is not None else plan.shard_plan(index))

    # The small requests of all the task's shards at once (is it done, its plan), and the
    # explained model checked once, rather than a few requests after another per shard.
    looked = map_concurrently(look, indices)
    explained = None
    outcomes = []
    for index, (done, shard_plan) in zip(indices, looked, strict=True):
        if done is not None:
            logger.info("shard %s already complete; skipped", plan.shard_key(index))
            outcomes.append(
                ShardOutcome(
                    shard=plan.shard_key(index), skipped=True, samples=int(done.get("samples", 0))
                )
            )
            continue
        assert shard_plan is not None
        explained = explained or _explained_model(plan.config, plan.class_names)
        outcomes.append(_label(plan, index, shard_plan, dataset, progress, explained))
    return outcomes


def _done_info(dataset: Storage, shard: str, version: str) -> dict[str, Any] | None:
    """The marker of a shard done for ``version`` (:meth:`Storage.is_done`'s rule), or None.

    Two requests (the marker, the tar's existence) where ``is_done`` and a second marker read
    would make four.
    """
    try:
        info = dataset.completion_info(shard)
    except FileNotFoundError:
        return None
    if info.get("fingerprint") != version:
        logger.info("%s in %s was made from other inputs: redoing it", shard, dataset.uri)
        return None
    return info if dataset.exists(shard) else None


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
    expected = [plan.shard_key(i) for i in range(plan.output_shards)]
    # One listing tells which markers, shards and reports exist; the markers and reports found
    # are then read concurrently: O(shards) requests in parallel, a few listing pages.
    present = set(dataset.list())
    done = dataset.done_units(expected, plan.version, lambda s: (s,), listing=present)
    complete = [s for s in expected if s in done]
    missing = [s for s in expected if s not in done]
    table = write_manifest(dataset, complete, infos=done)
    report = QuarantineReport()
    listing_report = plan.listing_report
    if listing_report is None and layout.PLAN_LISTING_REPORT_KEY in present:
        listing_report = dataset.read_json(layout.PLAN_LISTING_REPORT_KEY)
    if listing_report:
        report.merge(QuarantineReport.from_dict(listing_report))
    report_keys = [shard_report_key(s) for s in complete if shard_report_key(s) in present]
    for shard_report in dataset.read_json_many(report_keys):
        report.merge(QuarantineReport.from_dict(shard_report))
    dataset.write_json(split_report_key(plan.config.name, plan.config.split), report.to_dict())
    samples = int(sum(table.column("samples").to_pylist())) if table.num_rows else 0
    summary = {
        "dataset_uri": plan.dataset_uri,
        "version": plan.version,
        "complete": complete,
        "missing": missing,
        "samples": samples,
        "inputs": plan.inputs,
        "quarantined": report.num_quarantined(),
    }
    error_keys = [
        layout.shard_error_report_key(s)
        for s in complete
        if layout.shard_error_report_key(s) in present
    ]
    errors = [
        value for found in dataset.read_json_many(error_keys) for value in found["relative_error"]
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
        # decode_workers changes how fast, not what, so a rerun with other workers is the same
        # build; so does num_shards under preserve_layout (the tasks, not the shards).
        ignored = ["decode_workers"] + (["num_shards"] if self.config.preserve_layout else [])
        planned = dict(self.output.read_json(key).get("config") or {})
        planned.setdefault("decode", "host")  # versions planned before the field existed
        current = self.config.to_dict()
        for name in ignored:
            planned.pop(name, None)
            current.pop(name, None)
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

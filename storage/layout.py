"""Every key the pipeline writes, named in one place.

Under an output root (``out_uri``) a run of the pipeline writes::

    data/{domain}/{domain}-{split}-NNNNNN.tar      domain shards (+ _completions/, reports/)
    models/base-{fingerprint}/model.safetensors    the pretrained base (embedded default only)
    models/{domain}-{mode}-{fingerprint}/          a fine-tuned model: model.safetensors, last.*
    xdata/{name}/v-{hash}/{name}-{split}-NNNNNN.tar  an X-dataset version (+ config.json,
                                                   manifest.parquet, reports/, _completions/,
                                                   plan/: the build plan, one file per shard)
    vectors/{source}-{x8}-{p8}.safetensors         an explainability vector (+ .json sidecar)
    sweeps/{name}/                                 results.parquet, summary.json, sweep.png,
                                                   targets/{target}.parquet, heatmaps-*.png

Shard names follow one rule (:func:`shard_name` / :func:`parse_shard_name`); dataset folders
hold a ``config.json`` and, for X-datasets, version folders named ``v-{hash}``.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable
from typing import NamedTuple

DATA_PREFIX = "data"
MODELS_PREFIX = "models"
XDATA_PREFIX = "xdata"
VECTORS_PREFIX = "vectors"
SWEEPS_PREFIX = "sweeps"
REPORTS_PREFIX = "reports/"
PLAN_PREFIX = "plan/"

MODEL_FILE = "model.safetensors"
DATASET_CONFIG_FILE = "config.json"
CLASS_NAMES_FILE = "classes.json"
MANIFEST_FILE = "manifest.parquet"
SWEEP_RESULTS_FILE = "results.parquet"
SWEEP_SUMMARY_FILE = "summary.json"
SWEEP_PLOT_FILE = "sweep.png"
SWEEP_REPORT_FILE = "report.md"

# One shard-name rule for writers and readers: six or more digits (webdataset's ShardWriter pads
# to six; a dataset of a million shards still parses).
_SHARD = re.compile(r"^(?P<name>.+)-(?P<split>[^-/]+)-(?P<index>\d{6,})\.tar$")


class ShardName(NamedTuple):
    """The parts of a shard's file name."""

    name: str
    split: str
    index: int


def shard_name(name: str, split: str, index: int) -> str:
    """The file name of a shard: ``{name}-{split}-{index:06d}.tar``.

    Args:
        name: the dataset name, e.g. ``imagenet-x``.
        split: the split, e.g. ``train`` (no ``-`` or ``/``).
        index: the shard index (zero-padded to six digits so names sort in order).
    """
    if index < 0:
        raise ValueError(f"shard index must be >= 0, got {index}")
    if not split or "-" in split or "/" in split:
        raise ValueError(f"split {split!r} must be non-empty without '-' or '/'")
    return f"{name}-{split}-{index:06d}.tar"


def parse_shard_name(key: str) -> ShardName | None:
    """The (name, split, index) of a shard key or file name; None if it is not a shard."""
    match = _SHARD.match(posixpath.basename(key))
    if match is None:
        return None
    return ShardName(match["name"], match["split"], int(match["index"]))


def shards_of(keys: Iterable[str], name: str | None, split: str | None) -> list[str]:
    """Sorted shard keys among ``keys`` of dataset ``name`` and ``split`` (None: any)."""
    found = []
    for key in keys:
        parsed = parse_shard_name(key)
        if parsed is None:
            continue
        if (name is None or parsed.name == name) and (split is None or parsed.split == split):
            found.append(key)
    return sorted(found)


def data_key(domain: str, seed: int = 0) -> str:
    """The folder of a domain's exported shards (of data seed ``seed``: each seed of a
    ``--seeds`` study keeps its own images instead of rewriting another seed's)."""
    return f"{DATA_PREFIX}/{domain}" if seed == 0 else f"{DATA_PREFIX}/{domain}-seed{seed}"


def base_model_key(fingerprint: str) -> str:
    """The weights of a base model pretrained here, by its config fingerprint."""
    return f"{MODELS_PREFIX}/base-{fingerprint}/{MODEL_FILE}"


def finetune_key(domain: str, mode: str, fingerprint: str) -> str:
    """The folder of one fine-tuning run: one per (domain, mode, config)."""
    return f"{MODELS_PREFIX}/{domain}-{mode}-{fingerprint}"


def vector_key(source: str, theta_x_fingerprint: str, theta_p_fingerprint: str) -> str:
    """An explainability vector, named by its source and the two models it came from."""
    return (
        f"{VECTORS_PREFIX}/{source}-{theta_x_fingerprint[:8]}-{theta_p_fingerprint[:8]}.safetensors"
    )


def xdata_version_key(name: str, version: str) -> str:
    """The folder of one version of an X-dataset, relative to the X-data root."""
    return f"{name}/{version}"


def version_of(key: str) -> str | None:
    """The ``v-...`` version folder a key under ``{name}/`` lies in, or None."""
    parts = key.split("/")
    return parts[1] if len(parts) >= 3 and parts[1].startswith("v-") else None


def sweep_key(name: str) -> str:
    """The folder of a sweep's outputs."""
    return f"{SWEEPS_PREFIX}/{name}"


def sweep_target_rows_key(target: str) -> str:
    """A sweep's rows of one target, relative to the sweep's folder."""
    return f"targets/{target}.parquet"


def sweep_target_per_image_key(target: str) -> str:
    """A sweep's per-image scores of one target (for intervals), relative to the sweep's folder."""
    return f"targets/{target}-per-image.json"


def sweep_heatmap_key(target: str) -> str:
    """A sweep's heatmap figure of one target, relative to the sweep's folder."""
    return f"heatmaps-{target}.png"


#: The completion unit of a build plan's files (its marker is written after them).
PLAN_UNIT = "plan"
#: What listing a build's input skipped, written with the plan.
PLAN_LISTING_REPORT_KEY = f"{PLAN_PREFIX}listing-report.json"


def plan_shard_key(shard: str) -> str:
    """The plan of one output shard of a build: the input units it labels (and their renames)."""
    return f"{PLAN_PREFIX}{posixpath.basename(shard).removesuffix('.tar')}.json"


def shard_report_key(shard: str) -> str:
    """The quarantine report of one shard, written before its completion marker."""
    return f"{REPORTS_PREFIX}shards/{posixpath.basename(shard).removesuffix('.tar')}.json"


def shard_error_report_key(shard: str) -> str:
    """The estimated label errors of one X-dataset shard (when the build estimates them)."""
    return f"{REPORTS_PREFIX}errors/{posixpath.basename(shard).removesuffix('.tar')}.json"


def split_error_report_key(name: str, split: str) -> str:
    """The summary of a build's estimated label errors: ``reports/{name}-{split}-label-error.json``."""
    return f"{REPORTS_PREFIX}{name}-{split}-label-error.json"


def split_report_key(name: str, split: str) -> str:
    """The quarantine report of a whole export or build: ``reports/{name}-{split}.json``."""
    return f"{REPORTS_PREFIX}{name}-{split}.json"

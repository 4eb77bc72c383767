"""State dicts on storage: safetensors with a JSON sidecar, and their fingerprints."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import sys
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import safetensors.torch
import torch

from storage.core import Storage
from storage.errors import ObjectNotFoundError
from storage.local import LocalStorage

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIX = ".safetensors"
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")
_HASH_CHUNK = 8 << 20

# Byte fingerprints of sidecar-less checkpoints, by (URL, object version): hashing a 600 MB base
# once per process instead of on every call. Bounded, and shared by a process's threads.
_BYTES_FINGERPRINTS: OrderedDict[tuple[str, str], str] = OrderedDict()
_BYTES_FINGERPRINTS_MAX = 64
_BYTES_FINGERPRINTS_LOCK = threading.Lock()


def sidecar_key(key: str) -> str:
    """The key of a checkpoint's JSON sidecar: ``model.safetensors`` -> ``model.json``."""
    for suffix in (SAFETENSORS_SUFFIX, *_TORCH_SUFFIXES):
        if key.endswith(suffix):
            return key[: -len(suffix)] + ".json"
    return key + ".json"


def save_state_dict(
    storage: Storage,
    key: str,
    state_dict: Mapping[str, torch.Tensor],
    metadata: dict[str, Any],
) -> str:
    """Write ``state_dict`` as safetensors, then its JSON sidecar.

    Tensors are stored contiguous and on CPU under their own keys (open_clip's keys stay
    open_clip's). The sidecar is ``metadata`` plus ``state_fingerprint``, written after the
    tensors so that a sidecar always describes a complete checkpoint.

    Args:
        storage: where to write.
        key: the checkpoint key; must end with ``.safetensors``.
        state_dict: tensors by name.
        metadata: JSON-able facts (source domain, base fingerprint, config...).

    Returns:
        The :func:`state_fingerprint` of the state dict.

    Raises:
        ValueError: bad key, non-tensor values, or metadata that is not JSON-able or carries a
            different ``state_fingerprint``.
    """
    if not key.endswith(SAFETENSORS_SUFFIX):
        raise ValueError(f"checkpoint key {key!r} must end with {SAFETENSORS_SUFFIX}")
    tensors = _cpu_contiguous(state_dict)
    fingerprint = state_fingerprint(tensors)
    if metadata.get("state_fingerprint", fingerprint) != fingerprint:
        raise ValueError(
            f"metadata state_fingerprint {metadata['state_fingerprint']} does not match the "
            f"tensors ({fingerprint})"
        )
    sidecar = {**metadata, "state_fingerprint": fingerprint}
    try:
        sidecar_text = json.dumps(sidecar, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint metadata for {key} is not JSON-able: {exc}") from exc
    storage.write_bytes(key, safetensors.torch.save(tensors, metadata={"format": "pt"}))
    storage.write_json(sidecar_key(key), json.loads(sidecar_text))
    logger.info("saved %d tensors to %s (%s)", len(tensors), storage.url(key), fingerprint)
    return fingerprint


def load_state_dict(storage: Storage, key: str) -> dict[str, torch.Tensor]:
    """Load a state dict on CPU.

    ``.safetensors`` is the project's format; ``.pt``/``.pth``/``.bin`` files (such as released
    open_clip weights) are read with ``torch.load(weights_only=True)``, unwrapping a
    ``{"state_dict": ...}`` checkpoint and a DataParallel ``module.`` prefix.

    Raises:
        ObjectNotFoundError: no object under ``key``.
        ValueError: an unknown suffix, or a torch file that is not a state dict or holds
            pickled objects other than tensors.
    """
    data = storage.read_bytes(key)
    if key.endswith(SAFETENSORS_SUFFIX):
        return safetensors.torch.load(data)
    if key.endswith(_TORCH_SUFFIXES):
        try:
            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ValueError(
                f"{storage.url(key)} holds more than tensors; refused by torch.load(weights_only=True)"
            ) from exc
        if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
            loaded = loaded["state_dict"]
        if not isinstance(loaded, Mapping) or not all(
            isinstance(v, torch.Tensor) for v in loaded.values()
        ):
            raise ValueError(f"{storage.url(key)} does not hold a state dict of tensors")
        state = dict(loaded)
        if state and all(k.startswith("module.") for k in state):
            state = {k[len("module.") :]: v for k, v in state.items()}
        return state
    raise ValueError(
        f"unknown checkpoint format for {key!r}; expected {SAFETENSORS_SUFFIX} or one of "
        f"{', '.join(_TORCH_SUFFIXES)}"
    )


def load_sidecar(storage: Storage, key: str) -> dict[str, Any]:
    """The JSON sidecar written by :func:`save_state_dict` for the checkpoint ``key``."""
    return storage.read_json(sidecar_key(key))


def checkpoint_fingerprint(uri: str) -> str:
    """The content fingerprint of the checkpoint at ``uri``, read from its sidecar (no tensors).

    A checkpoint without a sidecar (weights from elsewhere) is fingerprinted by its bytes, once
    per process and object version (:func:`object_version`): a later call costs a metadata
    request, and a file rewritten in place is hashed again.
    """
    from storage.uri import open_file

    storage, key = open_file(uri)
    if storage.exists(sidecar_key(key)):
        fingerprint = load_sidecar(storage, key).get("state_fingerprint")
        if fingerprint:
            return str(fingerprint)
    version = object_version(storage, key)
    if version is None:
        return _bytes_fingerprint(storage, key)
    cache_key = (storage.url(key), version)
    with _BYTES_FINGERPRINTS_LOCK:
        cached = _BYTES_FINGERPRINTS.get(cache_key)
        if cached is not None:
            _BYTES_FINGERPRINTS.move_to_end(cache_key)
            return cached
    fingerprint = _bytes_fingerprint(storage, key)
    with _BYTES_FINGERPRINTS_LOCK:
        _BYTES_FINGERPRINTS[cache_key] = fingerprint
        while len(_BYTES_FINGERPRINTS) > _BYTES_FINGERPRINTS_MAX:
            _BYTES_FINGERPRINTS.popitem(last=False)
    return fingerprint


def object_version(storage: Storage, key: str) -> str | None:
    """A token that changes whenever the object's bytes do; None when it cannot be told.

    A local file: its size, inode and modification and change times (a publish renames a new
    file into place, so a rewrite changes the inode as well). An S3 object: its size, ETag and
    last-modified time from one HEAD request.

    Raises:
        ObjectNotFoundError: no object under ``key``.
    """
    if isinstance(storage, LocalStorage):
        path = storage.url(key)
        try:
            stat = os.stat(path)
        except FileNotFoundError as exc:
            raise ObjectNotFoundError(f"no object at {path}") from exc
        return f"{stat.st_size}:{stat.st_ino}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"
    # Only an imported storage.s3 can have made an S3Storage: local runs never import boto3.
    s3 = sys.modules.get("storage.s3")
    if s3 is not None and isinstance(storage, s3.S3Storage):
        head = _s3_head(storage, key)
        return f"{head['ContentLength']}:{head.get('ETag')}:{head.get('LastModified')}"
    return None


def _s3_head(storage: Any, key: str) -> dict[str, Any]:
    """The HEAD response of an :class:`~storage.s3.S3Storage` object, errors translated.

    Uses the backend's own client and error translation (this module is part of storage/);
    ``S3Storage.size`` makes the same request but keeps only the length.
    """
    full_key = storage._key(key)
    with storage._translated("stat", full_key):
        return storage._client.head_object(Bucket=storage.bucket, Key=full_key)


def _bytes_fingerprint(storage: Storage, key: str) -> str:
    """sha256 of the object's bytes (16 hex characters), streamed in chunks."""
    digest = hashlib.sha256()
    with storage.open_read(key) as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def state_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A 16-hex-character sha256 over sorted keys, dtypes, shapes and tensor bytes.

    Equal for equal state dicts whatever their device, memory layout or insertion order.
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous()
        header = f"{name}\x00{str(tensor.dtype)}\x00{tuple(tensor.shape)}\x00"
        digest.update(header.encode("utf-8"))
        # Viewing as bytes hashes every dtype alike, bfloat16 included (numpy has no bfloat16).
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def _cpu_contiguous(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"state dict entry {name!r} is a {type(value).__name__}, not a tensor")
        tensor = value.detach().to("cpu").contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        # safetensors refuses tensors sharing memory (tied weights); each gets its own copy.
        if pointer in seen_storages and tensor.numel() > 0:
            tensor = tensor.clone()
        seen_storages.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    return tensors

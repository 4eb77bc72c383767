"""Typed, validated stage configuration shared by every stage.

Each stage defines one :class:`StageConfig` subclass with flat snake_case fields. A config is
validated before any compute, has a stable fingerprint (used to version outputs) and is written
next to what it produced.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict

if TYPE_CHECKING:  # torch is imported where a device is resolved, not where a config is read
    import torch


def check_device(value: str) -> str:
    """Accept ``"auto"``, ``"cpu"`` or ``"cuda[:i]"`` (validated before any compute)."""
    if value != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:i]', got {value!r}")
    return value


#: A config field naming where tensors go: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:i"``.
Device = Annotated[str, AfterValidator(check_device)]


#: Set in a Dask worker process that was given GPUs of its own (flows/runners.py): the
#: ``CUDA_VISIBLE_DEVICES`` it was started with.
WORKER_GPUS_ENV = "EXPLAIN_TRANSFER_WORKER_GPUS"


def resolve_device(device: str) -> torch.device:
    """The device a setting names in this process, never the CPU in place of a GPU.

    ``"auto"`` is CUDA when available, else the CPU, except in a worker process that was given
    GPUs (:data:`WORKER_GPUS_ENV`), where it must be CUDA. ``"cuda"`` is this process's first
    visible GPU: in a GPU Dask worker, its own (its ``CUDA_VISIBLE_DEVICES`` names only its own).

    Raises:
        RuntimeError: CUDA was asked for (``"cuda[:i]"``, or ``"auto"`` in a GPU worker) and this
            process sees no usable GPU, or no GPU ``i``.
    """
    import torch

    if device == "cpu":
        return torch.device("cpu")
    given = os.environ.get(WORKER_GPUS_ENV)
    if device == "auto" and given is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    where = f"this process (CUDA_VISIBLE_DEVICES={visible}"
    where += f", a worker given GPUs {given})" if given is not None else ")"
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"device {device!r} was asked for but {where} sees no usable GPU "
            "(torch.cuda.is_available() is False); refusing to run on the CPU instead"
        )
    resolved = torch.device("cuda" if device == "auto" else device)
    count = torch.cuda.device_count()
    if resolved.index is not None and resolved.index >= count:
        raise RuntimeError(f"device {device!r} was asked for but {where} sees {count} GPU(s)")
    return resolved


class StageConfig(BaseModel):
    """Base class of every stage configuration.

    Unknown fields are refused, so a typo in a config file is an error instead of a silently
    ignored setting.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    def canonical_json(self) -> str:
        """The config as JSON with sorted keys: the input of :meth:`fingerprint`."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def fingerprint(self, *extra: Any, length: int = 16) -> str:
        """A stable hex digest of the config and any extra JSON-able values.

        Args:
            *extra: values that also determine the output (model fingerprint, input listing).
            length: number of hex characters returned.
        """
        digest = hashlib.sha256(self.canonical_json().encode())
        for value in extra:
            digest.update(json.dumps(value, sort_keys=True, default=str).encode())
        return digest.hexdigest()[:length]

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-able dict (what is written next to the outputs)."""
        return self.model_dump(mode="json")

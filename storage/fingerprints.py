"""Fingerprints: short content hashes that decide whether completed work can be reused."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def fingerprint_of(*values: Any, length: int = 16) -> str:
    """A stable hex digest of JSON-able values (dict keys sorted, other objects as ``str``).

    Args:
        values: everything an output depends on.
        length: number of hex characters returned.
    """
    digest = hashlib.sha256()
    for value in values:
        digest.update(json.dumps(value, sort_keys=True, default=str).encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()[:length]

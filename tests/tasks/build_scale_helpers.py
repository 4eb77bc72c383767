"""Helpers of the build-at-scale tests: storage calls counted, and storage faults injected."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from storage.local import LocalStorage

#: The primitives every other storage operation is made of (JSON, markers, listings...).
PRIMITIVES = (
    "exists",
    "size",
    "read_bytes",
    "write_bytes",
    "open_read",
    "upload_file",
    "download_file",
    "list",
    "delete",
)


@dataclass
class StorageCalls:
    """Every primitive call on a local folder: ``(operation, absolute key, thread id)``."""

    calls: list[tuple[str, str, int]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, operation: str, where: str) -> None:
        with self._lock:
            self.calls.append((operation, where, threading.get_ident()))

    def clear(self) -> None:
        with self._lock:
            self.calls.clear()

    def keys(self, operation: str, contains: str = "") -> list[str]:
        """The keys of the calls of one operation whose key contains ``contains``."""
        return [where for op, where, _ in self.calls if op == operation and contains in where]

    def counts(self) -> Counter[str]:
        """Calls per operation."""
        return Counter(op for op, _, _ in self.calls)

    def threads(self, operation: str) -> set[int]:
        return {thread for op, _, thread in self.calls if op == operation}


def count_storage_calls(monkeypatch: pytest.MonkeyPatch) -> StorageCalls:
    """Record every primitive call on every :class:`LocalStorage` from now on."""
    calls = StorageCalls()
    for name in PRIMITIVES:
        original = getattr(LocalStorage, name)

        def wrapper(self: LocalStorage, *args: Any, __original=original, __name=name, **kwargs):
            key = args[0] if args and isinstance(args[0], str) else kwargs.get("prefix", "")
            calls.record(__name, f"{self.uri}/{key}")
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(LocalStorage, name, wrapper)
    return calls


def fail_once(
    monkeypatch: pytest.MonkeyPatch,
    operation: str,
    matches: Callable[[str], bool],
    error: Exception,
) -> list[str]:
    """Make the first :class:`LocalStorage` ``operation`` on a matching key raise ``error``.

    Returns:
        The keys the fault hit (one, once it has fired).
    """
    hit: list[str] = []
    original = getattr(LocalStorage, operation)
    lock = threading.Lock()

    def wrapper(self: LocalStorage, key: str, *args: Any, **kwargs: Any) -> Any:
        with lock:
            fire = not hit and matches(key)
            if fire:
                hit.append(key)
        if fire:
            raise error
        return original(self, key, *args, **kwargs)

    monkeypatch.setattr(LocalStorage, operation, wrapper)
    return hit

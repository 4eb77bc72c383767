"""Lazy package exports: a name is imported from its module the first time it is used.

A package such as :mod:`tasks.build_dataset` re-exports its config classes beside its stage
functions. Importing the stage imports torch and open_clip (seconds), and the command line
validates configs before anything heavy starts, so a package's ``__init__`` names its exports
here instead of importing them (PEP 562's module ``__getattr__``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of a package whose names live in its modules.

    Args:
        package: the package's ``__name__``.
        exports: each exported name and the absolute name of the module that defines it.
    """
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value  # later lookups do not come back here
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__

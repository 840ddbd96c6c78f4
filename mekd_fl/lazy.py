"""Lazy package exports (PEP 562): a package names its public API without importing it up front.

Why: `mekd_fl.client` and `mekd_fl.teacher` each hold a Flower-free core (the edge client, the oracle)
beside their Flower wiring (the handlers, the teacher's ClientApp). Importing the package for the core
must not load Flower, torch's heavy parts or the other modules; each name is imported on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package` that imports `names[name]` (a submodule) on first access."""

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(f"{package}.{names[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__

"""Packages that name their public face without importing it.

The Hydra app checks a configuration against torch-free settings modules (`engine.policy`,
`quantization.config`) before anything heavy loads, so a package's `__init__` must not import
its torch-using modules; it names them here instead, and a name loads its module on first use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any


def exports(package: str, homes: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` that finds each name of `homes` in its module (relative to `package`)."""

    def __getattr__(name: str) -> Any:
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(homes[name], package), name)

    return __getattr__

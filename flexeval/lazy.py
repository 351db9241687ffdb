"""Packages that name their public face without importing it.

The Hydra app checks a configuration against torch-free settings modules (`engine.policy`,
`quantization.config`) before anything heavy loads, so a package's `__init__` must not import
its torch-using modules; it names them here instead, and a name loads its module on first use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from importlib import import_module
from typing import Any


def exports(package: str, names: Mapping[str, Sequence[str]]) -> tuple[list[str], Callable[[str], Any]]:
    """`__all__` and a module `__getattr__` for the `names` each module (relative to `package`) holds."""
    homes = {name: module for module, exported in names.items() for name in exported}

    def __getattr__(name: str) -> Any:
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(homes[name], package), name)

    return sorted(homes), __getattr__

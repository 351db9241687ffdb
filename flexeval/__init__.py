"""flexeval: a FlexGen-style offloading inference engine packaged as an evaluation harness.

Importing the package is cheap: `Engine`, `Policy` and `FlexGenLM` load on first use, so that
`python -m flexeval --help` and configuration errors answer before torch is imported. The lm-eval
backend `flexgen` registers when `flexeval.lm` is imported (as `FlexGenLM` is).
"""

import os
from importlib import import_module
from typing import Any

from flexeval.errors import FlexevalError

# Intel MKL reads its reproducibility mode once, at its first call (`flexeval.reproducible` says
# why flexeval needs STRICT): set on import, before any flexeval module can import torch.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

_LAZY = {"Engine": "flexeval.engine.engine", "Policy": "flexeval.engine.policy", "FlexGenLM": "flexeval.lm"}
__all__ = ["Engine", "FlexGenLM", "FlexevalError", "Policy"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'flexeval' has no attribute {name!r}")
    return getattr(import_module(_LAZY[name]), name)

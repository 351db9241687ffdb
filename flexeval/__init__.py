"""flexeval: a FlexGen-style offloading inference engine packaged as an evaluation harness.

Importing the package is cheap: `Engine`, `Policy` and `FlexGenLM` load on first use, so that
`python -m flexeval --help` and configuration errors answer before torch is imported. The lm-eval
backend `flexgen` registers when `flexeval.lm` is imported (as `FlexGenLM` is).
"""

import os

from flexeval.errors import FlexevalError as FlexevalError  # eager: cheap, and caught by every front door
from flexeval.lazy import exports

# Intel MKL reads its reproducibility mode once, at its first call (`flexeval.reproducible` says
# why flexeval needs STRICT): set on import, before any flexeval module can import torch.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__all__, __getattr__ = exports(
    __name__,
    {"flexeval.engine.engine": ("Engine",), "flexeval.engine.policy": ("Policy",), "flexeval.lm": ("FlexGenLM",)},
)
__all__.append("FlexevalError")

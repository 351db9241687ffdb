"""flexeval: a FlexGen-style offloading inference engine packaged as an evaluation harness."""

from flexeval import reproducible  # noqa: F401 - first: sets MKL's mode before torch computes anything
from flexeval.engine.engine import Engine
from flexeval.engine.policy import Policy
from flexeval.errors import FlexevalError
from flexeval.lm import FlexGenLM  # registers the lm-eval backend `flexgen`

__all__ = ["Engine", "FlexGenLM", "FlexevalError", "Policy"]

"""flexeval: a FlexGen-style offloading inference engine packaged as an evaluation harness."""

from flexeval.engine.engine import Engine
from flexeval.engine.policy import Policy
from flexeval.errors import FlexevalError

__all__ = ["Engine", "FlexevalError", "Policy"]

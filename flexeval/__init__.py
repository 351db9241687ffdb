"""flexeval: a FlexGen-style offloading inference engine packaged as an evaluation harness."""

from flexeval.engine.engine import Engine
from flexeval.errors import FlexevalError

__all__ = ["Engine", "FlexevalError"]

"""Where the benchmark data lives: $FLEXEVAL_DATA_DIR, else `../shared/data` beside the repository.

The data are JSONL files with the Hugging Face field names, read by the task definitions in
`tasks/`, the benchmarks and the tests; this is the one place that decides where they are.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "FLEXEVAL_DATA_DIR"


def data_dir() -> Path:
    return Path(os.environ.get(DATA_ENV) or Path(__file__).resolve().parents[2] / "shared" / "data")

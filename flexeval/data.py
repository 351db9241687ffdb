"""Where the benchmark data, the task definitions that read them and the app's configuration live.

The data are JSONL files with the Hugging Face field names ($FLEXEVAL_DATA_DIR, else
`../shared/data` beside the repository), read by the task definitions in `tasks/`, the
benchmarks and the tests. `tasks/` and `conf/` sit at the repository's top level and, in an
installed wheel, inside the package (pyproject.toml ships them as package data); this is the one
place that decides where each is.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

DATA_ENV = "FLEXEVAL_DATA_DIR"
PACKAGE = Path(__file__).resolve().parent


def _shipped(name: str) -> Path:
    inside = PACKAGE / name  # an installed wheel
    return inside if inside.is_dir() else PACKAGE.parent / name  # a source checkout


TASKS_DIR = _shipped("tasks")
CONF_DIR = _shipped("conf")


def data_dir() -> Path:
    return Path(os.environ.get(DATA_ENV) or PACKAGE.parents[1] / "shared" / "data")


def local_tasks(metadata: Mapping[str, Any] | None = None) -> TaskManager:
    """lm-eval's task manager over the definitions in tasks/ alone; `metadata` reaches every task
    (`data_dir`, a user's `mmlu_files`)."""
    from lm_eval.tasks import TaskManager  # indexing tasks is slow to import: only when asked

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=dict(metadata or {}) or None)

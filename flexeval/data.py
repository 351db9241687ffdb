"""Where the benchmark data, the task definitions that read them and the app's configuration live.

The data are JSONL files with the Hugging Face field names ($FLEXEVAL_DATA_DIR, else
`../shared/data` beside the repository), read by the task definitions in `tasks/`, the
benchmarks and the tests. `tasks/` and `conf/` sit at the repository's top level and, in an
installed wheel, inside the package (pyproject.toml ships them as package data); this is the one
place that decides where each is.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from functools import cache
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

    quiet_own_task_notices()
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=dict(metadata or {}) or None)


def task_manager(names: Iterable[str], metadata: Mapping[str, Any] | None = None) -> TaskManager:
    """The definitions in tasks/ when they define every name; else lm-eval's built-in tasks
    beside them (indexing those takes seconds), where ours keep the names they share."""
    from lm_eval.tasks import TaskManager

    if set(names) <= own_task_names():
        return local_tasks(metadata)
    quiet_own_task_notices()
    return TaskManager(include_path=str(TASKS_DIR), metadata=dict(metadata or {}) or None)


@cache
def own_task_names() -> frozenset[str]:
    """The task names and tags the YAML files in tasks/ define (read as text: no lm-eval import)."""
    pattern = re.compile(r"^(?:task|tag):\s*\[?([^\]\n#]+)", re.MULTILINE)
    found = (m for path in TASKS_DIR.glob("*.yaml") for m in pattern.findall(path.read_text()))
    return frozenset(name.strip() for names in found for name in names.split(","))


class _OwnTaskNotices(logging.Filter):
    """Drops lm-eval's notices about what flexeval's task files do by design: replace built-in
    tasks of the same name, and read their data through a `custom_dataset` function (for which
    lm-eval suggests `--metadata` once per task)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "overrides existing task" in message:
            return str(TASKS_DIR) not in message
        if ": Custom kwargs can be passed to `--metadata`" in message:
            return message.split(":", 1)[0] not in own_task_names()
        return True


@cache
def quiet_own_task_notices() -> None:
    for name in ("lm_eval.tasks._index", "lm_eval.api.task"):
        logging.getLogger(name).addFilter(_OwnTaskNotices())

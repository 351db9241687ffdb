"""Where the benchmark data, the task definitions that read them and the app's configuration live.

The data are JSONL files with the Hugging Face field names ($FLEXEVAL_DATA_DIR, else
`../shared/data` beside the repository), read by the task definitions in `tasks/`, the
benchmarks and the tests; `chosen_data_dir` is the one rule for which directory a run reads.
`tasks/` and `conf/` sit at the repository's top level and, in an installed wheel, inside the
package (pyproject.toml ships them as package data); this is the one place that decides where
each is.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import fields
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from flexeval.errors import FlexevalError, first_line

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

DATA_ENV = "FLEXEVAL_DATA_DIR"
PACKAGE = Path(__file__).resolve().parent
DEFAULT_DATA_DIR = PACKAGE.parents[1] / "shared" / "data"
NO_DATA_NOTICE = (
    f"no benchmark data at {DEFAULT_DATA_DIR} and neither ${DATA_ENV} nor data_dir is set: "
    "lm-eval's built-in tasks run, on datasets from the Hugging Face hub"
)


def _shipped(name: str) -> Path:
    inside = PACKAGE / name  # an installed wheel
    return inside if inside.is_dir() else PACKAGE.parent / name  # a source checkout


TASKS_DIR = _shipped("tasks")
CONF_DIR = _shipped("conf")


def data_dir() -> Path:
    """Where the benchmark data are looked for: $FLEXEVAL_DATA_DIR, else `../shared/data`."""
    return Path(os.environ.get(DATA_ENV) or DEFAULT_DATA_DIR)


def chosen_data_dir(given: str | os.PathLike | None = None) -> Path | None:
    """The benchmark data a run reads, by one rule for the app, `flexeval-lm-eval` and the task
    definitions: `given` (data_dir) when set, else $FLEXEVAL_DATA_DIR when set, and either must be
    a directory, since falling back from a mistyped path to lm-eval's hub datasets would evaluate
    other data (offline: retry for a minute, then fail). With neither set, `../shared/data`, or None
    where it is absent: nothing was asked for, so lm-eval's built-in tasks and their hub datasets
    are a fair default, which callers announce with `NO_DATA_NOTICE`."""
    if given is not None:
        return _directory(Path(given), "data_dir")
    if os.environ.get(DATA_ENV):
        return _directory(Path(os.environ[DATA_ENV]), f"${DATA_ENV}")
    return DEFAULT_DATA_DIR.resolve() if DEFAULT_DATA_DIR.is_dir() else None


def _directory(root: Path, named: str) -> Path:
    root = root.expanduser()
    if not root.is_dir():
        raise FlexevalError(f"{named} {root} is not a directory: point {named} at the benchmark JSONL folder")
    return root.resolve()


def check_task_files(root: Path) -> None:
    """Every YAML file under `root` loads, and each task in them uses only keys lm-eval knows.
    lm-eval's index skips a file it cannot parse without a word (its task then "does not exist",
    or lm-eval's built-in task of that name runs on hub data instead), and a misspelt key
    surfaces, once the task is built, as a TypeError naming neither file nor key."""
    from lm_eval.config.task import TaskConfig
    from lm_eval.tasks._yaml_loader import load_yaml

    known = {f.name for f in fields(TaskConfig)} | {"group", "task_list"}  # the last two: dropped before building
    for path in sorted(root.rglob("*.yaml")):
        try:
            config = load_yaml(path, resolve_func=True)
        except yaml.MarkedYAMLError as err:
            raise FlexevalError(f"{path}: not valid YAML ({_yaml_problem(err)})") from err
        except (yaml.YAMLError, ImportError, AttributeError, OSError, ValueError) as err:
            raise FlexevalError(f"{path}: {first_line(err)}") from err
        if not isinstance(config.get("task"), str) or "group" in config or "class" in config:
            continue  # a group, a Python task or a fragment other files include
        unknown = sorted(set(config) - known)
        if unknown:
            close = {key: difflib.get_close_matches(key, known, n=1) for key in unknown}
            named = ", ".join(key + "".join(f" (did you mean {c}?)" for c in close[key]) for key in unknown)
            raise FlexevalError(f"{path}: unknown task key {named}")


def _yaml_problem(err: yaml.MarkedYAMLError) -> str:
    """A YAML syntax error in one line: what was found where, and what it was inside."""
    parts = [
        f"{text} at line {mark.line + 1}" if mark else text
        for text, mark in ((err.problem, err.problem_mark), (err.context, err.context_mark))
        if text
    ]
    return "; ".join(parts) or first_line(err)


def local_tasks(metadata: Mapping[str, Any] | None = None) -> TaskManager:
    """lm-eval's task manager over the definitions in tasks/ alone; `metadata` reaches every task
    (`data_dir`, a user's `mmlu_files`)."""
    from lm_eval.tasks import TaskManager  # indexing tasks is slow to import: only when asked

    quiet_own_task_notices()
    check_task_files(TASKS_DIR)
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=dict(metadata or {}) or None)


def task_manager(names: Iterable[str], metadata: Mapping[str, Any] | None = None) -> TaskManager:
    """The definitions in tasks/ when they define every name; else lm-eval's built-in tasks
    beside them (indexing those takes seconds), where ours keep the names they share."""
    from lm_eval.tasks import TaskManager

    if set(names) <= own_task_names():
        return local_tasks(metadata)
    quiet_own_task_notices()
    check_task_files(TASKS_DIR)
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

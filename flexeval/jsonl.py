"""Benchmark JSONL files read and checked: each defect is one line naming the file, the line and
the key, where `datasets` and lm-eval raise a traceback naming neither (an empty file, a line
cut short) or, worse, evaluate a broken row without a word (a missing field renders as "None",
an out-of-range label is scored as a wrong answer).

What a task reads is declared beside its prompts, in its YAML's `dataset_kwargs`:

- `fields`: the dotted paths every row must hold, not null (`choices.label`; a number indexes a
  list, so `endings.3` asks for at least four endings);
- `labels`: for each field that holds the answer, the values it may take, a list (`[0, 1]`) or
  the dotted path of a list in the same row (arc's `answerKey` is one of its `choices.label`).
  Types count: lm-eval scores the string "1" against choices [0, 1] as a wrong answer.

Files are read by `datasets` as before (its Arrow cache makes a second read, and the tasks'
`process_docs` maps over it, near free) and the declared columns checked as `datasets` read them:
30-60 ms on hellaswag's 10,042 rows, where parsing the file ourselves costs 70-150 ms and a
`Dataset.from_list` of it loses the cached `process_docs` (0.8 s a build). When `datasets` fails,
or a check does, the file is parsed line by line, to name the line as written.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets

from flexeval.errors import FlexevalError

Labels = Mapping[str, Sequence[Any] | str]
Columns = Callable[[str], list[Any]]  # a top-level key -> its value in every row (None where absent)


def read(path: Path, fields: Sequence[str] = (), labels: Labels | None = None) -> datasets.Dataset:
    """The rows of the JSONL file at `path`, each holding `fields` and a label among `labels`."""
    labels = dict(labels or {})
    if path.stat().st_size == 0:  # datasets spends seconds on an empty file, then raises StopIteration
        raise FlexevalError(f"{path} is empty: a benchmark file holds one JSON object per line")
    try:
        with _quiet(logging.getLogger("datasets.packaged_modules.json.json")):  # its "row 11" is our line 12
            rows = datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception:
        _find_defect(path, fields, labels)
        raise  # the file is sound: not the data's fault
    table = rows.data.table

    def column(key: str) -> list[Any]:
        return table.column(key).to_pylist() if key in table.column_names else [None] * len(rows)

    found = _first_problem(column, len(rows), fields, labels) if len(rows) else (0, "no rows")
    if found:
        _find_defect(path, fields, labels)  # the line as written (datasets casts a column of mixed types)
        raise FlexevalError(f"{path} row {found[0] + 1}: {found[1]}")
    return rows


@contextlib.contextmanager
def _quiet(log: logging.Logger) -> Iterator[None]:
    """`log` silenced for the block, as it was after."""
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _first_problem(column: Columns, count: int, fields: Sequence[str], labels: Labels) -> tuple[int, str] | None:
    """The first row that lacks one of `fields` or whose label is not among `labels`, and what
    is wrong with it. Column by column: half the time of a loop over rows."""
    column = functools.cache(column)
    found: list[tuple[int, str]] = []
    for field in fields:
        values = _values(column, field, count)
        missing = next((i for i, v in enumerate(values) if v is None), None)
        if missing is not None:
            found.append((missing, f"{field} is missing or null (this task reads {', '.join(fields)})"))
    for field, among in labels.items():
        values = _values(column, field, count)
        allowed = _values(column, among, count) if isinstance(among, str) else [among] * count
        wrong = next((i for i, (v, a) in enumerate(zip(values, allowed)) if not _among(v, a)), None)
        if wrong is not None:
            listed = ", ".join(map(repr, allowed[wrong] or ()))
            where = f"its {among} ({listed})" if isinstance(among, str) else listed
            found.append((wrong, f"{field} is {values[wrong]!r}, not one of {where}"))
    return min(found, default=None)


def _among(value: Any, allowed: Sequence[Any] | None) -> bool:
    """Whether `value` is one of `allowed`, type and all (1 is not "1", nor True)."""
    return any(type(value) is type(a) and value == a for a in allowed or ())


def _values(column: Columns, path: str, count: int) -> list[Any]:
    """Each row's value at a dotted path (`choices.label`, `endings.3`), None where it has none."""
    head, *rest = path.split(".")
    values = column(head)
    for key in rest:
        values = [_step(v, key) for v in values]
    return values


def _step(value: Any, key: str) -> Any:
    if isinstance(value, dict):
        return value.get(key)
    if isinstance(value, list) and key.isdigit() and int(key) < len(value):
        return value[int(key)]
    return None


def _find_defect(path: Path, fields: Sequence[str], labels: Labels) -> None:
    """Raise for the first line that is not a JSON object holding what the task reads, or for a
    file without one, naming the line as written."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise FlexevalError(f"{path} is not UTF-8 text (byte {err.start}): is it a JSONL file?") from None
    lines = text.splitlines()
    rows, numbers = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            cut = "; the file looks cut short" if number == len(lines) and not text.endswith("\n") else ""
            raise FlexevalError(f"{path} line {number}: not valid JSON ({err.msg}: column {err.colno}){cut}") from None
        if not isinstance(row, dict):
            raise FlexevalError(f"{path} line {number}: not a JSON object but {line.strip()[:40]}")
        rows.append(row)
        numbers.append(number)
    if not rows:
        raise FlexevalError(f"{path} is empty: a benchmark file holds one JSON object per line")
    found = _first_problem(lambda key: [row.get(key) for row in rows], len(rows), fields, labels)
    if found:
        index, problem = found
        raise FlexevalError(f"{path} line {numbers[index]}: {problem}")

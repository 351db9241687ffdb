"""Data for the task definitions in this folder: local JSONL files instead of hub datasets.

Each task's `custom_dataset` is `local_data.load`, given the files of each split relative to the
data directory: `data_dir` in lm-eval's task metadata (`--metadata '{"data_dir": ...}'`), else
$FLEXEVAL_DATA_DIR, else `../shared/data` beside the repository (`flexeval.data.chosen_data_dir`),
and what each row must hold (`fields`, `labels`: see `flexeval.jsonl`), so that a broken file is
reported in one line before any model loads. Document processing is lm-eval's own, re-exported
here, so that prompts and targets equal the built-in tasks'.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs
from lm_eval.tasks.wikitext.preprocess_wikitext import process_results as wikitext_process_results
from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer
from rouge_score import rouge_scorer

from flexeval import jsonl
from flexeval.data import DATA_ENV, DEFAULT_DATA_DIR, chosen_data_dir
from flexeval.errors import FlexevalError

__all__ = [
    "hellaswag_process_docs",
    "load",
    "resolve_data_dir",
    "rouge_results",
    "wikitext_detokenizer",
    "wikitext_process_results",
]


def resolve_data_dir(given: str | os.PathLike | None = None) -> Path:
    """The data directory by flexeval's one rule; these tasks read nothing else."""
    root = chosen_data_dir(given)
    if root is None:
        raise FlexevalError(f"no benchmark data at {DEFAULT_DATA_DIR}: set ${DATA_ENV} or data_dir to the JSONL folder")
    return root


def load(
    files: dict[str, str | dict[str, Any]],
    data_dir: str | None = None,
    files_from: str | None = None,
    fields: Sequence[str] = (),
    labels: jsonl.Labels | None = None,
    **metadata: Any,
) -> datasets.DatasetDict:
    """The splits named in `files`, as lm-eval expects: split -> a path under the data directory
    (or absolute), or {path, rows: [start, stop]} for a slice of a file's rows. `files_from`
    names a metadata key whose value, when given, replaces `files` (a user's own MMLU files).
    Every row of every file holds `fields` and a label among `labels`, or this raises."""
    if files_from and metadata.get(files_from):
        files = dict(metadata[files_from])
    root = resolve_data_dir(data_dir)
    specs = {split: spec if isinstance(spec, dict) else {"path": spec} for split, spec in files.items()}
    paths = {split: root / spec["path"] for split, spec in specs.items()}
    missing = sorted({str(p) for p in paths.values() if not p.is_file()})
    if missing:
        hint = f" (or give them as --metadata '{{\"{files_from}\": {{split: path}}}}')" if files_from else ""
        raise FlexevalError(f"task data not found: {', '.join(missing)}{hint}")
    read = {path: jsonl.read(path, fields, labels) for path in dict.fromkeys(paths.values())}  # shared: once
    splits = {}
    for split, spec in specs.items():
        rows = read[paths[split]]
        if "rows" in spec:
            start, stop = spec["rows"]
            rows = rows.select(range(start, min(stop, len(rows))))
        splits[split] = rows
    return datasets.DatasetDict(splits)


def rouge_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """ROUGE-2 and ROUGE-L F-measures of a generated summary, stemmed, as HELM scores summaries."""
    scores = _rouge().score(doc["summary"], results[0].strip())
    return {"rouge2": scores["rouge2"].fmeasure, "rougeL": scores["rougeL"].fmeasure}


@functools.cache
def _rouge() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rouge2", "rougeL"], use_stemmer=True)

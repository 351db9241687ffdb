"""Data for the task definitions in this folder: local JSONL files instead of hub datasets.

Each task's `custom_dataset` is `local_data.load`, given the files of each split relative to the
data directory: `data_dir` in lm-eval's task metadata (`--metadata '{"data_dir": ...}'`), else
$FLEXEVAL_DATA_DIR, else `../shared/data` beside the repository. Document processing is lm-eval's
own, re-exported here, so that prompts and targets equal the built-in tasks'.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import datasets
from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs
from lm_eval.tasks.wikitext.preprocess_wikitext import process_results as wikitext_process_results
from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

from flexeval.data import DATA_ENV
from flexeval.data import data_dir as default_data_dir

__all__ = ["hellaswag_process_docs", "load", "resolve_data_dir", "wikitext_detokenizer", "wikitext_process_results"]


def resolve_data_dir(given: str | os.PathLike | None = None) -> Path:
    root = Path(given) if given else default_data_dir()
    if not root.is_dir():
        raise FileNotFoundError(
            f"benchmark data directory {root} not found: pass data_dir in the task metadata or set ${DATA_ENV}"
        )
    return root


def load(files: dict[str, str], data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """The splits named in `files` (split -> path under the data directory), as lm-eval expects."""
    root = resolve_data_dir(data_dir)
    missing = [str(root / f) for f in files.values() if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(f"task data not found: {', '.join(missing)}")
    return datasets.load_dataset("json", data_files={split: str(root / f) for split, f in files.items()})

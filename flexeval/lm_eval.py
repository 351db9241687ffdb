"""`flexeval-lm-eval ...` (also `python -m flexeval.lm_eval ...`): lm-eval's own command line with
the `flexgen` backend registered, e.g.

    flexeval-lm-eval --model flexgen --model_args policy=disk-offload --tasks hellaswag --limit 20

lm-eval 0.4.13 discovers no backends from other packages (it reads no entry points), so the plain
`lm_eval` command cannot see `flexgen`: this command is lm-eval's `cli_evaluate` after
`flexeval.lm` has registered it.

Data: `--metadata data_dir=DIR`, else $FLEXEVAL_DATA_DIR, else `../shared/data`; a data_dir or
$FLEXEVAL_DATA_DIR that is not a directory is an error (`flexeval.data.chosen_data_dir`). When
there are data and no `--include_path` is given, flexeval's task definitions, which read those
files instead of the hub, are included (they take the names of lm-eval's tasks they replace) and
the ones asked for are built before the model loads, so that a broken data file is reported
first; without data, lm-eval's own tasks run on hub datasets, after a notice that says so.

A mistake in the input (`flexeval.errors.FlexevalError`: a bad data file or task definition, a
bad `--model_args` value) is one line, `error: ...`, and exit status 2; with FLEXEVAL_DEBUG=1 its
traceback is printed above it. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lm_eval._cli import HarnessCLI
from lm_eval.utils import setup_logging

import flexeval.lm  # noqa: F401 - registers the flexgen backend
from flexeval import data
from flexeval.errors import FlexevalError, exit_with


def main() -> None:
    try:
        setup_logging()  # what lm-eval's cli_evaluate does, with flexeval's checks between parsing and running
        data.quiet_own_task_notices()
        parser = HarnessCLI()
        args = parser.parse_args()
        _check(args)
        parser.execute(args)
    except FlexevalError as err:
        exit_with(err)


def _check(args: argparse.Namespace) -> None:
    """Resolve the data directory, include flexeval's task definitions when there are data and the
    user names no others, check the definitions that will be read, and build ours that are asked
    for: lm-eval loads the model before the tasks, and a broken data file should not wait for it."""
    metadata = dict(getattr(args, "metadata", None) or {})
    root = data.chosen_data_dir(metadata.get("data_dir"))
    if not hasattr(args, "include_path"):  # no command: lm-eval prints its help
        return
    if args.include_path is None and root is None:
        print(f"flexeval: {data.NO_DATA_NOTICE}", file=sys.stderr)
        return
    if args.include_path is None:
        args.include_path = str(data.TASKS_DIR)
        print(f"flexeval: tasks from {data.TASKS_DIR}, data from {root} (--include_path: others)", file=sys.stderr)
    included = Path(args.include_path)
    data.check_task_files(included)
    own = [name for name in getattr(args, "tasks", None) or () if name in data.own_task_names()]
    if own and included.resolve() == data.TASKS_DIR.resolve():
        data.local_tasks(metadata).load(own)


if __name__ == "__main__":
    main()

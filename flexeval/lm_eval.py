"""`flexeval-lm-eval ...` (also `python -m flexeval.lm_eval ...`): lm-eval's own command line with
the `flexgen` backend registered, e.g.

    flexeval-lm-eval --model flexgen --model_args policy=disk-offload --tasks hellaswag --limit 20

lm-eval 0.4.13 discovers no backends from other packages (it reads no entry points), so the plain
`lm_eval` command cannot see `flexgen`: this command is lm-eval's `cli_evaluate` after
`flexeval.lm` has registered it. When the benchmark data are here ($FLEXEVAL_DATA_DIR or
`../shared/data`) and no `--include_path` is given, flexeval's task definitions, which read those
files instead of the hub, are included (they take the names of lm-eval's tasks they replace).
"""

from __future__ import annotations

import sys

from lm_eval.__main__ import cli_evaluate

import flexeval.lm  # noqa: F401 - registers the flexgen backend
from flexeval.data import TASKS_DIR, data_dir, quiet_own_task_notices


def main() -> None:
    quiet_own_task_notices()
    if "--include_path" not in sys.argv and data_dir().is_dir():
        sys.argv += ["--include_path", str(TASKS_DIR)]
        print(f"flexeval: tasks from {TASKS_DIR}, data from {data_dir()} (--include_path: others)", file=sys.stderr)
    cli_evaluate()


if __name__ == "__main__":
    main()

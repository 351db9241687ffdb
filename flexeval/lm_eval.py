"""`python -m flexeval.lm_eval ...` (also `flexeval-lm-eval`): lm-eval's own command line with the
`flexgen` backend registered, e.g.

    python -m flexeval.lm_eval run --model flexgen --model_args policy=disk-offload --tasks hellaswag
"""

from __future__ import annotations

import flexeval.lm  # noqa: F401 - registers the flexgen backend


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()

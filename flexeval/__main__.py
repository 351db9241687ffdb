"""`python -m flexeval task=... model=... policy=... compression=...`: evaluate a model on lm-eval
tasks through the offloading engine and report accuracy next to throughput.

A Hydra app: configuration groups in conf/, their schema and checks in flexeval/config.py; `-m`
sweeps (and, with hydra/launcher=submitit_*, sends each configuration to its own job). Every
mistake in the configuration is reported in one line before any model loads.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from flexeval import config
from flexeval.data import CONF_DIR
from flexeval.errors import FlexevalError, exit_with

config.register()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config.CONFIG_NAME)
def app(cfg: config.RunConfig) -> None:
    # torch, lm-eval and the engine load only once Hydra has composed a configuration
    from flexeval.evaluate import evaluate
    from flexeval.report import compact, rows
    from flexeval.resolve import resolve
    from flexeval.sweep import record_failure

    hydra_config = HydraConfig.get()
    out = Path(hydra_config.runtime.output_dir)
    overrides = list(hydra_config.overrides.task)
    try:
        run = resolve(cfg)
        if run.choice is not None:
            print(f"policy=auto chose: {run.choice.summary()}", flush=True)
        results = evaluate(run, out, overrides=overrides)
    except Exception as err:
        if hydra_config.mode == RunMode.MULTIRUN:  # recorded; the sweep's other points run on
            record_failure(out, overrides, err)
            return
        if not isinstance(err, FlexevalError):
            raise
        exit_with(err)
    print(f"\n{compact(rows(results, out.name))}\nresults: {out}")


def main() -> None:
    try:
        config.check_choices(sys.argv[1:])
        config.check_resume(sys.argv[1:])
    except FlexevalError as err:
        exit_with(err)
    app()


if __name__ == "__main__":
    main()

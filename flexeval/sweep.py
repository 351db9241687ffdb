"""A multirun (`python -m flexeval -m ...`) as its user expects it: every point of the sweep is
checked before the first one runs, so that a mistake in the fifth point does not surface an hour
in; a point that still fails while running is recorded in its directory and the others run;
and one combined report follows, naming the points that failed.

Refusing the whole sweep up front (rather than skipping the bad points) was chosen because a
sweep's table is read as a comparison: a silently missing point would read as a complete one.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback

from flexeval.atomic import write_text
from flexeval.errors import FlexevalError, first_line
from flexeval.report import build, compact

log = logging.getLogger(__name__)
FAILED = "failed.json"  # in a point's directory: the error that stopped it


class Sweep(Callback):
    """Hydra callback (conf/config.yaml): the checks before a multirun and its report after."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        points = sweep_points(config)
        problems = [(point, error) for point in points if (error := point_error(config, point))]
        if problems:
            for point, error in problems:
                print(f"error: {' '.join(point)}: {error}", file=sys.stderr)
            print(f"error: {len(problems)} of {len(points)} sweep points cannot run; none was started", file=sys.stderr)
            sys.exit(2)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        failed = sorted(sweep.rglob(FAILED))
        try:
            table = build([sweep], sweep)
            print(f"\n{compact(table)}\ncombined table and plot: {sweep}/table.md, {sweep}/accuracy_vs_throughput.png")
        except FlexevalError as err:
            log.error("no sweep report: %s", err)
        if failed:
            for path in failed:
                record = json.loads(path.read_text())
                print(f"failed: {' '.join(record['overrides'])}: {record['error']} ({path.parent})", file=sys.stderr)
            print(f"error: {len(failed)} sweep points failed", file=sys.stderr)
            sys.exit(1)


def sweep_points(config: Any) -> list[list[str]]:
    """The overrides of each point, as Hydra's basic sweeper will launch them (none for another
    sweeper, whose points are not known in advance)."""
    sweeper = config.hydra.sweeper
    if sweeper.get("_target_") != f"{BasicSweeper.__module__}.{BasicSweeper.__name__}":
        return []
    params = [f"{key}={value}" for key, value in (sweeper.get("params") or {}).items()]
    overrides = OverridesParser.create().parse_overrides(params + list(config.hydra.overrides.task))
    (points,) = BasicSweeper.split_arguments(overrides, None)
    return points


def point_error(config: Any, point: list[str]) -> str | None:
    """Why this point cannot run, in one line, or None: every check `python -m flexeval` makes
    before loading a model, on the point's composed configuration."""
    from flexeval.resolve import resolve  # torch and the engine: only once a sweep is checked

    try:
        resolve(GlobalHydra.instance().config_loader().load_sweep_config(config, point))
    except FlexevalError as err:
        return str(err)
    except Exception as err:  # Hydra's composition errors, in their own words
        return first_line(err)
    return None


def record_failure(directory: Path, overrides: list[str], error: BaseException) -> None:
    """What stopped a point while running, where `on_multirun_end` finds it."""
    if isinstance(error, FlexevalError):
        message = str(error)
        log.error("this sweep point failed, the others run on: %s", message)
    else:  # a bug: its traceback goes to the point's log
        message = f"{type(error).__name__}: {first_line(error)}"
        log.exception("this sweep point failed, the others run on")
    write_text(directory / FAILED, json.dumps({"overrides": overrides, "error": message}, indent=2) + "\n")

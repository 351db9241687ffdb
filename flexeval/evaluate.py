"""One evaluation run: the tasks of a checked `Run` through the `flexgen` backend, one model load.

Each task is evaluated by its own `lm_eval.simple_evaluate` call on the same loaded model, so
that its requests, tokens, time and memory are its own: the efficiency half of each table row.
Everything is written into the run directory atomically; the directory is the run's record.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lm_eval
import torch
import transformers
from lm_eval.tasks import TaskManager
from lm_eval.utils import handle_non_serializable
from omegaconf import OmegaConf

from flexeval import report
from flexeval.atomic import atomic_file, write_text
from flexeval.errors import FlexevalError, first_line
from flexeval.lm import FlexGenLM, Usage
from flexeval.models import dummy
from flexeval.reproducible import cpu_model
from flexeval.resolve import Run

RESULTS = "results.json"
# What lm-eval reports per task, merged over the run's tasks into one results.json.
PER_TASK = ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples")


def evaluate(run: Run, out_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Evaluate every task of `run`, write results.json, samples_<task>.jsonl, table.md and
    table.csv into `out_dir`, and return what results.json holds."""
    config = run.config
    manager = run.manager
    tasks = build_tasks(manager, run.tasks)  # the data are read and checked before the model loads
    lm = FlexGenLM(
        pretrained=config.model.pretrained,
        dtype=config.model.dtype,
        policy=run.policy,
        offload_dir=config.hardware.offload_dir,
        device=run.device,
        max_length=config.model.max_length,
        add_bos_token=config.model.add_bos_token,
        seed=config.seed,
        score_through_cache=config.score_through_cache,
        calibration=run.calibration,
    )
    combined: dict[str, Any] = {key: {} for key in PER_TASK} | {"throughput": {}}
    for name, task in tasks.items():
        lm.usage = Usage()
        start = time.perf_counter()
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=[task],
            limit=config.limit,
            num_fewshot=config.task.num_fewshot,
            bootstrap_iters=config.bootstrap_iters,
            log_samples=True,
            task_manager=manager,
        )
        wall = time.perf_counter() - start
        for key in PER_TASK:
            combined[key].update(out.get(key, {}))
        combined["throughput"][name] = lm.usage.report(wall)
        write_samples(out_dir / f"samples_{name}.jsonl", out["samples"][name])
    combined |= {
        "config": OmegaConf.to_container(config, resolve=True),
        "policy": asdict(run.policy),  # what ran (policy=auto: what the search chose)
        "prediction": None if run.choice is None else run.choice.prediction.as_dict(),
        "overrides": list(overrides or []),
        "weights": dummy.NOTE if config.model.pretrained.startswith(dummy.PREFIX) else "from the checkpoint",
        "hardware": hardware(lm),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "-m", "flexeval", *(overrides or [])]),
    }
    write_text(out_dir / RESULTS, json.dumps(combined, indent=2, default=handle_non_serializable) + "\n")
    report.write_tables(report.rows(combined, out_dir.name), out_dir)
    return combined


def build_tasks(manager: TaskManager, names: tuple[str, ...]) -> dict[str, Any]:
    try:
        return manager.load(list(names))["tasks"]
    except FileNotFoundError as err:
        raise FlexevalError(first_line(err)) from err


def write_samples(path: Path, samples: list[dict[str, Any]]) -> None:
    with atomic_file(path) as scratch, scratch.open("w", encoding="utf-8") as f:
        for sample in sorted(samples, key=lambda s: s["doc_id"]):
            f.write(json.dumps(sample, default=handle_non_serializable, ensure_ascii=False) + "\n")


def hardware(lm: FlexGenLM) -> dict[str, Any]:
    """The machine a run's throughput belongs to."""
    figures: dict[str, Any] = {
        "device": str(lm.device),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lm_eval": lm_eval.__version__,
    }
    if lm.device.type == "cuda":
        props = torch.cuda.get_device_properties(lm.device)
        figures |= {"gpu": props.name, "gpu_memory_bytes": props.total_memory}
    return figures

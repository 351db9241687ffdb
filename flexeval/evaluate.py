"""One evaluation run: the tasks of a checked `Run` through the `flexgen` backend, one model load.

Each task is evaluated by its own `lm_eval.simple_evaluate` call on the same loaded model, so
that its requests, tokens, time and memory are its own: the efficiency half of each table row.
Everything is written into the run directory atomically, each task as it finishes; the directory
is the run's record, and a rerun into it (`resume=<run dir>`) finishes what a kill interrupted.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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

from flexeval import report, resume
from flexeval.atomic import atomic_file, write_text
from flexeval.errors import FlexevalError, first_line
from flexeval.lm import FlexGenLM, Usage
from flexeval.models import dummy
from flexeval.report import compact
from flexeval.reproducible import cpu_model
from flexeval.resolve import Run

log = logging.getLogger(__name__)
RESULTS = "results.json"
# What lm-eval reports per task, merged over the run's tasks into one results.json.
PER_TASK = ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples")


def evaluate(run: Run, out_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Evaluate every task of `run` into `out_dir` and return what results.json holds.

    Each task's results, samples and table row are written as soon as it finishes, so a task
    that fails later loses nothing finished; a task already finished in `out_dir` (a resumed
    run) is kept, and requests answered before a kill are read back (`flexeval.resume`). When
    the output disk fails, every metric is still printed before the error.
    """
    tasks = build_tasks(run.manager, run.tasks)  # the data are read and checked before the model loads
    with _run_directory(out_dir):
        resume.start(out_dir, run.config)
    finished = {name: record for name in tasks if (record := _finished(out_dir, name)) is not None}
    if finished:
        print(f"resume: {', '.join(finished)} finished in {out_dir}, kept", flush=True)
    about = _about(run, overrides or [])
    unwritten: list[OSError] = []
    combined = None
    todo = {name: task for name, task in tasks.items() if name not in finished}
    if todo:
        with _run_directory(out_dir):
            requests = resume.RequestLog(out_dir / resume.REQUESTS)
        try:
            lm = resume.ResumableLM(_backend(run), requests)
            for name, task in todo.items():
                try:
                    finished[name], samples = _evaluate_task(run, lm, name, task)
                except Exception as err:
                    raise _task_failed(name, err, [t for t in tasks if t in finished], out_dir) from err
                _keep(unwritten, write_samples, out_dir / f"samples_{name}.jsonl", samples)
                _keep(unwritten, write_text, out_dir / _task_file(name), _json(finished[name]))
                combined = _write_run(finished, about, out_dir, unwritten)
        finally:
            requests.close()
    if combined is None:  # every task had finished before this rerun
        combined = _write_run(finished, about, out_dir, unwritten)
    if unwritten:
        print(compact(report.rows(combined, out_dir.name)), flush=True)
        err = unwritten[0]
        raise FlexevalError(
            f"could not write the results to {err.filename or out_dir}: {err.strerror or err}; "
            "the metrics are printed above"
        )
    return combined


def _backend(run: Run) -> FlexGenLM:
    config = run.config
    return FlexGenLM(
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


def _evaluate_task(run: Run, lm: resume.ResumableLM, name: str, task: Any) -> tuple[dict[str, Any], list]:
    """One task on the loaded model: lm-eval's results for it, its throughput, and its samples."""
    config = run.config
    lm.lm.usage = Usage()
    read_back = lm.read_back
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=[task],
        limit=config.limit,
        num_fewshot=config.task.num_fewshot,
        bootstrap_iters=config.bootstrap_iters,
        log_samples=True,
        task_manager=run.manager,
    )
    wall = time.perf_counter() - start
    record = {key: out.get(key, {}) for key in PER_TASK}
    record["throughput"] = {name: lm.lm.usage.report(wall) | {"read_back_requests": lm.read_back - read_back}}
    return record, out["samples"][name]


def _task_failed(name: str, err: Exception, finished: list[str], out_dir: Path) -> Exception:
    """The error a failed task ends the run with: it names the task and what was kept."""
    kept = f"finished tasks kept in {out_dir}: {', '.join(finished)}" if finished else "no task had finished"
    if isinstance(err, FlexevalError):
        return FlexevalError(f"task {name} failed: {err} ({kept})")
    err.add_note(f"flexeval: task {name} failed ({kept})")
    return err


def _about(run: Run, overrides: list[str]) -> dict[str, Any]:
    """What results.json says about the run besides the tasks' results."""
    config = run.config
    return {
        "config": OmegaConf.to_container(config, resolve=True),
        "labels": report.run_labels(config, overrides),
        "policy": asdict(run.policy),  # what ran (policy=auto: what the search chose)
        "prediction": None if run.choice is None else run.choice.prediction.as_dict(),
        "overrides": overrides,
        "weights": dummy.NOTE if config.model.pretrained.startswith(dummy.PREFIX) else "from the checkpoint",
        "hardware": hardware(torch.device(run.device)),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "-m", "flexeval", *overrides]),
    }


def _write_run(
    finished: dict[str, dict[str, Any]], about: dict[str, Any], out_dir: Path, unwritten: list[OSError]
) -> dict[str, Any]:
    """results.json and the tables, over the tasks finished so far."""
    combined: dict[str, Any] = {key: {} for key in (*PER_TASK, "throughput")}
    for record in finished.values():
        for key, value in record.items():
            combined[key].update(value)
    combined |= about
    _keep(unwritten, write_text, out_dir / RESULTS, _json(combined))
    _keep(unwritten, report.write_tables, report.rows(combined, out_dir.name), out_dir)
    return combined


@contextmanager
def _run_directory(out_dir: Path) -> Iterator[None]:
    """A run directory that cannot be written (read-only, or full before the run starts) said in
    one line before the model loads, rather than as a traceback."""
    try:
        yield
    except OSError as err:
        raise FlexevalError(
            f"cannot write the run directory {out_dir} ({err.filename or out_dir}: {err.strerror or err}): "
            "free space there, or run into a writable directory (hydra.run.dir=...)"
        ) from err


def _keep(unwritten: list[OSError], write: Callable[..., None], *args: Any) -> None:
    """Write, or note why not: a full output disk must not cost the metrics, which are printed."""
    try:
        write(*args)
    except OSError as err:
        log.error("could not write %s: %s", args[0], err.strerror or err)
        unwritten.append(err)


def _finished(out_dir: Path, name: str) -> dict[str, Any] | None:
    path = out_dir / _task_file(name)
    if not (path.is_file() and (out_dir / f"samples_{name}.jsonl").is_file()):
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _task_file(name: str) -> str:
    return f"results_{name}.json"


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, default=handle_non_serializable) + "\n"


def build_tasks(manager: TaskManager, names: tuple[str, ...]) -> dict[str, Any]:
    """The tasks, their data read: flexeval's own are checked as they load (`flexeval.jsonl`),
    and lm-eval's built-in tasks without a copy on disk or a network (hub datasets) fail here,
    in one line, rather than after the model has loaded."""
    try:
        return manager.load(list(names))["tasks"]
    except (FileNotFoundError, ConnectionError) as err:
        raise FlexevalError(first_line(err)) from err


def write_samples(path: Path, samples: list[dict[str, Any]]) -> None:
    with atomic_file(path) as scratch, scratch.open("w", encoding="utf-8") as f:
        for sample in sorted(samples, key=lambda s: s["doc_id"]):
            f.write(json.dumps(sample, default=handle_non_serializable, ensure_ascii=False) + "\n")


def hardware(device: torch.device) -> dict[str, Any]:
    """The machine a run's throughput belongs to."""
    figures: dict[str, Any] = {
        "device": str(device),
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
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        figures |= {"gpu": props.name, "gpu_memory_bytes": props.total_memory}
    return figures

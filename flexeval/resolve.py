"""A composed `RunConfig` (`flexeval.config`) made into a checked `Run`: everything that can be
checked without loading the model, in the order a user fixes it, and `policy=auto`'s plan.

This is where a run first needs torch, the model's config and the task index; `flexeval.config`
stays light so that `--help` and unknown options answer before any of it is imported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from lm_eval.tasks import TaskManager

from flexeval import data
from flexeval.data import DATA_ENV, TASKS_DIR, data_dir
from flexeval.engine.calibration import Calibration
from flexeval.engine.cost_model import Workload
from flexeval.engine.engine import AUTO, resolve_device, resolve_dtype
from flexeval.engine.hardware import HardwareProfile
from flexeval.engine.placement import weight_bytes_per_tier
from flexeval.engine.policy import COMPRESSION_FIELDS, Policy
from flexeval.engine.search import Budget, Choice, plan
from flexeval.errors import FlexevalError
from flexeval.models import dummy, registry
from flexeval.workload import task_workload

log = logging.getLogger(__name__)
GB = 2**30


@dataclass(frozen=True)
class Run:
    """A checked configuration: everything a run needs, nothing left to fail on but the work."""

    config: Any  # the resolved RunConfig, as composed by Hydra
    policy: Policy
    tasks: tuple[str, ...]
    data_dir: Path | None  # None: lm-eval's built-in tasks with their hub datasets
    device: str
    manager: TaskManager  # the task index the checks used (indexing lm-eval's own tasks takes seconds)
    calibration: Calibration | None = None  # when the weights take a GPTQ fit
    choice: Choice | None = None  # what policy=auto chose, with its prediction


def resolve(config: Any) -> Run:
    """Everything that can be checked without loading the model, in the order a user fixes it."""
    if config.limit is not None and config.limit <= 0:
        raise FlexevalError(f"limit must be a positive number of documents per task, got {config.limit}")
    for name, value, least in (
        ("model.max_length", config.model.max_length, 1),
        ("task.num_fewshot", config.task.num_fewshot, 0),
        ("bootstrap_iters", config.bootstrap_iters, 0),
    ):
        if value is not None and value < least:
            raise FlexevalError(f"{name} must be at least {least}, got {value}")
    if config.model.pretrained == "dummy":  # model=llama-2-7b model.pretrained=dummy: that model's shape
        config.model.pretrained = f"{dummy.PREFIX}{config.model.name}"
    registry.check(config.model.pretrained)
    device = resolve_device(config.hardware.device)
    directory = registry.resolve(config.model.pretrained) if config.model.dtype == AUTO else None
    dtype = resolve_dtype(config.model.dtype, device, directory)
    placement = {f.name: config.policy[f.name] for f in fields(Policy) if f.name not in COMPRESSION_FIELDS}
    policy = Policy.from_dict(placement | {name: config.compression[name] for name in COMPRESSION_FIELDS})
    _check_budgets(config)
    if config.policy.auto:
        _given_workload(config)  # checked before anything is counted
    else:
        _check_weights_fit(config, policy, dtype)
    root = _data_dir(config.data_dir)
    calibration = _calibration(config, policy, root)
    tasks = tuple(config.task.tasks)
    manager = _task_manager(config, root)
    _check_tasks(tasks, root, manager)
    choice = None
    if config.policy.auto:  # last: the first search on a machine measures it (seconds)
        hardware = config.hardware
        choice = plan(
            config.model.pretrained,
            planned_workload(config, manager),
            Budget.from_gb(hardware.gpu_mem_gb, hardware.cpu_mem_gb, hardware.disk_gb),
            base=policy,
            dtype=dtype,
            device=device,
            offload_dir=hardware.offload_dir,
            profile_overrides=dict(hardware.profile),
        )
        policy = choice.policy
    return Run(
        config=config,
        policy=policy,
        tasks=tasks,
        data_dir=root,
        device=str(device),
        manager=manager,
        calibration=calibration,
        choice=choice,
    )


def _given_workload(config: Any) -> dict[str, int]:
    """The `workload` section's values that were set (the rest are counted from the tasks)."""
    given = {name: value for name, value in config.workload.items() if value is not None}
    for name, least in (("sequences", 1), ("prompt_len", 1), ("gen_len", 0)):
        if name in given and given[name] < least:
            raise FlexevalError(f"workload.{name} must be at least {least}, got {given[name]}")
    return given


def planned_workload(config: Any, manager: TaskManager) -> Workload:
    """What policy=auto plans for: the tasks' own requests, counted, with the given values over them."""
    given = _given_workload(config)
    if len(given) == 3:
        return Workload(**given)
    directory = registry.resolve(config.model.pretrained)
    window = config.model.max_length or registry.build_model(directory).context_length
    tokenizer = registry.load_tokenizer(directory)
    counted = task_workload(manager, config.task.tasks, config.limit, config.task.num_fewshot, tokenizer, window)
    log.info("policy=auto plans for the tasks' requests: %s", counted)
    if given.keys() & {"sequences", "prompt_len"}:  # the counted lengths no longer describe them
        given["lengths"] = ()
    return replace(counted, **given)


def _task_manager(config: Any, root: Path | None) -> TaskManager:
    """lm-eval's task index for a run: the local definitions reading `root` (lm-eval's own
    tasks beside them when asked for), or without local data lm-eval's alone."""
    metadata = dict(config.task.metadata)
    if root is None:
        return TaskManager(metadata=metadata or None)
    return data.task_manager(config.task.tasks, metadata | {"data_dir": str(root)})


def _calibration(config: Any, policy: Policy, root: Path | None) -> Calibration | None:
    if not (policy.compress_weight and policy.comp_weight_config.fit == "gptq"):
        return None
    calibration = Calibration(**config.calibration)
    path = Path(calibration.path).expanduser()
    if not path.is_absolute():
        if root is None:
            raise FlexevalError(f"calibration.path {path} is relative but there is no data directory: give a full path")
        calibration = replace(calibration, path=str(root / path))
    if not calibration.file.is_file():
        raise FlexevalError(f"calibration.path {calibration.file} does not exist: the gptq fit needs text to fit to")
    return calibration


def _data_dir(given: str | None) -> Path | None:
    if given is not None:
        root = Path(given).expanduser()
        if not root.is_dir():
            raise FlexevalError(f"data_dir {root} is not a directory: point data_dir at the benchmark JSONL folder")
        return root.resolve()
    root = data_dir()
    if root.is_dir():
        return root.resolve()
    log.warning("no local benchmark data at %s ($%s): using lm-eval's built-in tasks and hub datasets", root, DATA_ENV)
    return None


def _check_tasks(tasks: tuple[str, ...], root: Path | None, manager: TaskManager) -> None:
    unknown = [t for t in tasks if t not in set(manager.all_tasks)]
    if unknown:
        where = f"the task definitions in {TASKS_DIR} or lm-eval's tasks" if root else "lm-eval's tasks (no local data)"
        raise FlexevalError(f"unknown task {', '.join(unknown)}: not in {where}; flexeval-lm-eval ls tasks lists them")


def _check_budgets(config: Any) -> None:
    """Budgets are positive, the offload directory exists, the profile overrides name figures."""
    hardware = config.hardware
    for key in ("gpu_mem_gb", "cpu_mem_gb", "disk_gb"):
        if hardware[key] is not None and hardware[key] <= 0:
            raise FlexevalError(f"hardware.{key} must be positive (GB), got {hardware[key]}")
    if hardware.offload_dir is not None and not Path(hardware.offload_dir).expanduser().is_dir():
        raise FlexevalError(f"hardware.offload_dir {hardware.offload_dir} does not exist: create it or choose another")
    known = {f.name for f in fields(HardwareProfile)}
    unknown = sorted(set(hardware.profile) - known)
    if unknown:
        raise FlexevalError(f"hardware.profile: unknown figures {unknown}; known: {', '.join(sorted(known))}")


def _check_weights_fit(config: Any, policy: Policy, dtype: torch.dtype) -> None:
    """A hand-written policy's weights fit each budget (policy=auto plans everything within them)."""
    hardware = config.hardware
    budgets = {"compute": hardware.gpu_mem_gb, "cpu": hardware.cpu_mem_gb, "disk": hardware.disk_gb}
    keys = {"compute": "gpu_mem_gb", "cpu": "cpu_mem_gb", "disk": "disk_gb"}
    if all(b is None for b in budgets.values()):
        return
    directory = registry.resolve(config.model.pretrained)  # config.json only; no weights are read
    placed = dict(zip(budgets, weight_bytes_per_tier(registry.build_model(directory).layers, policy, dtype)))
    total = sum(placed.values())
    for tier, budget in budgets.items():
        if budget is not None and placed[tier] > budget * GB:
            fits = int(100 * budget * GB / total)
            fix = {
                "compute": f"w_gpu_percent at most {fits}",
                "cpu": f"w_cpu_percent at most {fits}",
                "disk": f"w_gpu_percent + w_cpu_percent at least {100 - fits}",
            }[tier]
            raise FlexevalError(
                f"policy {config.policy.name} puts {placed[tier] / GB:.3g} GB of weights on the {tier} tier but "
                f"hardware.{keys[tier]}={budget}: choose a policy with {fix}"
            )

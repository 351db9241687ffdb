"""A composed `RunConfig` (`flexeval.config`) made into a checked `Run`: everything that can be
checked without loading the model, in the order a user fixes it, and `policy=auto`'s plan.

This is where a run first needs torch, the model's config and the task index; `flexeval.config`
stays light so that `--help` and unknown options answer before any of it is imported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from lm_eval.tasks import TaskManager

from flexeval import data
from flexeval.config import check_known_keys
from flexeval.data import DATA_ENV, TASKS_DIR
from flexeval.engine.device import AUTO, resolve_device, resolve_dtype
from flexeval.engine.policy import COMPRESSION_FIELDS, Policy
from flexeval.errors import FlexevalError
from flexeval.models import dummy, registry
from flexeval.planning.cost_model import Workload
from flexeval.planning.hardware import check_overrides
from flexeval.planning.request import WORKLOAD_LEAST, PolicyRequest, checked_max_length
from flexeval.planning.search import BUDGET_KEYS, Choice
from flexeval.quantization.calibration import Calibration
from flexeval.resume import check_resumable
from flexeval.workload import task_workload

log = logging.getLogger(__name__)


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
    workload: Workload | None = None  # what policy=auto planned for


def resolve(config: Any) -> Run:
    """Everything that can be checked without loading the model, in the order a user fixes it."""
    check_known_keys(config)
    if config.limit is not None and config.limit <= 0:
        raise FlexevalError(f"limit must be a positive number of documents per task, got {config.limit}")
    for name, value, least in (
        ("task.num_fewshot", config.task.num_fewshot, 0),
        ("bootstrap_iters", config.bootstrap_iters, 0),
    ):
        if value is not None and value < least:
            raise FlexevalError(f"{name} must be at least {least}, got {value}")
    if config.model.pretrained == "dummy":  # model=llama-2-7b model.pretrained=dummy: that model's shape
        config.model.pretrained = f"{dummy.PREFIX}{config.model.name}"
    if config.resume is not None:  # compared as evaluate records it: with the model spelt out
        check_resumable(Path(config.resume), config)
    registry.check(config.model.pretrained)
    if config.model.max_length is not None:  # within the window the model's config gives (no weights are read)
        window = registry.build_model(registry.resolve(config.model.pretrained)).context_length
        checked_max_length(config.model.max_length, window, named=lambda name: f"model.{name}")
    device = resolve_device(config.hardware.device)
    directory = registry.resolve(config.model.pretrained) if config.model.dtype == AUTO else None
    dtype = resolve_dtype(config.model.dtype, device, directory)
    request = policy_request(config)
    _check_hardware(config)
    policy = request.base() if request.auto else request.fixed(config.model.pretrained, dtype)
    root = _data_dir(config.data_dir)
    calibration = _calibration(config, policy, root)
    tasks = tuple(config.task.tasks)
    manager = _task_manager(config, root)
    _check_tasks(tasks, root, manager)
    choice = workload = None
    if request.auto:  # last: the first search on a machine measures it (seconds)
        workload = request.planned_for(counted_workload(config, manager, request))
        choice = request.plan(
            config.model.pretrained,
            workload,
            dtype=dtype,
            device=device,
            offload_dir=config.hardware.offload_dir,
            profile_overrides=dict(config.hardware.profile),
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
        workload=workload,
    )


def policy_request(config: Any) -> PolicyRequest:
    """The `policy`, `compression`, `hardware` budgets and `workload` sections, parsed as the
    backend parses its model_args."""
    placement = {f.name: config.policy[f.name] for f in fields(Policy) if f.name not in COMPRESSION_FIELDS}
    return PolicyRequest.parse(
        AUTO if config.policy.auto else None,
        placement | {name: config.compression[name] for name in COMPRESSION_FIELDS},
        {key: config.hardware[key] for key in BUDGET_KEYS.values()},
        dict(config.workload),
        name=config.policy.name,
        named=lambda name: f"{'workload' if name in WORKLOAD_LEAST else 'hardware'}.{name}",
    )


def planned_workload(config: Any, manager: TaskManager) -> Workload:
    """What policy=auto plans for (and `explain` predicts): the tasks' requests, counted, with the
    `workload` section's values over them."""
    request = policy_request(config)
    return request.planned_for(counted_workload(config, manager, request))


def counted_workload(config: Any, manager: TaskManager, request: PolicyRequest) -> Workload | None:
    """The tasks' requests, counted (None when the `workload` section gives every value)."""
    if request.workload_given:
        return None
    directory = registry.resolve(config.model.pretrained)
    window = config.model.max_length or registry.build_model(directory).context_length
    tokenizer = registry.load_tokenizer(directory)
    counted = task_workload(manager, config.task.tasks, config.limit, config.task.num_fewshot, tokenizer, window)
    log.info("policy=auto plans for the tasks' requests: %s", counted)
    return counted


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
    if root is None and not calibration.file.is_absolute():
        raise FlexevalError(
            f"calibration.path {calibration.file} is relative but there is no data directory: give a full path"
        )
    calibration = calibration.under(root) if root else calibration
    if not calibration.file.is_file():
        raise FlexevalError(f"calibration.path {calibration.file} does not exist: the gptq fit needs text to fit to")
    return calibration


def _data_dir(given: str | None) -> Path | None:
    """The benchmark data by `data.chosen_data_dir`'s rule (a data_dir or $FLEXEVAL_DATA_DIR that
    is not a directory is an error); a run without any says so, as it reads lm-eval's hub datasets."""
    root = data.chosen_data_dir(given)
    if root is None:
        log.warning(data.NO_DATA_NOTICE)
    return root


def _check_tasks(tasks: tuple[str, ...], root: Path | None, manager: TaskManager) -> None:
    unknown = [t for t in tasks if t not in set(manager.all_tasks)]
    if unknown and root is None and set(unknown) <= data.own_task_names():
        raise FlexevalError(
            f"task {', '.join(unknown)} reads local benchmark data, and there is none at {data.DEFAULT_DATA_DIR}: "
            f"set ${DATA_ENV} or data_dir to the benchmark JSONL folder"
        )
    if unknown:
        where = f"the task definitions in {TASKS_DIR} or lm-eval's tasks" if root else "lm-eval's tasks (no local data)"
        raise FlexevalError(f"unknown task {', '.join(unknown)}: not in {where}; flexeval-lm-eval ls tasks lists them")


def _check_hardware(config: Any) -> None:
    """The offload directory exists, the profile overrides name figures and give them usable values."""
    hardware = config.hardware
    if hardware.offload_dir is not None and not Path(hardware.offload_dir).expanduser().is_dir():
        raise FlexevalError(f"hardware.offload_dir {hardware.offload_dir} does not exist: create it or choose another")
    check_overrides(hardware.profile, "hardware.profile")

"""The run configuration of `python -m flexeval`: Hydra composes `conf/` (and a user's
`--config-dir` or `hydra.searchpath`) into a `RunConfig`; `flexeval.resolve` turns that into a
checked `Run` or a one-line error before any model is loaded.

The schemas are registered with Hydra's ConfigStore, so Hydra itself refuses a misspelt key or
a value of the wrong type; `check_choices` refuses an unknown group option (`policy=fast`) in
one line, before Hydra composes anything, asking Hydra's own config loader which options each
group has. This module imports neither torch nor lm-eval: `--help` and these errors answer at
once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import Any

from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.utils import create_config_search_path, get_args_parser
from hydra.core.config_search_path import SearchPathQuery
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, OverrideParseException
from omegaconf import MISSING, DictConfig, OmegaConf

from flexeval.data import CONF_DIR
from flexeval.engine.policy import COMPRESSION_FIELDS, Policy
from flexeval.errors import FlexevalError
from flexeval.quantization.calibration import Calibration
from flexeval.quantization.config import CompressionConfig as Quantization

GROUPS = ("model", "policy", "compression", "task", "hardware")
CONFIG_NAME = "config"


@dataclass
class ModelConfig:
    name: str = MISSING  # what run directories and tables call it
    pretrained: str = MISSING  # a registered name, dummy[:<shape>], a GGUF file, a checkpoint directory or a hub id
    dtype: str = "auto"  # the checkpoint's own (16-bit weights and GGUF blocks: bf16 where fast), or a name
    max_length: int | None = None  # default: the model's context window
    add_bos_token: bool | None = None  # default: the tokenizer's own choice, as lm-eval's hf backend


# FlexGen's fields, taken from `Policy` itself so that the schema cannot drift from the engine.
# `auto`: the policy search chooses batch shapes and placements within the hardware budgets for
# the `workload` section, and the fields here give the rest (policy=auto).
PolicyConfig = make_dataclass(
    "PolicyConfig",
    [("name", str, field(default=MISSING)), ("auto", bool, field(default=False))]
    + [(f.name, type(f.default), field(default=f.default)) for f in fields(Policy) if f.name not in COMPRESSION_FIELDS],
)


# How weights and the KV cache are compressed: `Policy`'s compression fields, set by the group;
# each quantization setting mirrors the engine's (frozen) `CompressionConfig`.
QuantizationConfig = make_dataclass(
    "QuantizationConfig", [(f.name, f.type, field(default=f.default)) for f in fields(Quantization)]
)
CompressionConfig = make_dataclass(
    "CompressionConfig",
    [
        ("name", str, field(default=MISSING)),
        ("compress_weight", bool, field(default=False)),
        ("comp_weight_config", QuantizationConfig, field(default=MISSING)),
        ("compress_cache", bool, field(default=False)),
        ("comp_cache_config", QuantizationConfig, field(default=MISSING)),
        ("native_weights", bool, field(default=False)),
    ],
)

# The text a GPTQ fit of the weights is fitted to (`quantization.calibration.Calibration`); a relative path is
# under the data directory.
CalibrationConfig = make_dataclass(
    "CalibrationConfig", [(f.name, f.type, field(default=f.default)) for f in fields(Calibration)]
)


@dataclass
class TaskConfig:
    name: str = MISSING
    tasks: list[str] = MISSING  # lm-eval task names: tasks/ with local data, else lm-eval's built-ins
    num_fewshot: int | None = None  # default: each task's own
    metadata: dict[str, Any] = field(default_factory=dict)  # passed to the tasks (e.g. mmlu_files)


@dataclass
class HardwareConfig:
    name: str = MISSING
    device: str | None = None  # cuda or cpu; default: cuda when available
    gpu_mem_gb: float | None = None  # the compute tier (RAM on a CPU-only machine)
    cpu_mem_gb: float | None = None
    disk_gb: float | None = None
    offload_dir: str | None = None
    profile: dict[str, Any] = field(default_factory=dict)  # figures of the measured HardwareProfile to override


# What policy=auto plans for: sequences of prompt_len tokens each generating gen_len (0: scoring,
# as log-likelihood tasks); micro-batches then hold no more tokens than planned. Unset (null):
# counted from the tasks' own requests (`flexeval.workload`).
WorkloadConfig = make_dataclass(
    "WorkloadConfig", [(name, int | None, field(default=None)) for name in ("sequences", "prompt_len", "gen_len")]
)


@dataclass
class RunConfig:
    model: ModelConfig = MISSING
    policy: PolicyConfig = MISSING
    compression: CompressionConfig = MISSING
    task: TaskConfig = MISSING
    hardware: HardwareConfig = MISSING
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    limit: int | None = None
    data_dir: str | None = None
    seed: int = 0
    bootstrap_iters: int = 1000
    score_through_cache: bool = False
    resume: str | None = None  # a run directory to finish: its finished tasks and answered requests are kept


def register() -> None:
    """Make the schema available to conf/config.yaml's defaults list (as `run_schema`), and the
    resolver that points `hydra.run.dir` at the directory a run resumes."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
    OmegaConf.register_new_resolver("flexeval_run_dir", lambda resume, fresh: resume or fresh, replace=True)


def check_known_keys(config: DictConfig, path: str = "") -> None:
    """Refuse keys that Hydra's `+` added outside the schema (`+limt=5` would otherwise run every
    document). `+` is needed, and allowed, only inside the open mappings: `hardware.profile`
    (checked against the profile's figures later) and `task.metadata` (the tasks' own options)."""
    schema = OmegaConf.get_type(config)
    if schema is None or not is_dataclass(schema):
        return
    known = [f.name for f in fields(schema)]
    for key in config:
        name = f"{path}{key}"
        if name == "hydra":  # Hydra's own node, present while a sweep's points are checked
            continue
        if key not in known:
            close = get_close_matches(str(key), known, n=1)
            hint = f"did you mean {path}{close[0]}?" if close else f"options here: {', '.join(known)}"
            raise FlexevalError(f"unknown option {name} (added with +): {hint}")
        node = config._get_node(key)
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
            check_known_keys(node, f"{name}.")


def check_choices(argv: list[str]) -> None:
    """Refuse `group=name` overrides naming no option of the group, listing the valid names.

    `argv` is the command line as Hydra reads it: the options are those of Hydra's own search
    path (conf/, `--config-dir`, `hydra.searchpath`). Hydra would refuse them too, but over a
    dozen lines of search paths; anything this cannot read is left for Hydra to report."""
    args, _ = get_args_parser().parse_known_args(argv)
    parser = OverridesParser.create()
    wanted: dict[str, list[str]] = {}
    for text in args.overrides:
        try:
            (override,) = parser.parse_overrides([text])
        except OverrideParseException:  # Hydra reports its own syntax errors
            continue
        group = override.key_or_group
        if group not in GROUPS or override.is_delete():
            continue
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
        wanted.setdefault(group, []).extend(v for v in values if isinstance(v, str))
    if not wanted or (args.config_dir is not None and not Path(args.config_dir).is_dir()):
        return  # Hydra names the missing --config-dir
    try:
        options = group_options(list(wanted), args.overrides, args.config_dir, args.config_name)
    except HydraException:  # a malformed hydra.searchpath, say: Hydra's own error says what
        return
    for group, values in wanted.items():
        for value in values:
            if value not in options[group]:
                raise FlexevalError(f"unknown {group} {value!r}: choose one of {', '.join(options[group])}")


def check_resume(argv: list[str]) -> None:
    """`resume` names one run's directory: a sweep's points each have their own."""
    args, _ = get_args_parser().parse_known_args(argv)
    if args.multirun and any(o.lstrip("+").startswith("resume=") for o in args.overrides):
        raise FlexevalError("resume finishes one run: resume each of a sweep's point directories in its own command")


def group_options(
    groups: Iterable[str], overrides: Iterable[str] = (), config_dir: str | None = None, config_name: str | None = None
) -> dict[str, list[str]]:
    """Each group's options on the search path Hydra composes from: conf/, then a `--config-dir`
    (prepended, as Hydra does) and the `hydra.searchpath` of the primary config or `overrides`."""
    register()
    search_path = create_config_search_path(f"file://{CONF_DIR}")
    if config_dir is not None:
        search_path.prepend("command-line", f"file://{Path(config_dir).resolve()}", SearchPathQuery(provider="schema"))
    loader = ConfigLoaderImpl(config_search_path=search_path)
    name = config_name or CONFIG_NAME
    return {group: loader.get_group_options(group, config_name=name, overrides=list(overrides)) for group in groups}

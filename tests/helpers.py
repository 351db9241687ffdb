"""Plain helpers and constants shared by the test modules (fixtures live in `conftest.py`).

Test modules import these from here, never from one another.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch import Tensor

from flexeval import Engine, Policy, config
from flexeval.data import CONF_DIR
from flexeval.models import registry, tiny
from flexeval.planning import timing
from flexeval.planning.cost_model import CostModel, Workload
from flexeval.planning.hardware import HardwareProfile
from flexeval.planning.search import GB

TINY_MODELS = tuple(tiny.CONFIGS)
CPU = torch.device("cpu")
MB = 2**20


def same_results(a: list[Tensor], b: list[Tensor]) -> bool:
    """Whether two runs' log-probabilities agree as far as the compute device promises.

    Engines compute on CUDA when it exists. On the CPU a sequence's results are bitwise free of
    batch shape and placement (MKL's strict mode, attention over real columns); cuBLAS picks its
    kernels by shape, so on CUDA they agree to float32 rounding only (README, Engine).
    """
    if len(a) != len(b):
        return False
    if not torch.cuda.is_available():
        return all(torch.equal(x, y) for x, y in zip(a, b))
    return all(torch.allclose(x, y, rtol=1e-5, atol=1e-5) for x, y in zip(a, b))


@torch.inference_mode()
def reference_logprobs(model, seq: Tensor) -> Tensor:
    """Each sequence alone, unpadded, through a transformers model: the plainest possible reference."""
    logits = model(seq[None]).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(1, seq[1:, None]).squeeze(1)


# --- engine runs under a policy (placement and schedule tests) ---

DISK = dict(w_gpu_percent=0, w_cpu_percent=0)


@dataclass(frozen=True)
class Work:
    """What `run` asks of an engine: sequences scored, and the first few of them continued."""

    sequences: int = 37  # scored
    prompts: int = 20  # the first few of them, continued
    new_tokens: int = 16


SMALL = Work(sequences=20, prompts=8, new_tokens=6)  # for the real model: every policy reads all of it


def sequences(count: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 90, (count,), generator=g).tolist()
    return [torch.randint(0, 250, (n,), generator=g) for n in lengths]


def run(name: str, policy: Policy, offload: Path, work: Work = Work()) -> tuple[list[Tensor], list]:
    """Log-probabilities of `work.sequences` sequences and tokens generated from the first few, in fp32."""
    seqs = sequences(work.sequences)
    engine = Engine.load(name, dtype="float32", policy=policy, offload_dir=offload)  # fp32's guarantee
    try:
        generated = engine.generate(seqs[: work.prompts], max_new_tokens=work.new_tokens, stop_token_ids=[])
        return engine.logprobs(seqs), generated
    finally:
        engine.close()


# --- the app, as a user runs it ---

TINY = ["model=tiny-llama", "task=piqa", "limit=8"]
WORKLOAD = ["workload.sequences=1000", "workload.prompt_len=512", "workload.gen_len=0"]  # not counted from a task


def flexeval(cwd: Path, *args: str, module: str = "flexeval") -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` in `cwd`."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("results.json"))


def table_rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open()))


def headline_rows(path: Path) -> list[dict[str, str]]:
    """table.csv is in long form: one line per metric; these are each task's headline metric."""
    return [row for row in table_rows(path) if row["headline"] == "True"]


def compose_run(*overrides: str):
    """The app's configuration for these command-line overrides, as Hydra composes it."""
    config.register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


# --- the planner on a made-up machine ---


def machine(**changes) -> HardwareProfile:
    """A made-up CPU-only machine: GEMMs ten times faster with many rows than with one."""
    rates = ((1, 1e10), (64, 5e10), (4096, 1e11))
    made = HardwareProfile(
        device="cpu",
        gemm={"float32": rates, "bfloat16": rates},
        attention={"float32": ((64, 2e10), (1024, 5e10)), "bfloat16": ((64, 2e10), (1024, 5e10))},
        decode_attention={"float32": 1e10, "bfloat16": 1e10},
        cpu_decode_attention={"float32": 1e10, "bfloat16": 1e10},
        memory_bandwidth=2e10,
        op_seconds=5e-6,
        dequantize=5e9,
        h2d=0.0,
        d2h=0.0,
        disk_read=1e9,
        disk_write=5e8,
        disk_call_seconds=1e-4,
        read_slowdown=1.2,
        memory={"compute": 16 * GB, "cpu": 16 * GB, "disk": 100 * GB},
    )
    return replace(made, **changes)


def layer_times(model, scale: float = 1.0, overhead: float = 2e-5) -> timing.LayerTimes:
    """What `measure_layers` would report on `machine()` if every layer took `scale` times its
    arithmetic plus `overhead` per call."""
    costs = CostModel(model, torch.float32, machine(), {}, Workload(1, 1))
    times = {}
    for kind in {layer.kind for layer in model.layers}:
        for phase, shapes in timing.LAYER_SHAPES.items():
            rows = []
            for b, n in shapes:
                seconds, calls = costs.arithmetic(kind, b, n, phase == "decode")
                rows.append((b, n, scale * seconds + overhead * calls))
            times[f"{kind}/{phase}"] = rows
    return times


def costs_for(spec: str, workload: Workload, **profile) -> CostModel:
    """The cost model of `spec` (built from its config alone: no weights read) on `machine(**profile)`."""
    model = registry.build_model(registry.resolve(spec))
    return CostModel(model, torch.float32, machine(**profile), layer_times(model), workload)

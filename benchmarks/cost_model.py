"""Predicted against measured throughput, over placements, batch shapes and compression.

Each configuration loads SmolLM2 under a policy, runs its workload `--repeats` times (WikiText-2
windows: scored whole, or prompts generating exactly `gen` tokens each) and prints the median
measured throughput next to the cost model's prediction on this machine's hardware profile,
then the Spearman rank correlation over all configurations (issue 7's first check: every ratio
within ±35 %, correlation ≥ 0.8).

    python benchmarks/cost_model.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

from flexeval import Engine, Policy
from flexeval.engine.policy import compression_fields
from flexeval.models import registry
from flexeval.planning.cost_model import CostModel, Workload
from flexeval.planning.hardware import profile
from flexeval.planning.timing import layer_times

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_dir, prompt_windows  # noqa: E402

DISK = dict(w_gpu_percent=0, w_cpu_percent=0)
SCORE, GENERATE = (32, 256, 0), (32, 128, 16)  # (sequences, prompt_len, gen_len)
# name -> (policy fields, dtype, workload)
CONFIGS = {
    "score resident b32": (dict(gpu_batch_size=32), "float32", SCORE),
    "score resident b32 bf16": (dict(gpu_batch_size=32), "bfloat16", SCORE),
    "score weights on disk b1": (dict(gpu_batch_size=1, **DISK), "float32", SCORE),
    "score weights 40/20/40 streamed b16": (
        dict(gpu_batch_size=16, w_gpu_percent=40, w_cpu_percent=20, stream_unembedding=True),
        "float32",
        SCORE,
    ),
    "score activations on disk b16": (dict(gpu_batch_size=16, act_gpu_percent=0), "float32", SCORE),
    "score 4bit on disk b8x2": (
        dict(gpu_batch_size=8, num_gpu_batches=2, **DISK, **compression_fields("4bit-weights")),
        "float32",
        SCORE,
    ),
    "generate resident b4": (dict(gpu_batch_size=4), "float32", GENERATE),
    "generate resident b32": (dict(gpu_batch_size=32), "float32", GENERATE),
    "generate resident b32 bf16": (dict(gpu_batch_size=32), "bfloat16", GENERATE),
    "generate weights on disk b8": (dict(gpu_batch_size=8, **DISK), "float32", GENERATE),
    "generate weights on disk b16x2": (dict(gpu_batch_size=16, num_gpu_batches=2, **DISK), "float32", GENERATE),
    "generate 4bit on disk b8": (
        dict(gpu_batch_size=8, **DISK, **compression_fields("4bit-weights")),
        "float32",
        GENERATE,
    ),
    "generate cache on disk b32": (
        dict(gpu_batch_size=32, cache_gpu_percent=0, cache_cpu_percent=0),
        "float32",
        GENERATE,
    ),
}

# On CUDA the compute tier is the GPU: CPU RAM and disk both cost copies, and attention can be
# delegated to a cache kept in CPU RAM.
CUDA_WORKLOAD = (64, 128, 32)
CPU_RAM = dict(w_gpu_percent=0, w_cpu_percent=100)
CUDA_CONFIGS = {
    "cuda score resident b32": (dict(gpu_batch_size=32), "float32", SCORE),
    "cuda score weights in CPU RAM b32": (dict(gpu_batch_size=32, **CPU_RAM), "float32", SCORE),
    "cuda generate resident b64": (dict(gpu_batch_size=64), "float32", CUDA_WORKLOAD),
    "cuda generate resident b8": (dict(gpu_batch_size=8), "float32", CUDA_WORKLOAD),
    "cuda generate weights in CPU RAM b64": (dict(gpu_batch_size=64, **CPU_RAM), "float32", CUDA_WORKLOAD),
    "cuda generate weights on disk b32x2": (
        dict(gpu_batch_size=32, num_gpu_batches=2, **DISK),
        "float32",
        CUDA_WORKLOAD,
    ),
    "cuda generate cache in CPU RAM b64": (
        dict(gpu_batch_size=64, cache_gpu_percent=0, cache_cpu_percent=100),
        "float32",
        CUDA_WORKLOAD,
    ),
    "cuda generate cache in CPU RAM, attention there b64": (
        dict(gpu_batch_size=64, cache_gpu_percent=0, cache_cpu_percent=100, cpu_cache_compute=True),
        "float32",
        CUDA_WORKLOAD,
    ),
    "cuda generate 4bit weights in CPU RAM b64": (
        dict(gpu_batch_size=64, **CPU_RAM, **compression_fields("4bit-weights")),
        "float32",
        CUDA_WORKLOAD,
    ),
}


def measure(engine: Engine, ids: torch.Tensor, gen_len: int) -> float:
    start = time.perf_counter()
    if gen_len:
        engine.generate(list(ids), max_new_tokens=gen_len, stop_token_ids=[])
    else:
        engine.logprobs(list(ids))
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", choices=[*CONFIGS, *CUDA_CONFIGS], help="default: the device's set")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=data_dir())
    args = parser.parse_args()
    configs = CUDA_CONFIGS if args.device.startswith("cuda") else CONFIGS
    names = args.configs or list(configs)

    directory = registry.resolve(registry.DEFAULT_MODEL)
    model = registry.build_model(directory)
    rows = []
    print(f"{'configuration':<34}{'predicted':>11}{'measured':>10}{'ratio':>8}   predicted / measured compute, io s")
    with tempfile.TemporaryDirectory() as offload:
        device = torch.device(args.device)
        hardware = profile(device, Path(offload), registry.cache_root())
        for name in names:
            fields, dtype, (sequences, prompt_len, gen_len) = (CONFIGS | CUDA_CONFIGS)[name]
            policy = Policy(**fields)
            workload = Workload(sequences, prompt_len, gen_len, uniform=True)
            layers = layer_times(model, getattr(torch, dtype), device, Path(offload), registry.cache_root())
            predicted = CostModel(model, getattr(torch, dtype), hardware, layers, workload).predict(policy)
            engine = Engine.load(directory, dtype=dtype, device=device, policy=policy, offload_dir=offload)
            ids = prompt_windows(engine.tokenizer, args.data_dir, sequences, prompt_len)
            seconds = statistics.median(measure(engine, ids, gen_len) for _ in range(args.repeats))
            stats = engine.stats
            engine.close()
            measured = workload.tokens / seconds
            rows.append((name, predicted.tokens_per_second, measured))
            compute = predicted.prefill.compute + predicted.decode.compute
            io = sum(predicted.prefill.io.values()) + sum(predicted.decode.io.values())
            print(
                f"{name:<34}{predicted.tokens_per_second:>11.1f}{measured:>10.1f}"
                f"{predicted.tokens_per_second / measured:>8.2f}   {compute:.2f} / {stats.compute_seconds:.2f}, "
                f"{io:.2f} / wait {stats.io_wait_seconds:.2f}",
                flush=True,
            )
    ratios = [p / m for _, p, m in rows]
    rho = spearmanr([p for _, p, _ in rows], [m for _, _, m in rows]).statistic
    within = sum(0.65 <= r <= 1.35 for r in ratios)
    print(f"\n{within}/{len(rows)} within ±35 %; ratios {min(ratios):.2f}–{max(ratios):.2f}; Spearman {rho:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

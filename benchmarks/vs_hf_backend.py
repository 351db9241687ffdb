"""lm-eval throughput: the `flexgen` backend against lm-eval's own `hf` backend, everything resident.

Both run the same task (this repository's definition, reading local data) through
`lm_eval.simple_evaluate` in this process, SmolLM2-135M, the same dtype; `hf` at each of
`--hf-batch-sizes`, and the ratio is taken against its best. Prints wall time, requests/s and
the task's metrics for each run, so that equal accuracy can be checked next to the speed.

    python benchmarks/vs_hf_backend.py --task hellaswag --limit 1000
    python benchmarks/vs_hf_backend.py --task arc_easy --num-fewshot 5 --limit 500
"""

from __future__ import annotations

import argparse
import sys
import time

import lm_eval

import flexeval  # noqa: F401 - registers flexgen
from flexeval.data import local_tasks
from flexeval.models import registry


def evaluate(args, model: str, model_args: str, batch_size: int | None = None) -> tuple[float, dict, int]:
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[args.task],
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        batch_size=batch_size,
        bootstrap_iters=0,
        task_manager=local_tasks(),
    )
    seconds = time.perf_counter() - start
    requests = sum(len(s["resps"]) for s in out["samples"][args.task])
    return seconds, out["results"][args.task], requests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="hellaswag")
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--hf-batch-sizes", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--flexgen-args", default="gpu_batch_size=16,num_gpu_batches=4")
    args = parser.parse_args()

    checkpoint = registry.resolve(registry.DEFAULT_MODEL)
    runs = []
    flexgen_args = f"pretrained={checkpoint},dtype={args.dtype},{args.flexgen_args}"
    runs.append((f"flexgen ({args.flexgen_args})", *evaluate(args, "flexgen", flexgen_args)))
    for batch in args.hf_batch_sizes:
        hf_args = f"pretrained={checkpoint},dtype={args.dtype},device=cpu"
        runs.append((f"hf (batch {batch})", *evaluate(args, "hf", hf_args, batch)))

    shots = "" if args.num_fewshot is None else f", {args.num_fewshot}-shot"
    print(f"\n{args.task}{shots}, {args.limit} docs, SmolLM2-135M {args.dtype}, everything resident")
    print(f"{'backend':<44}{'seconds':>9}{'requests':>10}{'req/s':>8}  metrics")
    for name, seconds, metrics, requests in runs:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and "stderr" not in k)
        print(f"{name:<44}{seconds:>9.1f}{requests:>10}{requests / seconds:>8.2f}  {shown}")
    best_hf = min(seconds for name, seconds, _, _ in runs[1:])
    print(f"flexgen / best hf throughput: {best_hf / runs[0][1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

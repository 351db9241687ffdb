"""lm-eval throughput: the `flexgen` backend against lm-eval's own `hf` backend.

Both run the same task (this repository's definition, reading local data) through
`lm_eval.simple_evaluate`, on the same model in the same dtype, each in its own process in a
memory cgroup of its own (so: as root), the page cache dropped first; `hf` at each of
`--hf-batch-sizes` with the whole model resident, and the ratio is taken against its best. With
`--limit-gb`, flexgen's cgroup is limited to that size (page cache included: what a machine with
that much memory has), where a model larger than the limit must stream its weights from disk;
`hf` runs without a limit. Loading is timed apart from evaluating. Prints, per run, the seconds
of each, requests/s, the peaks (cgroup and RSS), the tokens the model computed and the task's
metrics; then the largest metric difference between flexgen and each `hf` run, so that equal
accuracy is checked next to the speed.

    python benchmarks/vs_hf_backend.py --task hellaswag --limit 1000
    python benchmarks/vs_hf_backend.py --task arc_easy --num-fewshot 5 --limit 500

At scale: Qwen2.5-Coder-1.5B, flexgen's weights on disk under a 1.5 GiB limit, its
unembedding streamed a vocabulary slice at a time (whole, its 151,936 x 1,536 table alone takes
0.47 GB in bf16, and the run is killed at the limit):

    python benchmarks/vs_hf_backend.py --model qwen2.5-coder-1.5b --dtype bfloat16 --limit-gb 1.5 \\
        --task hellaswag --limit 200 --hf-batch-sizes 8 32 \\
        --flexgen-args policy=disk-offload,gpu_batch_size=16,num_gpu_batches=13,stream_unembedding=true
    python benchmarks/vs_hf_backend.py --model qwen2.5-coder-1.5b --dtype bfloat16 --limit-gb 1.5 \\
        --task arc_easy --num-fewshot 5 --limit 100 --hf-batch-sizes 8 \\
        --flexgen-args policy=disk-offload,gpu_batch_size=16,num_gpu_batches=7,stream_unembedding=true
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dense_checkpoint, evaluate_task, spawn_measured  # noqa: E402


def child(args) -> int:
    """One backend's evaluation in this process: its figures as a JSON line on stdout."""
    from lm_eval.api.registry import get_model

    import flexeval.lm  # noqa: F401 - registers flexgen

    start = time.perf_counter()
    lm = get_model(args.backend).create_from_arg_string(args.model_args, {"batch_size": args.batch_size})
    load = time.perf_counter() - start
    start = time.perf_counter()
    out = evaluate_task(lm, "", args.task, args.limit, num_fewshot=args.num_fewshot)
    seconds = time.perf_counter() - start
    usage = getattr(lm, "usage", None)
    print(
        json.dumps(
            {
                "load_seconds": load,
                "seconds": seconds,
                "requests": sum(len(s["resps"]) for s in out["samples"][args.task]),
                "tokens": usage.prompt_tokens + usage.generated_tokens if usage else None,
                "metrics": {k: v for k, v in out["results"][args.task].items() if isinstance(v, float)},
                "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
        )
    )
    return 0


def spawn(args, backend: str, model_args: str, batch_size: int, limit_bytes: int) -> dict:
    cmd = [
        sys.executable, __file__, "--backend", backend, "--model-args", model_args, "--batch-size", str(batch_size),
        "--task", args.task, "--limit", str(args.limit),
    ] + (["--num-fewshot", str(args.num_fewshot)] if args.num_fewshot is not None else [])  # fmt: skip
    return spawn_measured(cmd, limit_bytes, args.timeout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a model name, GGUF file or checkpoint directory")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--task", default="hellaswag")
    parser.add_argument("--limit", type=int, default=1000, help="documents")
    parser.add_argument("--num-fewshot", type=int)
    parser.add_argument("--hf-batch-sizes", type=int, nargs="*", default=[8, 32, 64], help="none: flexgen alone")
    parser.add_argument("--flexgen-args", default="gpu_batch_size=16,num_gpu_batches=4", help="flexgen's model_args")
    parser.add_argument("--limit-gb", type=float, help="flexgen's memory cgroup limit, GiB (default: none)")
    parser.add_argument("--timeout", type=float, help="seconds a run may take")
    parser.add_argument("--backend", choices=["flexgen", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--model-args", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend:
        return child(args)

    from flexeval.models import registry

    registry.resolve(args.model)  # prepared, and hf's checkpoint written, before any timing
    checkpoint = dense_checkpoint(args.model, args.dtype) if args.hf_batch_sizes else None
    unlimited = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with tempfile.TemporaryDirectory() as offload:
        flexgen_args = f"pretrained={args.model},dtype={args.dtype},offload_dir={offload},{args.flexgen_args}"
        limit = int(args.limit_gb * 2**30) if args.limit_gb else unlimited
        runs = [(f"flexgen ({args.flexgen_args})", spawn(args, "flexgen", flexgen_args, 1, limit))]
    for batch in args.hf_batch_sizes:
        hf_args = f"pretrained={checkpoint},dtype={args.dtype},device=cpu"
        runs.append((f"hf (batch {batch})", spawn(args, "hf", hf_args, batch, unlimited)))

    shots = "" if args.num_fewshot is None else f", {args.num_fewshot}-shot"
    where = f"flexgen under a {args.limit_gb:g} GiB memory cgroup" if args.limit_gb else "no memory limit"
    print(f"\n{args.task}{shots}, {args.limit} docs, {args.model} {args.dtype}; {where}, hf resident")
    header = ("load s", "eval s", "requests", "req/s", "cgroup GiB", "RSS GiB", "tokens")
    print(f"{'backend':<60}" + "".join(f"{h:>11}" for h in header) + "  metrics")
    for name, r in runs:
        if "failed" in r:
            print(f"{name:<60}failed: {r['failed']} (cgroup peak {r['peak_cgroup'] / 2**30:.2f} GiB)")
            continue
        shown = ", ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items() if "stderr" not in k)
        figures = (
            f"{r['load_seconds']:.1f}", f"{r['seconds']:.1f}", str(r["requests"]),
            f"{r['requests'] / r['seconds']:.2f}",
            f"{r['peak_cgroup'] / 2**30:.2f}", f"{r['peak_rss'] / 2**30:.2f}", str(r["tokens"] or "-"),
        )  # fmt: skip
        print(f"{name:<60}" + "".join(f"{f:>11}" for f in figures) + f"  {shown}")
    flexgen, hf = runs[0][1], [r for _, r in runs[1:] if "failed" not in r]
    if "failed" not in flexgen and hf:
        best = min(hf, key=lambda r: r["seconds"])
        print(
            f"flexgen / best hf: {best['seconds'] / flexgen['seconds']:.2f}x evaluating, "
            f"{(best['seconds'] + best['load_seconds']) / (flexgen['seconds'] + flexgen['load_seconds']):.2f}x "
            f"with loading"
        )
        for name, r in runs[1:]:
            if "failed" not in r:
                worst = max(abs(flexgen["metrics"][k] - v) for k, v in r["metrics"].items() if "stderr" not in k)
                print(f"largest metric difference, flexgen against {name}: {worst:.2e}")
    return int(any("failed" in r for _, r in runs))


if __name__ == "__main__":
    sys.exit(main())

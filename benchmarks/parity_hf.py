"""Parity with lm-eval's `hf` backend: the same tasks, weights and dtype through both backends.

Runs `lm_eval.simple_evaluate` for each task with `flexgen` and with `hf` (fp32, no
compression), prints every metric of both and their largest difference, and for generation
tasks the share of samples whose generated strings are identical.

    python benchmarks/parity_hf.py                       # the acceptance set (about an hour on 2 cores)
    python benchmarks/parity_hf.py --tasks piqa:100      # a quick look
    python benchmarks/parity_hf.py --model qwen2.5-coder-1.5b --tasks hellaswag:100 arc_easy:100 piqa:100
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import flexeval.lm  # noqa: F401 - registers flexgen
from flexeval.models import registry

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import evaluate_task  # noqa: E402

ACCEPTANCE = [
    "piqa:1000",
    "arc_easy:1000",
    "lambada_openai:1000",
    "boolq:500",
    "wikitext:all",
    "helm_synthetic_reasoning_pattern_match:200",
    "hellaswag:1000",
]


def run(model: str, model_args: str, task: str, limit: int | None, batch_size: int | None) -> tuple[dict, list, float]:
    start = time.perf_counter()
    out = evaluate_task(model, model_args, task, limit, batch_size=batch_size)
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return out["results"][task], samples, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=registry.DEFAULT_MODEL, help="a model spec (name, GGUF file, directory)")
    parser.add_argument("--tasks", nargs="+", default=ACCEPTANCE, help="task:limit (limit 'all' for every doc)")
    parser.add_argument("--hf-batch-size", type=int, default=32)
    parser.add_argument("--flexgen-args", default="gpu_batch_size=16,num_gpu_batches=4")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()

    checkpoint = registry.resolve(args.model)
    hf_extra = "".join(f",{key}={value}" for key, value in registry.hf_kwargs(checkpoint).items())
    rows, ok = [], True
    for spec in args.tasks:
        task, _, limit_text = spec.partition(":")
        limit = None if limit_text in ("", "all") else int(limit_text)
        flexgen_args, hf_args = (
            f"pretrained={checkpoint},dtype=float32,{args.flexgen_args}",
            f"pretrained={checkpoint},device=cpu{hf_extra}",
        )
        ours, our_samples, our_s = run("flexgen", flexgen_args, task, limit, None)
        theirs, their_samples, their_s = run("hf", hf_args, task, limit, args.hf_batch_size)
        for key, value in ours.items():
            if not isinstance(value, float) or "stderr" in key:
                continue
            diff = abs(value - theirs[key])
            ok &= diff <= args.tolerance
            rows.append(f"{task:<42}{key:<26}{value:>12.6f}{theirs[key]:>12.6f}{diff:>11.2e}")
        if our_samples and isinstance(our_samples[0]["resps"][0][0], str):
            same = sum(a["resps"] == b["resps"] for a, b in zip(our_samples, their_samples)) / len(our_samples)
            ok &= same >= 0.995
            rows.append(f"{task:<42}{'identical generations':<26}{same:>12.2%}")
        rows.append(f"{task:<42}{'seconds':<26}{our_s:>12.1f}{their_s:>12.1f}")
        print(rows[-1], flush=True)
    print(f"\n{args.model} fp32, flexgen ({args.flexgen_args}) against hf (batch {args.hf_batch_size})")
    print(f"{'task':<42}{'metric':<26}{'flexgen':>12}{'hf':>12}{'|diff|':>11}")
    print("\n".join(rows))
    print(f"\nevery metric within {args.tolerance:g} and >= 99.5 % identical generations: {'OK' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Sparse attention (issue 6, check 5): accuracy and cache reads at several `attn_sparsity`.

Two measurements on SmolLM2-135M fp32, for each sparsity:
- HELM synthetic reasoning (pattern_match), generated through lm-eval's `flexgen` backend:
  exact match, and the share of generations identical to dense attention's;
- a perplexity-style check: WikiText-2 windows, the prompt prefilled and every continuation
  token scored through a decoding step (`Engine.decode_logprobs`), so that each one attends to
  the cache the way generation does; perplexity of the continuations.
Decoding reads every cached key but only the chosen values: for each step the script counts
the cache bytes attention reads (keys of all visible positions, values of the kept ones and
its own) against dense attention, from the positions each step sees. It also measures what
moves when the cache lives on disk: a few windows decoded with the whole cache on the disk
tier, the bytes read from it (whole 4 KiB pages: a page holds 16 columns of a head) and
written to it while decoding, against dense attention's.

    python benchmarks/sparse_attention.py                                   # about 15 minutes on 2 cores
    python benchmarks/sparse_attention.py --docs 50 --windows 8 --sparsities 1.0 0.1
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from flexeval import Engine, Policy
from flexeval.models import registry

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_dir, evaluate_task, prompt_windows  # noqa: E402

TASK = "helm_synthetic_reasoning_pattern_match"


def generation_task(sparsity: float, docs: int) -> tuple[float, list[str]]:
    args = f"pretrained={registry.DEFAULT_MODEL},dtype=float32,gpu_batch_size=32,attn_sparsity={sparsity}"
    out = evaluate_task("flexgen", args, TASK, docs)
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    return out["results"][TASK]["exact_match,strip"], [s["resps"][0][0] for s in samples]


def read_share(sparsity: float, prompt: int, steps: int) -> float:
    """Cache bytes attention reads while decoding `steps` tokens after a `prompt`-token prompt,
    as a share of dense attention's (keys and values take equal bytes per position)."""
    dense = sparse = 0
    for t in range(1, steps):  # step t sees prompt + t positions, the last its own
        visible = prompt + t
        dense += 2 * visible
        sparse += visible + int(sparsity * (visible - 1)) + 1
    return sparse / dense


def disk_traffic(sparsity: float, windows: torch.Tensor, prompt_tokens: int) -> tuple[int, int]:
    """(bytes read, bytes written) of the disk tier holding the whole KV cache while decoding
    `windows` after their first `prompt_tokens` (the prefill's own writes excluded)."""
    policy = Policy(gpu_batch_size=32, attn_sparsity=sparsity, cache_gpu_percent=0, cache_cpu_percent=0)
    with tempfile.TemporaryDirectory() as offload:
        engine = Engine.load(registry.DEFAULT_MODEL, dtype="float32", policy=policy, offload_dir=offload)
        engine.decode_logprobs([w[:prompt_tokens] for w in windows], [w[prompt_tokens:] for w in windows])
        disk = engine.stats.tiers["cache"]["disk"]
        engine.close()
    return disk["bytes_read"], disk["bytes_written"] - disk["peak_bytes"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[1.0, 0.5, 0.2, 0.1])
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--windows", type=int, default=32, help="WikiText windows for the perplexity check")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--continuation-tokens", type=int, default=128)
    parser.add_argument("--disk-windows", type=int, default=4, help="windows decoded with the cache on disk")
    parser.add_argument("--data-dir", type=Path, default=data_dir())
    args = parser.parse_args()

    rows, dense_texts = [], None
    for sparsity in args.sparsities:
        start = time.perf_counter()
        exact, texts = generation_task(sparsity, args.docs)
        dense_texts = dense_texts or texts
        same = sum(a == b for a, b in zip(texts, dense_texts)) / len(texts)
        engine = Engine.load(
            registry.DEFAULT_MODEL, dtype="float32", policy=Policy(gpu_batch_size=32, attn_sparsity=sparsity)
        )
        length = args.prompt_tokens + args.continuation_tokens
        windows = prompt_windows(engine.tokenizer, args.data_dir, args.windows, length)
        lps = engine.decode_logprobs(
            [w[: args.prompt_tokens] for w in windows], [w[args.prompt_tokens :] for w in windows]
        )
        perplexity = math.exp(-torch.cat(lps).mean().item())
        share = read_share(sparsity, args.prompt_tokens, args.continuation_tokens)
        disk = disk_traffic(sparsity, windows[: args.disk_windows], args.prompt_tokens)
        rows.append((sparsity, exact, same, perplexity, share, *disk))
        print(f"attn_sparsity {sparsity}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

    print(
        f"SmolLM2-135M fp32. {TASK}: first {args.docs} docs, exact match; perplexity: {args.windows} WikiText-2 "
        f"windows, {args.continuation_tokens} tokens decoded after {args.prompt_tokens}"
    )
    print(
        f"cache on disk: {args.disk_windows} windows decoded; MB read from and written to the disk tier while "
        "decoding, read also as a share of dense attention's"
    )
    header = (
        "attn_sparsity",
        "exact match",
        "same text",
        "perplexity",
        "cache read",
        "disk MB read",
        "share",
        "MB written",
    )
    print("".join(f"{h:>14}" for h in header))
    dense_read = rows[0][5] if rows and rows[0][0] == 1.0 else float("nan")
    for sparsity, exact, same, perplexity, share, read, written in rows:
        print(
            f"{sparsity:>14.2f}{exact:>14.3f}{same:>14.1%}{perplexity:>14.3f}{share:>14.1%}"
            f"{read / 1e6:>14.1f}{read / dense_read:>14.1%}{written / 1e6:>14.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Memory honesty of disk offloading: peak RSS and bytes read per block, weights 100 % on disk.

Scores `--sequences` sequences of `--tokens` tokens (consecutive windows of WikiText-2 text)
with SmolLM2-135M, fp32, every weight on disk, and prints the process's peak RSS growth over
its RSS right after the imports, as a fraction of the fp32 weight bytes, and the bytes read
from disk per block against the bytes of one copy of the weights.

    python benchmarks/offload_memory.py --sequences 256 --tokens 256
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from flexeval import Engine, Policy
from flexeval.models import registry

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import options, rss_bytes, wikitext_tokens  # noqa: E402


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> int:
    parser = options(__doc__, sequences=256, tokens=256, gpu_batch_size=2, num_gpu_batches=16)
    parser.add_argument("--offload-dir", type=Path, default=None)
    args = parser.parse_args()

    base = rss_bytes()
    policy = Policy(
        gpu_batch_size=args.gpu_batch_size,
        num_gpu_batches=args.num_gpu_batches,
        w_gpu_percent=0,
        w_cpu_percent=0,
    )
    with tempfile.TemporaryDirectory(dir=args.offload_dir) as offload:
        engine = Engine.load(registry.DEFAULT_MODEL, dtype="float32", policy=policy, offload_dir=offload)
        tokens = wikitext_tokens(engine.tokenizer, args.data_dir, args.sequences * args.tokens)
        seqs = list(torch.tensor(tokens).view(args.sequences, args.tokens))
        start = time.perf_counter()
        engine.logprobs(seqs)
        elapsed = time.perf_counter() - start
        stats = engine.stats
        engine.close()

    weights = engine.model.nbytes(torch.float32)  # a tied embedding counted (and stored) once
    blocks = -(-args.sequences // policy.block_size)
    read = stats.tiers["weights"]["disk"]["bytes_read"] / blocks
    growth = peak_rss_bytes() - base
    print(
        f"SmolLM2-135M fp32, weights 100% on disk, {args.sequences} x {args.tokens} tokens, "
        f"blocks of {args.gpu_batch_size} x {args.num_gpu_batches} sequences ({blocks} blocks), {elapsed:.1f} s"
    )
    print(f"fp32 weight bytes: {weights / 1e6:.1f} MB")
    print(
        f"peak RSS growth over post-import RSS: {growth / 1e6:.1f} MB = {growth / weights:.3f} x weight bytes "
        f"(target <= 0.35)"
    )
    print(
        f"bytes read from disk per block: {read / 1e6:.1f} MB = {read / weights:.3f} x the weights (target 1 +- 0.05)"
    )
    print(
        f"compute {stats.compute_seconds:.1f} s, waiting for I/O {stats.io_wait_seconds:.1f} s, "
        f"disk read time {stats.tiers['weights']['disk']['io_seconds']:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does overlapping disk reads with compute pay? The same run with overlap on and off.

SmolLM2-135M fp32 with every weight on disk scores blocks of real text small enough that
reading the weights and computing on them take comparable time; each configuration runs
`--repeats` times (alternating) and the medians are printed with the breakdown of the
non-overlapped run into I/O and compute.

    python benchmarks/overlap.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from flexeval import Engine, Policy
from flexeval.models import registry

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import options, wikitext_tokens  # noqa: E402


def main() -> int:
    parser = options(__doc__, sequences=16, tokens=64, gpu_batch_size=4, num_gpu_batches=1, repeats=5)
    args = parser.parse_args()

    engines = {}
    with tempfile.TemporaryDirectory() as offload:
        for overlap in (False, True):
            policy = Policy(
                gpu_batch_size=args.gpu_batch_size,
                num_gpu_batches=args.num_gpu_batches,
                w_gpu_percent=0,
                w_cpu_percent=0,
                overlap=overlap,
            )
            engines[overlap] = Engine.load(registry.DEFAULT_MODEL, dtype="float32", policy=policy, offload_dir=offload)
        tokens = wikitext_tokens(engines[True].tokenizer, args.data_dir, args.sequences * args.tokens)
        seqs = list(torch.tensor(tokens).view(args.sequences, args.tokens))
        seconds: dict[bool, list[float]] = {False: [], True: []}
        breakdown = []
        for _ in range(args.repeats):
            for overlap, engine in engines.items():
                start = time.perf_counter()
                engine.logprobs(seqs)
                seconds[overlap].append(time.perf_counter() - start)
                if not overlap:
                    disk = engine.stats.tiers["weights"]["disk"]
                    breakdown.append((disk["io_seconds"], engine.stats.compute_seconds))
        for engine in engines.values():
            engine.close()

    off, on = statistics.median(seconds[False]), statistics.median(seconds[True])
    io, compute = (statistics.median(x) for x in zip(*breakdown))
    blocks = -(-args.sequences // (args.gpu_batch_size * args.num_gpu_batches))
    print(
        f"SmolLM2-135M fp32, weights 100% on disk, {args.sequences} x {args.tokens} tokens in {blocks} blocks, "
        f"median of {args.repeats}"
    )
    print(
        f"without overlap: {off:.2f} s = disk reads {io:.2f} s ({io / off:.0%}) + compute {compute:.2f} s "
        f"({compute / off:.0%}) + other {off - io - compute:.2f} s"
    )
    print(f"with overlap:    {on:.2f} s")
    print(f"speed-up: {off / on:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

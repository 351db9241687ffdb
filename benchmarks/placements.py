"""Generation throughput of one model under several placements, with overlap on and off.

Each placement loads the model once and generates `--new-tokens` tokens for `--prompts`
WikiText-2 windows of `--prompt-tokens` tokens (every sequence generates exactly that many),
`--repeats` times; the median is printed with the engine's own instrumentation: time the
compute thread spent computing and waiting for I/O, and the bytes each tier handed out. On
CUDA the compute figure counts kernel launches and the waits they cause, not kernel time.

    python benchmarks/placements.py --prompts 64 --device cuda
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from flexeval import Engine, Policy
from flexeval.models import registry

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_dir, wikitext_tokens  # noqa: E402

PLACEMENTS = {
    "resident": {},
    "weights in CPU RAM": dict(w_gpu_percent=0, w_cpu_percent=100),
    "weights on disk": dict(w_gpu_percent=0, w_cpu_percent=0),
    "weights 50/30/20": dict(w_gpu_percent=50, w_cpu_percent=30),
    "cache in CPU RAM": dict(cache_gpu_percent=0, cache_cpu_percent=100),
    "cache in CPU RAM, attention there": dict(cache_gpu_percent=0, cache_cpu_percent=100, cpu_cache_compute=True),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=registry.DEFAULT_MODEL)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--gpu-batch-size", type=int, default=32)
    parser.add_argument("--num-gpu-batches", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--placements", nargs="*", default=list(PLACEMENTS), choices=list(PLACEMENTS))
    parser.add_argument("--data-dir", type=Path, default=data_dir())
    args = parser.parse_args()

    header = f"{'placement':<36}{'overlap':>8}{'seconds':>9}{'new tok/s':>11}{'compute s':>11}{'io wait s':>11}"
    header += "  bytes read"
    rows = []
    with tempfile.TemporaryDirectory() as offload:
        for name in args.placements:
            for overlap in (True, False):
                policy = Policy(
                    gpu_batch_size=args.gpu_batch_size,
                    num_gpu_batches=args.num_gpu_batches,
                    overlap=overlap,
                    **PLACEMENTS[name],
                )
                engine = Engine.load(
                    args.model, dtype=args.dtype, device=args.device, policy=policy, offload_dir=offload
                )
                tokens = wikitext_tokens(engine.tokenizer, args.data_dir, args.prompts * args.prompt_tokens)
                ids = list(torch.tensor(tokens).view(args.prompts, args.prompt_tokens))
                runs = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    engine.generate(ids, max_new_tokens=args.new_tokens, stop_token_ids=[])
                    runs.append((time.perf_counter() - start, engine.stats))
                engine.close()
                seconds, stats = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
                moved = ", ".join(
                    f"{cls}/{tier} {figures['bytes_read'] / 1e6:.0f} MB"
                    for cls, tiers in stats.tiers.items()
                    for tier, figures in tiers.items()
                    if figures["bytes_read"]
                )
                rows.append(
                    f"{name:<36}{'on' if overlap else 'off':>8}{seconds:>9.2f}"
                    f"{args.prompts * args.new_tokens / seconds:>11.1f}{stats.compute_seconds:>11.2f}"
                    f"{stats.io_wait_seconds:>11.2f}  {moved or '-'}"
                )
                print(rows[-1], flush=True)
                device = engine.device
    print(
        f"\n{args.model} {args.dtype} on {device}: {args.prompts} prompts x {args.prompt_tokens} tokens, "
        f"{args.new_tokens} new tokens each, blocks of {args.gpu_batch_size} x {args.num_gpu_batches}; "
        f"median of {args.repeats}"
    )
    print(header)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

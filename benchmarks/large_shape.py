"""Generation at 7B shape within a few GB: dummy weights (`dummy:<shape>`), every weight on disk.

The model's shape is real (Llama-2-7B by default: 13.5 GB of bf16 weights), its weights random
(FlexGen's `_DUMMY_`), so throughput and memory are what a real checkpoint of that shape would
give and accuracy means nothing. Prints tokens per second, the bytes read from disk per pass
(one pass streams every weight once), the time that this machine's measured direct-read
bandwidth alone puts on the run, and the process's peak RSS (`ru_maxrss`, what `/usr/bin/time -v`
reports as its maximum resident set size).

    python benchmarks/large_shape.py                                  # 32 prompts x 128 tokens + 16 new
    python benchmarks/large_shape.py --shape qwen2.5-7b --prompts 8
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import generate_from_disk, options  # noqa: E402


def main() -> int:
    parser = options(__doc__, prompts=32, prompt_tokens=128, new_tokens=16, gpu_batch_size=32, num_gpu_batches=1)
    parser.add_argument("--shape", default="llama-2-7b")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    args = parser.parse_args()

    import torch

    from flexeval import Policy
    from flexeval.engine.device import DTYPES
    from flexeval.models import registry
    from flexeval.planning import hardware

    spec = f"dummy:{args.shape}"
    nbytes = registry.build_model(registry.resolve(spec)).nbytes(DTYPES[args.dtype])
    policy = Policy(
        gpu_batch_size=args.gpu_batch_size,
        num_gpu_batches=args.num_gpu_batches,
        w_gpu_percent=0,
        w_cpu_percent=0,
    )
    start = time.perf_counter()
    seconds, _, stats = generate_from_disk(
        policy, args.data_dir, args.prompts, args.prompt_tokens, args.new_tokens, model=spec, dtype=args.dtype
    )
    total = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as probe:
        disk_read = hardware.profile(torch.device("cpu"), Path(probe), registry.cache_root()).disk_read
    read = stats.tiers["weights"]["disk"]["bytes_read"]
    passes = round(read / nbytes)
    tokens = args.prompts * args.new_tokens
    print(f"{spec} in {args.dtype}: {nbytes / 1e9:.2f} GB of weights, all on disk")
    print(f"{args.prompts} prompts x {args.prompt_tokens} tokens + {args.new_tokens} new, batch {args.gpu_batch_size}")
    print(f"load + generate {total:.0f} s, generate {seconds:.0f} s: {tokens / seconds:.2f} new tokens/s")
    print(f"read from disk {read / 1e9:.1f} GB in {passes} passes, {read / passes / 1e9:.2f} GB per pass")
    print(f"disk bound: {read / disk_read:.0f} s at the measured {disk_read / 1e9:.2f} GB/s direct read")
    print(f"compute {stats.compute_seconds:.0f} s, compute waiting for I/O {stats.io_wait_seconds:.0f} s")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

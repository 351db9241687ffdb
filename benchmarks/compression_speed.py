"""Generation with weights on disk, uncompressed against 4-bit weights (issue 6, check 4).

SmolLM2-135M fp32, every weight on disk and read with O_DIRECT (the page cache never serves
it), prompts are windows of WikiText-2 text, every sequence generates exactly `--new-tokens`.
With small blocks each decode step reads the whole model from disk for a few sequences, so the
uncompressed run waits on the disk: the table shows it (the compute thread's wait for I/O and
the disk's read rate). 4-bit weights read 0.30 of the bytes and dequantize them on arrival.
Each run is its own process; configurations alternate, and the medians are compared.

    python benchmarks/compression_speed.py                       # 256 x 128 prompts, 32 new tokens, 3 runs each
    python benchmarks/compression_speed.py --prompts 64 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import generate_from_disk, options  # noqa: E402

CONFIGS = {"none": {}, "4bit-weights": dict(compress_weight=True)}


def run_one(args) -> dict:
    from flexeval import Policy

    fields = CONFIGS[args.config]
    policy = Policy(args.gpu_batch_size, args.num_gpu_batches, w_gpu_percent=0, w_cpu_percent=0, **fields)
    seconds, out, stats = generate_from_disk(policy, args.data_dir, args.prompts, args.prompt_tokens, args.new_tokens)
    disk = stats.tiers["weights"]["disk"]
    return {
        "seconds": seconds,
        "prefill_seconds": stats.prefill_seconds,
        "decode_seconds": stats.decode_seconds,
        "io_wait_seconds": stats.io_wait_seconds,
        "bytes_read": disk["bytes_read"],
        "read_seconds": disk["io_seconds"],
        "tokens": [list(map(int, o)) for o in out],
    }


def main() -> int:
    parser = options(
        __doc__, prompts=256, prompt_tokens=128, new_tokens=32, gpu_batch_size=32, num_gpu_batches=1, repeats=3
    )
    parser.add_argument("--config", choices=CONFIGS, help=argparse.SUPPRESS)  # one run, in this process
    args = parser.parse_args()
    if args.config:
        print(json.dumps(run_one(args)))
        return 0

    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for _ in range(args.repeats):
        for name in CONFIGS:
            command = [sys.executable, __file__, "--config", name]
            command += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("config", "repeats")]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
            print(f"{name}: {runs[name][-1]['seconds']:.1f} s", file=sys.stderr)

    print(
        f"SmolLM2-135M fp32, weights on disk (O_DIRECT), {args.prompts} prompts x {args.prompt_tokens} tokens, "
        f"{args.new_tokens} new; blocks of {args.gpu_batch_size} x {args.num_gpu_batches}; medians of {args.repeats}"
    )
    print(f"{'weights':<14}{'total s':>9}{'prefill s':>11}{'decode s':>10}{'I/O wait s':>12}{'MB read':>10}{'MB/s':>8}")
    medians = {}
    for name, results in runs.items():
        m = {key: statistics.median(r[key] for r in results) for key in results[0] if key != "tokens"}
        medians[name] = m
        rate = m["bytes_read"] / m["read_seconds"] / 1e6 if m["read_seconds"] else 0.0
        print(
            f"{name:<14}{m['seconds']:>9.1f}{m['prefill_seconds']:>11.1f}{m['decode_seconds']:>10.1f}"
            f"{m['io_wait_seconds']:>12.1f}{m['bytes_read'] / 1e6:>10.0f}{rate:>8.0f}"
        )
    none, four = medians["none"], medians["4bit-weights"]
    print(f"uncompressed: the compute thread waited for I/O {none['io_wait_seconds'] / none['seconds']:.0%} of the run")
    print(f"4-bit weights read {four['bytes_read'] / none['bytes_read']:.3f} of the bytes")
    print(f"speed-up of 4-bit weights: {none['seconds'] / four['seconds']:.2f}x (target >= 1.5x)")
    same = sum(a == b for a, b in zip(runs["none"][0]["tokens"], runs["4bit-weights"][0]["tokens"]))
    print(f"sequences generated identically with and without compression: {same} of {args.prompts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

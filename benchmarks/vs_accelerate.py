"""Generation with weights on disk: flexeval against transformers + Accelerate disk offload.

Both systems run SmolLM2-135M in `--dtype` (fp32 by default; flexeval's weights optionally kept
quantized on disk, `--compression 4bit-weights`, and dequantized to that dtype) with every weight
on disk and read it from disk, not from the page cache: flexeval reads with O_DIRECT; for
Accelerate (which memory-maps the checkpoint) the checkpoint's pages are dropped before every
module runs. Prompts are windows of WikiText-2
text, every sequence generates exactly `--new-tokens` tokens. Each configuration runs in its own
process so that its peak RSS is its own; Accelerate is tried at several batch sizes and its
best one under the RSS budget (`--rss-budget-mb`, by default flexeval's own peak) is compared.
Also prints the bound that this machine's measured disk bandwidth and matmul speed put on
flexeval's run.

    python benchmarks/vs_accelerate.py --prompts 256 --prompt-tokens 128 --new-tokens 32
    python benchmarks/vs_accelerate.py --compression 4bit-weights --batch-sizes 256 --rss-budget-mb 3300
    python benchmarks/vs_accelerate.py --dtype bfloat16 --compression 4bit-weights --rss-budget-mb 3300
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dense_checkpoint, generate_from_disk, hf_generate, options, prompt_windows  # noqa: E402


def run_flexeval(args) -> dict:
    from flexeval import Policy
    from flexeval.engine.policy import compression_fields

    placement = dict(
        gpu_batch_size=args.gpu_batch_size, num_gpu_batches=args.num_gpu_batches, w_gpu_percent=0, w_cpu_percent=0
    )
    policy = Policy.from_dict(compression_fields(args.compression) | placement)
    seconds, _, stats = generate_from_disk(
        policy, args.data_dir, args.prompts, args.prompt_tokens, args.new_tokens, dtype=args.dtype
    )
    return {
        "seconds": seconds,
        "bytes_read": stats.tiers["weights"]["disk"]["bytes_read"],
        "compute_seconds": stats.compute_seconds,
        "io_wait_seconds": stats.io_wait_seconds,
    }


def run_accelerate(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flexeval.models import registry

    directory = dense_checkpoint(registry.DEFAULT_MODEL, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    names = ["model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head"]
    device_map = {name: "disk" for name in names} | {f"model.layers.{i}": "disk" for i in range(30)}
    with tempfile.TemporaryDirectory() as offload:
        model = AutoModelForCausalLM.from_pretrained(
            directory, device_map=device_map, offload_folder=offload, dtype=getattr(torch, args.dtype)
        )
        shards = [os.open(path, os.O_RDONLY) for path in directory.glob("*.safetensors")]

        def evict(*_) -> None:  # the next module's weights come from disk, not the page cache
            for fd in shards:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

        for module in [model.model.embed_tokens, *model.model.layers, model.lm_head]:
            module.register_forward_pre_hook(evict)
        ids = prompt_windows(tokenizer, args.data_dir, args.prompts, args.prompt_tokens)
        seconds = hf_generate(model, ids, args.batch_size, args.new_tokens)
        for fd in shards:
            os.close(fd)
    return {"seconds": seconds}


def measure_machine(path: Path, dtype: torch.dtype) -> tuple[float, float]:
    """(disk bytes/s with direct I/O on `path`'s file system, matmul FLOP/s in `dtype`)."""
    size = 256 * 2**20
    with tempfile.NamedTemporaryFile(dir=path) as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())
        fd = os.open(f.name, os.O_RDONLY | os.O_DIRECT)
        raw = torch.empty(size + 4096, dtype=torch.uint8)
        buffer = memoryview(raw[-raw.data_ptr() % 4096 :][:size].numpy())
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        start = time.perf_counter()
        done = 0
        while done < size:
            done += os.preadv(fd, [buffer[done:]], done)
        disk = size / (time.perf_counter() - start)
        os.close(fd)
    a = torch.randn(2048, 2048).to(dtype)
    a @ a
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    flops = 10 * 2 * 2048**3 / (time.perf_counter() - start)
    return disk, flops


def required_flops(args) -> float:
    """The multiply-adds (x2) that generation must do, whoever runs it: SmolLM2-135M's 30 blocks
    for every prompt and fed-back token, attention over the context so far, and the 49,152 x 576
    unembedding only where a next token is chosen (the last prompt position and each new token)."""
    layers, d = 30, 576
    block_params = d * (d + 2 * 192) + d * d + 3 * d * 1536  # q/k/v (3 kv heads of 64), o, gate/up/down
    tokens = args.prompts * (args.prompt_tokens + args.new_tokens - 1)
    context = sum(range(1, args.prompt_tokens + args.new_tokens))  # keys each position attends to, summed
    attention = 2 * 2 * layers * d * context * args.prompts  # q.k and p.v per head, all heads
    unembed = 2 * 49_152 * d * args.prompts * args.new_tokens
    return 2 * layers * block_params * tokens + attention + unembed


def child(args) -> int:
    result = run_flexeval(args) if args.system == "flexeval" else run_accelerate(args)
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result))
    return 0


def spawn(args, system: str, **extra) -> dict:
    cmd = [sys.executable, __file__, "--system", system, *forwarded(args)]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def forwarded(args) -> list[str]:
    return [
        "--prompts", str(args.prompts), "--prompt-tokens", str(args.prompt_tokens),
        "--new-tokens", str(args.new_tokens), "--data-dir", str(args.data_dir),
        "--gpu-batch-size", str(args.gpu_batch_size), "--num-gpu-batches", str(args.num_gpu_batches),
        "--compression", args.compression, "--dtype", args.dtype,
    ]  # fmt: skip


def main() -> int:
    # On the CPU one micro-batch of the whole block is fastest: decoding keeps 256 rows per GEMM,
    # and prefill runs it a few thousand tokens at a time anyway (schedule.CPU_CHUNK_TOKENS).
    parser = options(__doc__, prompts=256, prompt_tokens=128, new_tokens=32, gpu_batch_size=256, num_gpu_batches=1)
    parser.add_argument("--compression", default="none", help="flexeval's preset (conf/compression), e.g. 4bit-weights")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both systems' dtype")
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[8, 32, 64])
    parser.add_argument("--rss-budget-mb", type=int, default=0, help="default: flexeval's own peak RSS")
    parser.add_argument("--system", choices=["flexeval", "accelerate"], help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.system:
        return child(args)

    new = args.prompts * args.new_tokens
    ours = spawn(args, "flexeval")
    budget = args.rss_budget_mb * 10**6 if args.rss_budget_mb else ours["peak_rss"]
    print(
        f"SmolLM2-135M {args.dtype}, weights on disk, {args.prompts} prompts x {args.prompt_tokens} tokens, "
        f"{args.new_tokens} new tokens each; peak-RSS budget for both systems {budget / 1e6:.0f} MB"
    )
    print(f"{'system':<28}{'seconds':>9}{'new tok/s':>11}{'peak RSS MB':>13}")
    print(
        f"{f'flexeval {args.gpu_batch_size}x{args.num_gpu_batches} {args.compression}':<28}"
        f"{ours['seconds']:>9.1f}{new / ours['seconds']:>11.2f}{ours['peak_rss'] / 1e6:>13.0f}"
        f"{'' if ours['peak_rss'] <= budget else '  over budget'}"
    )
    best = None
    for batch_size in args.batch_sizes:
        theirs = spawn(args, "accelerate", batch_size=batch_size)
        fits = theirs["peak_rss"] <= budget
        print(
            f"{'accelerate batch ' + str(batch_size):<28}{theirs['seconds']:>9.1f}"
            f"{new / theirs['seconds']:>11.2f}{theirs['peak_rss'] / 1e6:>13.0f}{'' if fits else '  over budget'}"
        )
        if fits and (best is None or theirs["seconds"] < best[1]["seconds"]):
            best = (batch_size, theirs)
    if best is None:
        print("no Accelerate batch size fits the budget")
    else:
        print(f"flexeval / accelerate (batch {best[0]}): {best[1]['seconds'] / ours['seconds']:.2f}x")

    disk, flops = measure_machine(Path(tempfile.gettempdir()), getattr(torch, args.dtype))
    passes = 1 + (args.new_tokens - 1)  # one prefill pass, then one pass per fed-back token, per block
    blocks = -(-args.prompts // (args.gpu_batch_size * args.num_gpu_batches))
    read = ours["bytes_read"]
    work = required_flops(args)
    io_bound, compute_bound = read / disk, work / flops
    bound = max(io_bound, compute_bound)
    print(
        f"bound: {blocks} block(s) x {passes} passes read {read / 1e9:.2f} GB at {disk / 1e9:.2f} GB/s = "
        f"{io_bound:.1f} s; {work / 1e12:.2f} TFLOP (transformer blocks for every token, attention over "
        f"the context, vocabulary logits only where a token is chosen) at {flops / 1e9:.0f} GFLOP/s "
        f"(2048^3 {args.dtype} matmul) = {compute_bound:.1f} s; overlapped bound max = {bound:.1f} s"
    )
    print(
        f"flexeval reaches {bound / ours['seconds']:.0%} of the bound "
        f"(compute {ours['compute_seconds']:.1f} s, waiting for I/O {ours['io_wait_seconds']:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Generation where offloading matters: flexeval against transformers + Accelerate disk offload,
each in its own process under the same cgroup memory limit (page cache included).

Accelerate's disk offload reads memory-mapped files, so without a limit the page cache of a large
machine quietly holds the model after the first pass and "disk" becomes RAM; under a cgroup limit
both systems have only what a machine of that size would have. Every run starts with the page
cache dropped, in a fresh cgroup, and prints its seconds, new tokens/s, the cgroup's peak (RSS
and page cache), the process's peak RSS, the bytes it read from the block device per weight
pass, and the run's bound:

    bound = sum over the weight passes the workload needs at the system's batch size of
            max(the seconds the pass's matrix products take on this machine in the dtype,
                the weight bytes the pass reads / the measured direct-read bandwidth
                with one or several reads in flight, whichever is faster)

A block of B prompts needs one prefill pass (B x prompt tokens rows) and one pass per further new
token (B rows); a pass must read the weights (in the system's format) that the limit, less the
interpreter's footprint and a tenth for slack, cannot hold. Attention, norms, activations and
sampling are left out of the bound: 17 % of Qwen2.5-1.5B's resident bf16 prefill at 16 x 128
tokens (SiLU 6 %, attention 4 %; the GEMMs ran at 778 GFLOP/s), so a prefill-heavy run cannot
reach its bound. The disk rate is the sustained one (see `measure_machine`); the products are
timed in this script at the pass's own shapes and rows (see `Products`).
Accelerate reads a safetensors checkpoint in the run's dtype, written once into the flexeval cache
(a GGUF's weights dequantized, a dummy model's generated); flexeval reads its own sources (the
GGUF file, generated dummy weights) into its offload files, kept as shipped with
`--compression native`. Loading is timed apart; the figures are generation's.

    python benchmarks/at_scale.py --workload 7b        # Llama-2-7B shape, bf16, 4 GB, 8 x 64 + 32 new
    python benchmarks/at_scale.py --workload 1.5b      # Qwen2.5-Coder-1.5B, bf16, 1.5 GB, 32 x 128 + 16
    python benchmarks/at_scale.py --workload 135m      # SmolLM2-135M, fp32, 3.3 GB, 256 x 128 + 32
    python benchmarks/at_scale.py --workload 1.5b --compressions none native --accelerate-batches 8 32 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_dir, dense_checkpoint, hf_generate, prompt_windows, run_limited, spawn_measured  # noqa: E402

WORKLOADS = {
    "7b": dict(model="dummy:llama-2-7b", dtype="bfloat16", limit_gb=4.0, prompts=8, prompt_tokens=64, new_tokens=32),
    "1.5b": dict(
        model="qwen2.5-coder-1.5b", dtype="bfloat16", limit_gb=1.5, prompts=32, prompt_tokens=128, new_tokens=16
    ),
    "135m": dict(model="smollm2-135m", dtype="float32", limit_gb=3.3, prompts=256, prompt_tokens=128, new_tokens=32),
}


def device_read_bytes() -> int:
    """Bytes this process has had read from the block device (direct reads and page faults alike)."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["read_bytes"])


def run_flexeval(args) -> dict:
    from flexeval import Engine, Policy
    from flexeval.engine.placement import weight_bytes_per_tier

    policy = Policy.from_dict(json.loads(args.policy))
    with tempfile.TemporaryDirectory(dir=args.offload_dir) as offload:
        start = time.perf_counter()
        engine = Engine.load(args.model, dtype=args.dtype, policy=policy, offload_dir=offload)
        load = time.perf_counter() - start
        ids = prompt_windows(engine.tokenizer, args.data_dir, args.prompts, args.prompt_tokens)
        read = device_read_bytes()
        start = time.perf_counter()
        out = engine.generate(list(ids), max_new_tokens=args.new_tokens, stop_token_ids=[])
        seconds = time.perf_counter() - start
        read = device_read_bytes() - read
        engine.close()
    assert all(len(o) == args.new_tokens for o in out)
    stats = engine.stats
    return {
        "seconds": seconds,
        "load_seconds": load,
        "prefill_seconds": stats.prefill_seconds,
        "decode_seconds": stats.decode_seconds,
        "io_wait_seconds": stats.io_wait_seconds,
        "device_read": read,
        "weight_bytes": sum(weight_bytes_per_tier(engine.model.layers, policy, engine.dtype)),
    }


def run_accelerate(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = dense_checkpoint(args.model, args.dtype)  # written by the parent, outside the limit
    tokenizer = AutoTokenizer.from_pretrained(directory)
    with tempfile.TemporaryDirectory(dir=args.offload_dir) as offload:
        start = time.perf_counter()
        placement = (
            dict(device_map="auto", max_memory={"cpu": int(args.accelerate_cpu_gb * 2**30)})
            if args.accelerate_cpu_gb
            else dict(device_map=disk_map(directory))
        )
        model = AutoModelForCausalLM.from_pretrained(
            directory, offload_folder=offload, dtype=getattr(torch, args.dtype), **placement
        )
        load = time.perf_counter() - start
        ids = prompt_windows(tokenizer, args.data_dir, args.prompts, args.prompt_tokens)
        read = device_read_bytes()
        seconds = hf_generate(model, ids, args.batch_size, args.new_tokens)
        read = device_read_bytes() - read
    return {"seconds": seconds, "load_seconds": load, "device_read": read, "weight_bytes": weight_bytes(directory)}


def disk_map(directory: Path) -> dict[str, str]:
    """Accelerate's device map with every module of the model on "disk" (`--accelerate-cpu-gb 0`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))
    inner = model.model
    names = [f"model.{name}" for name, _ in inner.named_children() if name != "layers"]
    names += [f"model.layers.{i}" for i in range(len(inner.layers))]
    return dict.fromkeys([*names, "lm_head"], "disk")


def weight_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


@dataclass(frozen=True)
class Machine:
    disk: float  # bytes/s, direct reads, the better of one and several in flight
    disk_one: float


def measure_machine(directory: Path, in_flight: int = 4, rounds: int = 3) -> Machine:
    """The disk's sustained direct-read rate: a run reads tens of GB, and this project's virtual
    disks serve a first gigabyte at up to twice the rate they keep up (one 1 GiB read: 2.9-3.7 GB/s,
    the next ones 1.3-1.9 GB/s), so each rate is the median over `rounds` reads of the whole file."""
    size, chunk = 1 << 30, 64 << 20
    with tempfile.NamedTemporaryFile(dir=directory) as f:
        for _ in range(size // chunk):
            f.write(os.urandom(chunk))
        f.flush()
        os.fsync(f.fileno())
        rates = [
            statistics.median(direct_read_rate(Path(f.name), size, chunk, n) for _ in range(rounds))
            for n in (1, in_flight)
        ]
    return Machine(max(rates), rates[0])


class Products:
    """Seconds one weight pass's matrix products take on this machine: every distinct weight shape
    of the model's blocks timed (torch's benchmark timer) at the pass's rows, counted over the
    blocks that hold it, and the head at one row a sequence. Timed here rather than read from
    flexeval's cached hardware profile, whose square products of one width stand for every shape
    and which an earlier session may have measured on a faster or slower CPU of the same name."""

    def __init__(self, model_spec: str, dtype: str) -> None:
        from collections import Counter

        import torch

        from flexeval.models import registry

        model = registry.build_model(registry.resolve(model_spec))
        self.dtype = getattr(torch, dtype)
        self.shapes = Counter(
            tuple(p.shape) for layer in model.layers if layer.kind in ("attention", "mlp")
            for p in layer.params.values() if len(p.shape) == 2
        )  # fmt: skip
        hidden = next(p.shape[1] for p in model.layers[-1].params.values() if len(p.shape) == 2)
        self.head = (model.vocab_size, hidden)
        self.times: dict[tuple[int, tuple[int, int]], float] = {}

    def seconds(self, rows: int, sequences: int) -> float:
        blocks = sum(count * self.time(rows, shape) for shape, count in self.shapes.items())
        return blocks + self.time(sequences, self.head)

    def time(self, rows: int, shape: tuple[int, int]) -> float:
        """The product of `rows` rows whole or in parts, whichever is fastest: a system may split a
        pass's rows, and a BLAS's rate moves with the row count (by up to half, either way, from
        one count to the next on these virtual machines)."""
        parts = {rows, *(part for part in (256, 1024, 4096) if part < rows)}
        return min(self.timed(part, shape) * rows / part for part in parts)

    def timed(self, rows: int, shape: tuple[int, int]) -> float:
        if (rows, shape) not in self.times:
            import torch
            from torch.utils import benchmark

            x, w = torch.randn(rows, shape[1]).to(self.dtype), torch.randn(shape).to(self.dtype)
            timer = benchmark.Timer(
                "torch.nn.functional.linear(x, w)",
                globals={"x": x, "w": w, "torch": torch},
                num_threads=torch.get_num_threads(),  # the timer's default is one
            )
            self.times[rows, shape] = timer.blocked_autorange(min_run_time=0.3).median
        return self.times[rows, shape]


def direct_read_rate(path: Path, size: int, chunk: int, threads: int) -> float:
    import torch

    os.posix_fadvise(os.open(path, os.O_RDONLY), 0, 0, os.POSIX_FADV_DONTNEED)
    offsets = list(range(0, size, chunk))
    lock = threading.Lock()

    def reader() -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        raw = torch.empty(chunk + 4096, dtype=torch.uint8)
        view = memoryview(raw[-raw.data_ptr() % 4096 :][:chunk].numpy())
        while True:
            with lock:
                if not offsets:
                    break
                offset = offsets.pop()
            done = 0
            while done < chunk:
                done += os.preadv(fd, [view[done:]], offset + done)
        os.close(fd)

    workers = [threading.Thread(target=reader) for _ in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return size / (time.perf_counter() - start)


def bound_seconds(args, batch: int, pass_bytes: float, machine: Machine, products: Products) -> float:
    read = pass_bytes / machine.disk
    total = 0.0
    for first in range(0, args.prompts, batch):
        rows = min(batch, args.prompts - first)
        total += max(products.seconds(rows * args.prompt_tokens, rows), read)
        total += (args.new_tokens - 1) * max(products.seconds(rows, rows), read)
    return total


def child(args) -> int:
    result = run_flexeval(args) if args.system == "flexeval" else run_accelerate(args)
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result))
    return 0


def flexeval_policy(args, compression: str, footprint: int) -> tuple[dict, str]:
    """The policy flexeval runs under (fields, and a summary): with `--flexeval-policy auto`, what
    `policy=auto` chooses for the workload within the limit less the interpreter's own footprint
    and a tenth of the limit (page cache, allocator slack); with `disk`, every weight on disk and
    all prompts in one block. Planned here, outside the limit: the first plan profiles the
    model's layers."""
    from dataclasses import asdict

    from flexeval.engine.policy import Policy, compression_fields
    from flexeval.planning.cost_model import Workload
    from flexeval.planning.search import Budget, plan

    base = Policy.from_dict(compression_fields(compression))
    if args.flexeval_policy == "disk":
        batch = args.flexeval_batch or args.prompts
        on_disk = dict(gpu_batch_size=batch, w_gpu_percent=0, w_cpu_percent=0, bound_heap=True)
        policy = Policy.from_dict(asdict(base) | on_disk)
        return asdict(policy), f"weights on disk, batch {policy.gpu_batch_size}"
    budget = args.flexeval_budget_gb or (args.limit_gb * 2**30 * 0.9 - footprint) / 1e9
    if budget <= 0:
        raise SystemExit(f"the limit leaves nothing beside the interpreter's footprint ({footprint / 2**30:.2f} GiB)")
    workload = Workload(args.prompts, args.prompt_tokens, args.new_tokens)
    choice = plan(args.model, workload, Budget.from_gb(budget / 2, budget / 2, None), base=base, dtype=args.dtype)
    return asdict(choice.policy), f"policy=auto within {budget:.2f} GB: {choice.summary()}"


def footprint_bytes(args) -> int:
    """Peak RSS of an interpreter that has imported what the runs import, and nothing else."""
    code = "import resource, flexeval, torch, transformers; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    done = run_limited([sys.executable, "-c", code], int(args.limit_gb * 2**30))
    return int(done.stdout.split()[-1]) * 1024


def spawn(args, system: str, batch_size: int, compression: str = "none", policy: dict | None = None) -> dict:
    cmd = [
        sys.executable, __file__, "--system", system, "--model", args.model, "--dtype", args.dtype,
        "--prompts", str(args.prompts), "--prompt-tokens", str(args.prompt_tokens),
        "--new-tokens", str(args.new_tokens), "--data-dir", str(args.data_dir), "--offload-dir", str(args.offload_dir),
        "--batch-size", str(batch_size), "--policy", json.dumps(policy or {}),
        "--accelerate-cpu-gb", str(args.accelerate_cpu_gb),
    ]  # fmt: skip
    return spawn_measured(cmd, int(args.limit_gb * 2**30), args.timeout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=WORKLOADS, default="1.5b", help="model, dtype, limit and shape")
    for name in ("model", "dtype"):
        parser.add_argument(f"--{name}")
    parser.add_argument("--limit-gb", type=float, help="the memory cgroup's limit, GiB")
    for name in ("prompts", "prompt-tokens", "new-tokens"):
        parser.add_argument(f"--{name}", type=int)
    parser.add_argument("--compressions", nargs="*", default=["none", "native"], help="flexeval's presets to run")
    parser.add_argument("--flexeval-policy", choices=["auto", "disk"], default="auto")
    parser.add_argument(
        "--flexeval-budget-gb", type=float, help="policy=auto's budget (default: the limit less footprint and a tenth)"
    )
    parser.add_argument("--flexeval-batch", type=int, default=0, help="with --flexeval-policy disk (default: all)")
    parser.add_argument("--accelerate-batches", type=int, nargs="*", default=[8, 32])
    parser.add_argument(
        "--accelerate-cpu-gb",
        type=float,
        help="Accelerate's max_memory for CPU RAM (device_map=auto; the rest on disk); 0: every module on disk; "
        "default: 40%% of the limit (under a limit, all-on-disk thrashes: its memory-mapped reads are evicted "
        "before use, 1.5B at 1.5 GB read 14x the weights a pass)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs of every configuration; medians")
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds a run may take; one that does not finish gives a bound"
    )
    parser.add_argument("--data-dir", type=Path, default=data_dir())
    parser.add_argument("--offload-dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--system", choices=["flexeval", "accelerate"], help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--policy", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name, value in WORKLOADS[args.workload].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.accelerate_cpu_gb is None:
        args.accelerate_cpu_gb = round(0.4 * args.limit_gb, 2)
    if args.system:
        return child(args)

    from flexeval.models import registry

    registry.resolve(args.model)  # prepared, and the peer's checkpoint written, before any timing
    if args.accelerate_batches:
        dense_checkpoint(args.model, args.dtype)
    machine = measure_machine(args.offload_dir)
    products = Products(args.model, args.dtype)
    footprint = footprint_bytes(args)
    policies = {c: flexeval_policy(args, c, footprint) for c in args.compressions}
    runs = [("flexeval", policies[c][0]["gpu_batch_size"] * policies[c][0]["num_gpu_batches"], c) for c in policies]
    runs += [("accelerate", b, "none") for b in args.accelerate_batches]
    results: dict[tuple, list[dict]] = {run: [] for run in runs}
    for repeat in range(args.repeats):
        for run in runs:
            results[run].append(spawn(args, *run, policy=policies[run[2]][0] if run[0] == "flexeval" else None))
            print(f"run {repeat + 1} {run}: {json.dumps(results[run][-1])}", flush=True)  # nothing lost to a kill

    new = args.prompts * args.new_tokens
    print(
        f"{args.model} in {args.dtype}; {args.prompts} prompts x {args.prompt_tokens} tokens "
        f"+ {args.new_tokens} new; memory cgroup limit {args.limit_gb:g} GiB; medians of {args.repeats}"
    )
    print(
        f"direct reads (sustained) {machine.disk_one / 1e9:.2f} GB/s with one in flight, "
        f"{machine.disk / 1e9:.2f} GB/s at best; "
        f"interpreter footprint {footprint / 2**30:.2f} GiB"
    )
    for compression, (_, summary) in policies.items():
        print(f"flexeval {compression}: {summary}")
    header = ("system", "seconds", "tok/s", "cgroup GiB", "RSS GiB", "GB/pass", "bound s", "of bound", "load s")
    print("".join(f"{h:>12}" if i else f"{h:<28}" for i, h in enumerate(header)))
    best: dict[str, float] = {}
    at_least: dict[str, float] = {}  # peers that did not finish: the seconds they took at least
    for (system, batch, compression), rows in results.items():
        label = f"{system} b{batch}" + (f" {compression}" if system == "flexeval" else "")
        done = [r for r in rows if "failed" not in r]
        if all("timed_out" in r for r in rows):
            at_least[label] = args.timeout
            print(f"{label:<28}{f'> {args.timeout:g}':>12}{f'< {new / args.timeout:.2f}':>12}  (did not finish)")
            continue
        if len(done) < len(rows):
            print(f"{label:<28}failed: {rows[0].get('failed', rows[-1].get('failed'))}")
            continue
        seconds = statistics.median(r["seconds"] for r in done)
        passes = -(-args.prompts // batch) * args.new_tokens
        per_pass = statistics.median(r["device_read"] for r in done) / passes
        must_read = max(0.0, done[0]["weight_bytes"] - (args.limit_gb * 2**30 * 0.9 - footprint))
        bound = bound_seconds(args, batch, must_read, machine, products)
        figures = (
            f"{seconds:.1f}", f"{new / seconds:.2f}", f"{max(r['peak_cgroup'] for r in done) / 2**30:.2f}",
            f"{max(r['peak_rss'] for r in done) / 2**30:.2f}", f"{per_pass / 1e9:.2f}", f"{bound:.1f}",
            f"{bound / seconds:.0%}", f"{statistics.median(r['load_seconds'] for r in done):.0f}",
        )  # fmt: skip
        print(f"{label:<28}" + "".join(f"{f:>12}" for f in figures))
        if system == "flexeval":
            details = {k: statistics.median(r[k] for r in done) for k in ("prefill_seconds", "decode_seconds")}
            wait = statistics.median(r["io_wait_seconds"] for r in done)
            print(f"{'':<28}prefill {details['prefill_seconds']:.1f} s, decode {details['decode_seconds']:.1f} s, "
                  f"waiting for I/O {wait:.1f} s")  # fmt: skip
        best[label] = seconds
    theirs = {k: v for k, v in (best | at_least).items() if k.startswith("accelerate")}
    if theirs:
        peer = min(theirs, key=theirs.get)
        bound = ">= " if peer in at_least else ""
        for label, seconds in best.items():
            if label.startswith("flexeval"):
                print(f"{label} / {peer}: {bound}{theirs[peer] / seconds:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

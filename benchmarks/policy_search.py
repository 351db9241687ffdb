"""`policy=auto` against hand-chosen policies under one memory budget (issue 7, checks 2 and 4).

SmolLM2-135M in fp32 with a RAM budget of `--share` (default 50 %) of its fp32 weight bytes,
split evenly between the compute and CPU tiers (both RAM on this machine), the disk unlimited.
The search chooses a policy (its time is printed: check 4); then it and every hand-chosen policy
that fits the same budgets — by the cost model's predicted peaks, the very test the search
applies — generate `--new-tokens` tokens for `--prompts` WikiText-2 windows of
`--prompt-tokens`, `--repeats` times; medians are printed, and the auto policy's throughput
against the best hand policy's (check 2: at least 90 %). The search's own time is printed for
this budget and for the default workload of `policy=auto` (check 4: well under five seconds).

    python benchmarks/policy_search.py
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
from flexeval.planning.cost_model import Workload
from flexeval.planning.search import GB, Budget, cost_model, search

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import options, prompt_windows  # noqa: E402

# (gpu_batch_size, num_gpu_batches, weights % in the CPU tier (the rest on disk), KV cache tier,
# streamed unembedding): a person's guesses at this budget, where working memory leaves the
# compute tier no room for weights and an unembedding read whole would need 114 MB of staging.
HAND = [
    (16, 1, 5, "cpu", True),
    (16, 1, 0, "cpu", True),
    (16, 1, 10, "disk", True),
    (8, 4, 15, "disk", True),
    (8, 4, 0, "disk", True),
    (8, 2, 10, "disk", True),
    (8, 2, 5, "cpu", True),
    (8, 1, 10, "gpu", True),
    (8, 1, 15, "cpu", True),
    (4, 8, 10, "disk", True),
    (4, 4, 5, "cpu", True),
    (4, 2, 15, "gpu", True),
    (4, 1, 10, "cpu", True),
    (2, 8, 15, "disk", True),
    (2, 4, 10, "cpu", True),
]
CACHE = {"gpu": (100, 0), "cpu": (0, 100), "disk": (0, 0)}


def hand_policy(b: int, k: int, w_cpu: float, cache: str, stream: bool) -> Policy:
    gpu, cpu = CACHE[cache]
    return Policy(
        gpu_batch_size=b,
        num_gpu_batches=k,
        w_gpu_percent=0,
        w_cpu_percent=w_cpu,
        cache_gpu_percent=gpu,
        cache_cpu_percent=cpu,
        stream_unembedding=stream,
    )


def name(b: int, k: int, w_cpu: float, cache: str, stream: bool) -> str:
    return f"b{b}x{k} w cpu {w_cpu}% cache {cache}" + " stream" * stream


def default_search_seconds(directory: Path, offload: str, repeats: int = 3) -> float:
    """Median seconds of the search for `policy=auto`'s default workload (1,000 prompts of 512
    tokens + 32 new) within 0.25 GB of each RAM tier: the search's time, kept out of the tests."""
    costs = cost_model(directory, Workload(1000, 512, 32), dtype="float32", offload_dir=offload)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        search(costs, Policy(), Budget(compute=0.25 * GB, cpu=0.25 * GB))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = options(__doc__, prompts=32, prompt_tokens=128, new_tokens=8, repeats=2)
    parser.add_argument("--share", type=float, default=0.5, help="RAM budget as a share of the fp32 weight bytes")
    args = parser.parse_args()

    directory = registry.resolve(registry.DEFAULT_MODEL)
    workload = Workload(args.prompts, args.prompt_tokens, args.new_tokens, uniform=True)
    with tempfile.TemporaryDirectory() as offload:
        costs = cost_model(
            directory, workload, dtype="float32", offload_dir=offload
        )  # profile measured here if not cached
        weights = costs.model.nbytes(torch.float32)
        budget = Budget(compute=args.share * weights / 2, cpu=args.share * weights / 2)
        start = time.perf_counter()
        auto = search(costs, Policy(), budget)
        searched = time.perf_counter() - start
        print(f"budget: {budget.describe()} ({args.share:.0%} of {weights / 1e6:.0f} MB of fp32 weights)")
        print(f"search: {searched:.2f} s; chose {auto.summary()}")
        print(f"search for the default workload: {default_search_seconds(directory, offload):.2f} s (target: < 5 s)\n")

        candidates = [("auto", auto.policy)]
        for fields in HAND:
            policy = hand_policy(*fields)
            peaks = costs.predict(policy).peak_bytes
            if peaks["compute"] <= budget.compute and peaks["cpu"] <= budget.cpu:
                candidates.append((name(*fields), policy))
            else:
                print(f"skipped {name(*fields)}: predicted peaks exceed the budget")
        print(f"\n{'policy':<36}{'predicted tok/s':>16}{'measured tok/s':>16}")
        measured = {}
        for label, policy in candidates:
            engine = Engine.load(directory, dtype="float32", policy=policy, offload_dir=offload)
            ids = list(prompt_windows(engine.tokenizer, args.data_dir, args.prompts, args.prompt_tokens))
            runs = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                engine.generate(ids, max_new_tokens=args.new_tokens, stop_token_ids=[])
                runs.append(workload.tokens / (time.perf_counter() - start))
            engine.close()
            measured[label] = statistics.median(runs)
            print(f"{label:<36}{costs.predict(policy).tokens_per_second:>16.1f}{measured[label]:>16.1f}", flush=True)
    hand = {label: rate for label, rate in measured.items() if label != "auto"}
    best = max(hand, key=hand.get)
    print(
        f"\n{len(hand)} feasible hand policies; best {best} at {hand[best]:.1f} tok/s; "
        f"auto {measured['auto']:.1f} tok/s = {measured['auto'] / hand[best]:.1%} of it; search {searched:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What padding small matrix products costs (issue 19, check 2).

On a machine whose BLAS rounds products of few rows differently (MKL on AMD EPYC: 1-3 rows),
the engine pads them with zero rows to the probed minimum (`flexeval.reproducible`). This
script measures SmolLM2-135M in fp32, resident, with that padding and without it (the same
engine, `gemm_rows` set to 1), runs alternating, medians of `--repeats`:

- `logprobs` of `--sequences` WikiText-2 windows of `--tokens` tokens, at batch 1 and 32;
- `generate` of `--new-tokens` tokens after such windows, at batch 1 (every decoding product
  has one row: the case padding touches) and 32;
- each of the model's product shapes with one row, alone and padded (the GEMV against a small GEMM).

Targets: at most 2 % slower at batch >= 4, at most 10 % slower decoding at batch 1.

    python benchmarks/row_padding.py
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from flexeval import Engine, Policy
from flexeval.engine.engine import product_shapes
from flexeval.models import registry
from flexeval.models.common import linear

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import options, prompt_windows  # noqa: E402


def paired(run: Callable[[], object], engine: Engine, rows: int, repeats: int) -> tuple[float, float]:
    """Median seconds of `run` with the padding and without it, alternating after a warm-up of each."""
    times: dict[int, list[float]] = {rows: [], 1: []}
    for i in range(2 * repeats + 2):
        engine.gemm_rows = rows if i % 2 == 0 else 1
        start = time.perf_counter()
        run()
        if i >= 2:
            times[engine.gemm_rows].append(time.perf_counter() - start)
    engine.gemm_rows = rows
    return statistics.median(times[rows]), statistics.median(times[1])


def microseconds(fn: Callable[[], object], calls: int = 20) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def products(engine: Engine, rows: int, repeats: int) -> None:
    """One row through each product shape: alone, and padded to `rows`."""
    print(f"\n{'shape (in -> out)':<22}{'1 row, us':>12}{f'padded to {rows}, us':>20}{'ratio':>8}")
    for k, n in sorted(product_shapes(engine.model, engine.plan)):
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(1, k, generator=g), torch.randn(n, k, generator=g)
        alone, padded = [], []
        for _ in range(repeats):
            alone.append(microseconds(lambda x=x, w=w: F.linear(x, w)))
            padded.append(microseconds(lambda x=x, w=w: linear(x, w, None, rows)))
        a, p = statistics.median(alone), statistics.median(padded)
        print(f"{f'{k} -> {n}':<22}{a:>12.1f}{p:>20.1f}{p / a:>8.3f}")


def main() -> int:
    parser = options(__doc__, sequences=32, tokens=64, new_tokens=16, repeats=5)
    args = parser.parse_args()

    engines = {
        b: Engine.load(registry.DEFAULT_MODEL, dtype="float32", policy=Policy(gpu_batch_size=b)) for b in (1, 32)
    }
    rows = engines[1].gemm_rows
    print(f"probed minimum rows of a product on this machine: {rows}")
    if rows == 1:
        print("this machine's products need no padding: nothing to measure but the shapes below")
    windows = list(prompt_windows(engines[1].tokenizer, args.data_dir, args.sequences, args.tokens))
    prompts = {1: windows[:2], 32: windows}  # batch-1 decoding: two sequences, each its own micro-batch
    print(f"\n{'what':<28}{'padded s':>10}{'unpadded s':>12}{'slower':>9}")
    for batch, engine in engines.items():
        cases = {
            "logprobs": lambda engine=engine: engine.logprobs(windows),
            "generate": lambda engine=engine, batch=batch: engine.generate(
                prompts[batch], max_new_tokens=args.new_tokens, stop_token_ids=[]
            ),
        }
        for what, run in cases.items():
            padded, unpadded = paired(run, engine, rows, args.repeats)
            print(f"{f'{what}, batch {batch}':<28}{padded:>10.3f}{unpadded:>12.3f}{padded / unpadded - 1:>9.1%}")
    products(engines[1], max(rows, 4), 3 * args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m flexeval`: load a model, score and generate a handful of prompts, report tokens/s.

This is the smoke-test form of the main job; the Hydra evaluation app replaces it once the
lm-eval backend exists.
"""

from __future__ import annotations

import argparse
import sys
import time

from flexeval import Engine, FlexevalError
from flexeval.models.registry import DEFAULT_MODEL

PROMPTS = (
    "The capital of France is",
    "Water boils at a temperature of",
    "The three primary colors are",
    "In 1492, Christopher Columbus",
    "def fibonacci(n):",
    "The largest planet in the solar system is",
    "Photosynthesis is the process by which",
    "A haiku about the sea:",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flexeval", description=__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model spec: a registered name, a directory or a hub id")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (CUDA only)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except FlexevalError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    engine = Engine.load(args.model, dtype=args.dtype, device=args.device)
    loaded = time.perf_counter() - start
    print(f"loaded {args.model} ({engine.model.family}, {engine.dtype}, {engine.device}) in {loaded:.1f} s")
    prompts = [engine.tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]

    start = time.perf_counter()
    logprobs = engine.logprobs(prompts)
    scored = time.perf_counter() - start
    tokens = sum(len(p) for p in prompts)
    print(f"scored {len(prompts)} prompts, {tokens} tokens: {tokens / scored:.0f} tokens/s")

    start = time.perf_counter()
    outputs = engine.generate(prompts, max_new_tokens=args.max_new_tokens)
    generated = time.perf_counter() - start
    new = sum(len(o) for o in outputs)
    print(f"generated {new} tokens for {len(prompts)} prompts: {new / generated:.1f} tokens/s (prefill included)\n")
    for text, lp, out in zip(PROMPTS, logprobs, outputs):
        completion = engine.tokenizer.decode(out, skip_special_tokens=True).replace("\n", " ")
        print(f"  [{lp.sum():7.2f}] {text!r} -> {completion!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

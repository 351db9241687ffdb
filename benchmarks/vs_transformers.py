"""Everything resident: flexeval's generation against transformers' own `generate`, same batch.

SmolLM2-135M, greedy, `--prompts` windows of WikiText-2 text of `--prompt-tokens` tokens, each
generating exactly `--new-tokens` tokens, one batch of all prompts in both systems. Prints the
median over `--repeats` alternating runs in this process and the ratio.

    python benchmarks/vs_transformers.py --prompts 32 --prompt-tokens 128 --new-tokens 32
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

from flexeval import Engine, Policy
from flexeval.models import registry

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import options, wikitext_tokens  # noqa: E402


def main() -> int:
    parser = options(__doc__, prompts=32, prompt_tokens=128, new_tokens=32, repeats=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args()

    policy = Policy(gpu_batch_size=args.prompts)
    engine = Engine.load(registry.DEFAULT_MODEL, dtype=args.dtype, policy=policy, device=args.device)
    device = engine.device
    tokens = wikitext_tokens(engine.tokenizer, args.data_dir, args.prompts * args.prompt_tokens)
    ids = torch.tensor(tokens).view(args.prompts, args.prompt_tokens)
    directory = registry.resolve(registry.DEFAULT_MODEL)
    model = registry.hf_model(directory, getattr(torch, args.dtype)).to(device)

    def ours() -> float:
        start = time.perf_counter()
        engine.generate(list(ids), max_new_tokens=args.new_tokens, stop_token_ids=[])
        return time.perf_counter() - start

    @torch.inference_mode()
    def theirs() -> float:
        start = time.perf_counter()
        model.generate(
            ids.to(device),
            attention_mask=torch.ones_like(ids, device=device),
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            pad_token_id=engine.tokenizer.pad_token_id or 0,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"flexeval": [], "transformers": []}
    for _ in range(args.repeats):
        times["flexeval"].append(ours())
        times["transformers"].append(theirs())
    new = args.prompts * args.new_tokens
    print(
        f"SmolLM2-135M {args.dtype} on {device}, everything resident, batch {args.prompts}: "
        f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens each; "
        f"median of {args.repeats} alternating runs"
    )
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, seconds in median.items():
        print(f"{name:<14}{seconds:>8.2f} s{new / seconds:>10.1f} new tok/s")
    print(f"flexeval / transformers throughput: {median['transformers'] / median['flexeval']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

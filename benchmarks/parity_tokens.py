"""Per-token parity with transformers on one model: log-probabilities and greedy generations.

transformers reads the same checkpoint (for a GGUF model, the same file, through its own GGUF
loader) and scores sequences of WikiText-2 text of several lengths, then continues prompts
greedily; flexeval does the same under a policy. Prints the largest log-probability difference
per sequence and whether every generation is identical. transformers runs first and is freed
before flexeval loads, so that the two never hold the model at once.

    python benchmarks/parity_tokens.py --model qwen2.5-coder-1.5b
    python benchmarks/parity_tokens.py --model qwen2.5-coder-0.5b --policy disk-offload
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

from flexeval import Engine, Policy
from flexeval.engine.policy import PRESETS
from flexeval.models import registry

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_dir, wikitext_tokens  # noqa: E402

LENGTHS = (32, 61, 96, 128, 160, 193, 224, 256)


@torch.inference_mode()
def reference(directory: Path, sequences: list[list[int]], new_tokens: int, eos: int | None):
    model = registry.hf_model(directory)
    logprobs, generated = [], []
    for seq in sequences:
        ids = torch.tensor([seq])
        logits = model(ids).logits[0, :-1].float()
        logprobs.append(logits.log_softmax(-1).gather(1, ids[0, 1:, None]).squeeze(1))
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
        new = out[0, len(seq) :].tolist()
        generated.append(new[: new.index(eos) + 1] if eos in new else new)
    return logprobs, generated


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=registry.DEFAULT_MODEL)
    parser.add_argument("--policy", default="all-resident", choices=sorted(PRESETS))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--data-dir", type=Path, default=data_dir())
    args = parser.parse_args()

    directory = registry.resolve(args.model)
    tokenizer = registry.load_tokenizer(directory)
    text = wikitext_tokens(tokenizer, args.data_dir, sum(LENGTHS))
    bounds = torch.tensor((0, *LENGTHS)).cumsum(0).tolist()
    sequences = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    theirs, their_text = reference(directory, sequences, args.new_tokens, tokenizer.eos_token_id)
    gc.collect()

    engine = Engine.load(args.model, policy=Policy.from_dict({}, args.policy), dtype="float32")
    ours = engine.logprobs(sequences)
    our_text = engine.generate(sequences, max_new_tokens=args.new_tokens)
    worst = [float((a - b).abs().max()) for a, b in zip(ours, theirs)]
    same = [a == b for a, b in zip(our_text, their_text)]
    print(f"{args.model} fp32, flexeval ({args.policy}) against transformers")
    print(f"{'tokens':>7}{'max |logprob diff|':>20}{'greedy ' + str(args.new_tokens) + ' identical':>22}")
    for seq, diff, equal in zip(sequences, worst, same):
        print(f"{len(seq):>7}{diff:>20.2e}{str(equal):>22}")
    ok = max(worst) <= args.tolerance and all(same)
    print(f"every log-prob within {args.tolerance:g} and every generation identical: {'OK' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

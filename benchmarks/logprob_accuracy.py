"""How exact are log-probabilities? torch's fp32 log_softmax (what lm-eval's `hf` backend and
flexeval's default readout compute) and flexeval's streamed readout (`stream_unembedding`)
against an fp64 reference, on the same SmolLM2 logits of LAMBADA texts.

The streamed readout reduces vocabulary slices with an online log-sum-exp. This prints the mean
(bias) and spread of each one's error per token, which is what decides how closely perplexities
computed the two ways can agree.

    python benchmarks/logprob_accuracy.py --docs 10
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

from flexeval import Policy
from flexeval.engine.readout import StreamedScoreReadout
from flexeval.engine.schedule import units
from flexeval.models import registry

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_dir  # noqa: E402


@torch.inference_mode()
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=10)
    parser.add_argument("--data-dir", type=Path, default=data_dir())
    args = parser.parse_args()

    directory = registry.resolve(registry.DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = registry.hf_model(directory)
    with (args.data_dir / "lambada_openai" / "lambada_test.jsonl").open() as f:
        texts = [json.loads(line)["text"] for line, _ in zip(f, range(args.docs))]
    layers = registry.build_model(directory).layers
    slices = [u.vocab for u in units(layers, Policy(stream_unembedding=True), torch.float32) if u.vocab]  # the engine's
    errors: dict[str, list[torch.Tensor]] = {"torch log_softmax (fp32)": [], "streamed readout (fp32)": []}
    for text in texts:
        ids = tokenizer.encode(text)
        logits, targets = model(torch.tensor([ids])).logits[0, :-1], torch.tensor(ids[1:])
        exact = logits.double().log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
        torch_lp = logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
        readout = StreamedScoreReadout(targets)
        for start, stop in slices:
            readout.update(logits[:, start:stop], slice(0, len(targets)), start)
        errors["torch log_softmax (fp32)"].append(torch_lp.double() - exact)
        errors["streamed readout (fp32)"].append(readout.result().double() - exact)
    tokens = sum(len(e) for e in errors["torch log_softmax (fp32)"])
    print(f"SmolLM2-135M fp32 logits of {args.docs} LAMBADA texts ({tokens} tokens); error per token against fp64")
    for name, parts in errors.items():
        e = torch.cat(parts)
        print(f"{name:<28} mean {e.mean():+.2e}  std {e.std():.2e}  max |e| {e.abs().max():.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

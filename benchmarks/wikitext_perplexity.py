"""Word perplexity on the first WikiText-2 test documents: flexeval against transformers.

Both systems score the same token windows, built exactly as lm-eval's `wikitext` task and `hf`
backend build them (its detokenizer, its rolling disjoint windows of the model's context
length, BOS as the prefix token), and word perplexity is exp(-Σ log-likelihood / Σ words of the
original documents). Data come from ../shared/data beside the repository, $FLEXEVAL_DATA_DIR
or --data-dir. Prints both, their relative difference and the time each took; exits 1
if the difference exceeds --tolerance.

    python benchmarks/wikitext_perplexity.py --docs 10
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from flexeval import Engine
from flexeval.models import registry

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_dir, wikitext_pages  # noqa: E402

Window = tuple[list[int], list[int]]  # (context, continuation)


def windows(engine: Engine, page: str) -> list[Window]:
    tokens = engine.tokenizer(wikitext_detokenizer({"page": page}), add_special_tokens=False).input_ids
    prefix = engine.tokenizer.bos_token_id
    if prefix is None:
        prefix = engine.tokenizer.eos_token_id
    rolling = get_rolling_token_windows(tokens, prefix, engine.context_length, context_len=1)
    return [make_disjoint_window(w) for w in rolling]


def flexeval_loglikelihood(engine: Engine) -> Callable[[Window], float]:
    def score(window: Window) -> float:
        context, continuation = window
        (lp,) = engine.logprobs([context + continuation])
        return lp[-len(continuation) :].double().sum().item()

    return score


def transformers_loglikelihood(directory: Path, dtype: torch.dtype) -> Callable[[Window], float]:
    model = registry.hf_model(directory, dtype)

    @torch.inference_mode()
    def score(window: Window) -> float:
        context, continuation = window
        ids = torch.tensor([context + continuation])
        logprobs = model(ids).logits[0, -len(continuation) - 1 : -1].float().log_softmax(-1)
        return logprobs.gather(1, ids[0, -len(continuation) :, None]).double().sum().item()

    return score


def word_perplexity(
    pages: list[str], doc_windows: list[list[Window]], score: Callable[[Window], float]
) -> tuple[float, float]:
    start = time.perf_counter()
    loglikelihood = sum(score(w) for ws in doc_windows for w in ws)
    words = sum(len(re.split(r"\s+", page)) for page in pages)
    return math.exp(-loglikelihood / words), time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=registry.DEFAULT_MODEL)
    parser.add_argument("--docs", type=int, default=10)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--data-dir", type=Path, default=data_dir())
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest relative difference accepted")
    args = parser.parse_args()

    pages = wikitext_pages(args.data_dir, args.docs)

    engine = Engine.load(args.model, dtype=args.dtype, device="cpu")
    doc_windows = [windows(engine, page) for page in pages]
    n_tokens = sum(len(c) for ws in doc_windows for _, c in ws)
    print(
        f"{args.model}, {args.dtype}: {len(pages)} documents, {n_tokens} tokens, "
        f"{sum(map(len, doc_windows))} windows of at most {engine.context_length} tokens"
    )

    ours, ours_s = word_perplexity(pages, doc_windows, flexeval_loglikelihood(engine))
    directory = registry.resolve(args.model)
    theirs, theirs_s = word_perplexity(pages, doc_windows, transformers_loglikelihood(directory, engine.dtype))
    rel = abs(ours - theirs) / theirs
    print(f"{'system':<14}{'word ppl':>12}{'seconds':>10}{'tokens/s':>10}")
    print(f"{'flexeval':<14}{ours:>12.4f}{ours_s:>10.1f}{n_tokens / ours_s:>10.0f}")
    print(f"{'transformers':<14}{theirs:>12.4f}{theirs_s:>10.1f}{n_tokens / theirs_s:>10.0f}")
    print(
        f"relative difference {rel:.2e} (tolerance {args.tolerance:.0e}): {'OK' if rel <= args.tolerance else 'FAIL'}"
    )
    return 0 if rel <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())

"""Micro-batches (`flexeval.engine.batch`): capped at `gpu_batch_tokens` without changing a result."""

from __future__ import annotations

import pytest

from flexeval import Engine, FlexevalError, Policy
from tests.helpers import same_results


def test_micro_batches_hold_at_most_gpu_batch_tokens_and_results_do_not_change():
    prompts = [list(range(1, n)) for n in (40, 30, 30, 20, 12, 8, 8, 4)]
    plain = Engine.load("tiny-llama", policy=Policy(gpu_batch_size=4))
    capped = Engine.load("tiny-llama", policy=Policy(gpu_batch_size=4, gpu_batch_tokens=64))
    lengths = {i: len(p) for i, p in enumerate(prompts)}
    sizes = [[len(mb) for mb in block] for block in capped._cut(lengths)]
    assert sizes == [[1], [2], [3], [2]]  # 39 alone; 29 + 29; 19 + 11 + 7; 7 + 3
    assert all(len(mb) * max(lengths[i] for i in mb) <= 64 for block in capped._cut(lengths) for mb in block)
    assert same_results(plain.logprobs(prompts), capped.logprobs(prompts))
    assert plain.generate(prompts, 4) == capped.generate(prompts, 4)
    with pytest.raises(FlexevalError, match="gpu_batch_tokens must be 0"):
        Policy(gpu_batch_tokens=-1)

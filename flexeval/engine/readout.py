"""What becomes of the logits: they arrive a block of head rows at a time, never all at once.

By default a block holds whole rows (the unembedding is one scheduling unit); with
`Policy.stream_unembedding` the unembedding's weights stream a vocabulary slice at a time (see
`schedule.units`) and a block is (rows × slice). Readouts reduce each block as it comes:
scoring takes the target's log-probability, greedy decoding a running maximum; only sampling,
which needs the whole distribution of its few rows, keeps their full logits.

Each readout also says whether the logits it reduced were finite (`finite`), from what it keeps:
a NaN or +inf logit turns its row's log-sum-exp, and its running maximum, non-finite. The engine
checks that once per micro-batch and pass, so corrupt weights or overflowing activations stop a
run instead of yielding a wrong accuracy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flexeval.engine.generation import Sampling, pick_tokens


def all_finite(t: Tensor) -> Tensor:
    """0-d bool, without a sync: whether every value of a float tensor is finite. Its
    minimum and maximum say so exactly (a NaN makes both NaN, an infinity one of them), in one
    pass that allocates nothing: 20 times faster than `isfinite(t).all()` on the CPU (fp32, 135M
    values: 21 ms against 0.5 s)."""
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    low, high = torch.aminmax(t)
    return torch.isfinite(low) & torch.isfinite(high)


class ScoreReadout:
    """log p(target) for each head row from whole rows of logits, through `log_softmax`: the very
    arithmetic of lm-eval's `hf` backend, so that log-likelihoods agree with it as closely as the
    logits themselves do (fp32 `log_softmax` is biased by about 1e-5 per token, and perplexities
    summed over a corpus show it); and whether the target is the row's first maximum."""

    def __init__(self, targets: Tensor) -> None:
        self.targets = targets
        self.logprob = torch.zeros(targets.shape, device=targets.device)
        self.argmax = torch.zeros(targets.shape, dtype=torch.long, device=targets.device)

    def update(self, logits: Tensor, rows: slice, first_token: int) -> None:
        if first_token != 0:
            raise ValueError(
                f"ScoreReadout takes whole rows of logits, got a vocabulary slice from token {first_token}: "
                "a streamed unembedding needs StreamedScoreReadout"
            )
        self.logprob[rows] = torch.log_softmax(logits, -1).gather(1, self.targets[rows, None]).squeeze(1)
        self.argmax[rows] = logits.argmax(-1)  # the first maximum, as greedy decoding picks it

    def result(self) -> Tensor:
        return self.logprob

    def greedy(self) -> Tensor:
        return self.argmax == self.targets

    def finite(self) -> Tensor:
        return all_finite(self.logprob)


class StreamedScoreReadout:
    """`ScoreReadout` for logits that arrive a vocabulary slice at a time: an online log-sum-exp
    and the target's logit. Closer to exact than fp32 `log_softmax` (no bias), so perplexities
    differ from `hf`'s in their fifth significant digit."""

    def __init__(self, targets: Tensor) -> None:
        self.targets = targets
        self.max = torch.full(targets.shape, float("-inf"), device=targets.device)
        self.argmax = torch.zeros(targets.shape, dtype=torch.long, device=targets.device)
        self.sum = torch.zeros(targets.shape, device=targets.device)
        self.target_logit = torch.zeros(targets.shape, device=targets.device)

    def update(self, logits: Tensor, rows: slice, first_token: int) -> None:
        old = self.max[rows]
        value, index = logits.max(-1)
        new = torch.maximum(old, value)
        self.argmax[rows] = torch.where(value > old, index + first_token, self.argmax[rows])  # ties keep the first
        self.sum[rows] = self.sum[rows] * (old - new).exp() + (logits - new[:, None]).exp_().sum(-1)
        self.max[rows] = new
        column = self.targets[rows] - first_token
        inside = (column >= 0) & (column < logits.shape[1])
        picked = logits.gather(1, column.clamp(0, logits.shape[1] - 1)[:, None]).squeeze(1)
        self.target_logit[rows] = torch.where(inside, picked, self.target_logit[rows])

    def result(self) -> Tensor:
        return self.target_logit - self.max - self.sum.log()

    def greedy(self) -> Tensor:
        return self.argmax == self.targets

    def finite(self) -> Tensor:
        return all_finite(self.result())


class TokenReadout:
    """The next token of each head row: the first maximum (greedy), or a sample of the full logits."""

    def __init__(
        self, n: int, vocab_size: int, sampling: Sampling, generator: torch.Generator | None, device: torch.device
    ) -> None:
        self.sampling, self.generator = sampling, generator
        if sampling.greedy:
            self.best = torch.full((n,), float("-inf"), device=device)
            self.token = torch.zeros(n, dtype=torch.long, device=device)
        else:
            self.logits = torch.empty(n, vocab_size, device=device)

    def update(self, logits: Tensor, rows: slice, first_token: int) -> None:
        if not self.sampling.greedy:
            self.logits[rows, first_token : first_token + logits.shape[1]] = logits
            return
        value, index = logits.max(-1)
        best = self.best[rows]
        self.token[rows] = torch.where(value > best, index + first_token, self.token[rows])  # ties keep the first
        self.best[rows] = torch.maximum(best, value)  # a NaN stays, for `finite`

    def result(self) -> Tensor:
        if self.sampling.greedy:
            return self.token
        if not self.finite():  # the sampler would fail on them; the engine says where they come from
            return torch.zeros(len(self.logits), dtype=torch.long, device=self.logits.device)
        return pick_tokens(self.logits, self.sampling, self.generator)

    def finite(self) -> Tensor:
        return all_finite(self.best if self.sampling.greedy else self.logits)


class ForcedReadout:
    """Decoding along a known continuation: a score readout of each row's given next token,
    which is also the token fed on."""

    def __init__(self, score: ScoreReadout | StreamedScoreReadout) -> None:
        self.score = score

    def update(self, logits: Tensor, rows: slice, first_token: int) -> None:
        self.score.update(logits, rows, first_token)

    def result(self) -> Tensor:
        return self.score.targets

    def finite(self) -> Tensor:
        return self.score.finite()

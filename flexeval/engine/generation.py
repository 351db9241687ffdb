"""Generation state: choosing the next token (greedy, or sampled) and tracking each sequence until it stops."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from flexeval.engine.batch import is_int, left_pad, positions
from flexeval.errors import FlexevalError

SEEDS = (-(2**63), 2**64)  # what `torch.Generator.manual_seed` takes


def _is_number(x: object) -> bool:
    """A real number, but not a bool; NaN and infinity pass here and are refused by the caller."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool | np.bool_)


@dataclass(frozen=True)
class Sampling:
    """temperature 0 means greedy; top_k 0 and top_p 1 mean no truncation.

    Each setting is checked for its type and finiteness here, before any compute: a NaN
    temperature would only fail in the sampler after a whole prefill, and a float top_k or a
    string seed with a raw torch error.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                raise FlexevalError(f"{name} must be a finite number, got {value!r}")
        for name in ("top_k", "seed"):
            value = getattr(self, name)
            if not is_int(value):
                raise FlexevalError(f"{name} must be an int, got {value!r}")
        if not SEEDS[0] <= self.seed < SEEDS[1]:
            raise FlexevalError(f"seed must be an int in [-2**63, 2**64) (torch's range), got {self.seed}")
        if self.temperature < 0:
            raise FlexevalError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise FlexevalError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise FlexevalError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def pick_tokens(logits: Tensor, sampling: Sampling, generator: torch.Generator | None) -> Tensor:
    """(n, vocab) float logits -> (n,) token ids."""
    if sampling.greedy:
        return logits.argmax(-1)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > sampling.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


class Decoding:
    """One micro-batch's generation in progress: its padded prompts, cache columns and outputs.

    Prompts are left-padded, so step t writes cache column `width + t` for every sequence; a
    sequence that has stopped keeps computing (its results are dropped) until the batch ends.
    So does a micro-batch whose sequences have all stopped, until its block ends: `steps`, the
    block's most decoding steps, sizes the cache for that.
    """

    def __init__(
        self,
        prompts: list[Tensor],
        budgets: Tensor,
        stops: Tensor,
        device: torch.device,
        stopped: Callable[[list[int]], bool] | None = None,
        steps: int | None = None,
    ) -> None:
        self.batch = left_pad(prompts, device)
        self.budgets, self.stops, self.stopped = budgets, stops, stopped
        self.steps = int(budgets.max()) if steps is None else steps
        self.positions = positions(self.batch.valid)
        self.outputs: list[list[int]] = [[] for _ in prompts]
        self.running = budgets > 0
        self.t = 0

    @property
    def cache_length(self) -> int:
        return self.batch.width + self.steps

    @property
    def done(self) -> bool:
        return not bool(self.running.any())

    def prefill_rows(self) -> Tensor:
        """The last column of every row: where the first new token is predicted."""
        b, width = self.batch.ids.shape
        return torch.arange(b, device=self.batch.ids.device) * width + width - 1

    def record(self, tokens: Tensor) -> Tensor:
        """Append the chosen tokens of running sequences; returns the tokens to feed next, (b, 1)."""
        chosen = tokens.cpu()
        for i in self.running.nonzero().squeeze(1).tolist():
            self.outputs[i].append(int(chosen[i]))
        self.t += 1
        self.running &= (self.budgets > self.t) & ~torch.isin(chosen, self.stops)
        if self.stopped is not None:
            for i in self.running.nonzero().squeeze(1).tolist():
                self.running[i] = not self.stopped(self.outputs[i])
        self.positions = self.positions[:, -1:] + 1
        return tokens[:, None]

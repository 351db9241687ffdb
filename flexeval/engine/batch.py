"""Padding sequences of different lengths into one batch: positions, and masks for packed rows.

Sequences are left-padded: every sequence ends in the last column, so decoding appends one
column for the whole batch and the KV cache stays rectangular. Positions count only real
tokens, and attention skips each sequence's padding (`models.attention`), so a padded sequence
computes exactly what it would alone.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from flexeval.errors import FlexevalError

TokenSeq = Sequence[int] | Tensor


@dataclass(frozen=True)
class PaddedBatch:
    ids: Tensor  # (b, s)
    valid: Tensor  # (b, s) bool; False on left padding
    lengths: Tensor  # (b,)

    @property
    def width(self) -> int:
        return self.ids.shape[1]

    @property
    def pads(self) -> tuple[int, ...]:
        """Columns of left padding of each sequence."""
        return tuple((self.width - self.lengths).tolist())


def as_token_lists(sequences: Sequence[TokenSeq], vocab_size: int, what: str) -> list[Tensor]:
    """Validate user input: a non-empty list of non-empty sequences of in-vocabulary ids.

    A flat list of ints is refused rather than read as that many one-token sequences, and ids
    that are not integers (floats, bools, strings) rather than truncated or cast: either way the
    call would compute something the caller did not mean, and return it without complaint.
    """
    if isinstance(sequences, str):
        raise FlexevalError(f"{what} takes a list of token-id sequences, got str: tokenize text first")
    if isinstance(sequences, Tensor) or not isinstance(sequences, Sequence):
        raise FlexevalError(f"{what} takes a list of token-id sequences, got {type(sequences).__name__}")
    if len(sequences) == 0:
        raise FlexevalError(f"{what} got no sequences: pass at least one list of token ids")
    if all(is_int(x) for x in sequences):
        raise FlexevalError(
            f"{what}: expected a list of token-id sequences, got a flat list of ints: wrap it: [[1, 2, 3]]"
        )
    return [as_token_ids(seq, vocab_size, f"{what}: sequence {i}") for i, seq in enumerate(sequences)]


def as_token_ids(seq: TokenSeq, vocab_size: int, where: str) -> Tensor:
    """One sequence of in-vocabulary ids (a list or tuple of ints, or a 1-D integer tensor or
    array) as a long tensor; `where` names it in the error."""
    if isinstance(seq, str):
        raise FlexevalError(f"{where} is a str: tokenize text first (engine.tokenizer(text).input_ids)")
    if isinstance(seq, Tensor | np.ndarray):
        if seq.ndim != 1:
            raise FlexevalError(f"{where} is a {seq.ndim}-D tensor: give each sequence as a 1-D tensor of token ids")
        if isinstance(seq, Tensor):
            integral = not (seq.is_floating_point() or seq.is_complex() or seq.dtype == torch.bool)
        else:
            integral = np.issubdtype(seq.dtype, np.integer)
        if not integral:
            raise FlexevalError(f"{where} holds {seq.dtype} values: token ids must be integers")
        ids = torch.as_tensor(seq).long()
    elif isinstance(seq, Sequence):
        for position, x in enumerate(seq):
            if type(x) is not int and not is_int(x):  # the first test alone passes a tokenizer's ids, quickly
                raise FlexevalError(f"{where} has {type(x).__name__} {x!r} at position {position}: token ids are ints")
        try:
            ids = torch.tensor(seq, dtype=torch.long)
        except (OverflowError, RuntimeError, ValueError):  # beyond int64: outside any vocabulary
            raise FlexevalError(f"{where} has token ids outside the vocabulary [0, {vocab_size})") from None
    else:
        article = "an" if type(seq).__name__[0] in "aeiou" else "a"
        raise FlexevalError(f"{where} is {article} {type(seq).__name__}, not a list of token ids")
    if ids.numel() == 0:
        raise FlexevalError(f"{where} is empty; every sequence needs at least one token")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise FlexevalError(f"{where} has token ids outside the vocabulary [0, {vocab_size})")
    return ids


def is_int(x: object) -> bool:
    """An integer, but not a bool (which Python counts as one: a flag passed by mistake); numpy's
    integer scalars included."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool | np.bool_)


def left_pad(sequences: Sequence[Tensor], device: torch.device, pad_id: int = 0) -> PaddedBatch:
    lengths = torch.tensor([len(s) for s in sequences])
    width = int(lengths.max())
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = seq
    valid = torch.arange(width) >= (width - lengths)[:, None]
    return PaddedBatch(ids.to(device), valid.to(device), lengths.to(device))


def micro_batches(lengths: Sequence[int], size: int, tokens: int = 0) -> list[int]:
    """How many sequences each micro-batch takes, of `lengths` sorted longest first: at most
    `size`, and with `tokens` no more than fit that many once padded to the first one's length
    (one at least). The engine cuts its micro-batches so, and the cost model predicts them so."""
    counts, start = [], 0
    while start < len(lengths):
        count = size if not tokens else max(1, min(size, tokens // lengths[start]))
        counts.append(min(count, len(lengths) - start))
        start += count
    return counts


def cut_blocks(lengths: Sequence[int], size: int, tokens: int, per_block: int) -> list[list[list[int]]]:
    """Positions of `lengths`, longest first (similar lengths share padding), cut into
    `micro_batches` and those into blocks of `per_block`: the one cut of a call's sequences,
    which the engine runs and the cost model counts."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, start = [], 0
    for count in micro_batches([lengths[i] for i in order], size, tokens):
        batches.append(order[start : start + count])
        start += count
    return [batches[b : b + per_block] for b in range(0, len(batches), per_block)]


def positions(valid: Tensor) -> Tensor:
    """(b, s) bool -> (b, s) position of each real token in its sequence; 0 on padding."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


@dataclass(frozen=True)
class Packed:
    """A context and several continuations scored in one sequence, the context computed once.

    Tokens are the context followed by each continuation but its last token; every
    continuation continues the context's positions and attends to the context and to itself,
    never to the other continuations (a multiple-choice document's endings in one row).
    `heads[i]` is the token whose logits predict `targets[i]`; the context's last token
    predicts the first token of every continuation.
    """

    ids: Tensor  # (s,)
    positions: Tensor  # (s,)
    segments: Tensor  # (s,) 0 on the context, i + 1 on continuation i
    heads: Tensor  # (t,) indices into ids
    targets: Tensor  # (t,)
    spans: list[int]  # targets per continuation, in order

    def __len__(self) -> int:
        return len(self.ids)


def pack(context: Tensor, continuations: Sequence[Tensor]) -> Packed:
    c = len(context)
    ids, segments, positions, heads = [context], [torch.zeros(c, dtype=torch.long)], [torch.arange(c)], []
    start = c
    for i, cont in enumerate(continuations, 1):
        n = len(cont) - 1  # the last token is only a target
        ids.append(cont[:-1])
        segments.append(torch.full((n,), i, dtype=torch.long))
        positions.append(torch.arange(c, c + n))
        heads.append(torch.cat((torch.tensor([c - 1]), torch.arange(start, start + n))))
        start += n
    return Packed(
        torch.cat(ids),
        torch.cat(positions),
        torch.cat(segments),
        torch.cat(heads),
        torch.cat(list(continuations)),
        [len(cont) for cont in continuations],
    )


def packed_mask(valid: Tensor, segments: Tensor, window: int | None = None, pos: Tensor | None = None) -> Tensor:
    """(b, s) valid tokens and segments of packed rows -> (b, 1, s, s) bool mask: causal over
    real tokens, and a continuation sees the context (segment 0) and itself only. A sliding
    window counts positions, which restart for each continuation."""
    s = valid.shape[1]
    col = torch.arange(s, device=valid.device)
    allowed = (col[None, :] <= col[:, None])[None] & valid[:, None, :]  # (b, q, k)
    allowed &= (segments[:, None, :] == 0) | (segments[:, None, :] == segments[:, :, None])
    if window is not None and pos is not None:
        allowed &= pos[:, :, None] - pos[:, None, :] < window
    allowed |= torch.eye(s, dtype=torch.bool, device=valid.device)
    return allowed[:, None]

"""Padding sequences of different lengths into one batch: positions, and masks for packed rows.

Sequences are left-padded: every sequence ends in the last column, so decoding appends one
column for the whole batch and the KV cache stays rectangular. Positions count only real
tokens, and attention skips each sequence's padding (`models.attention`), so a padded sequence
computes exactly what it would alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
    """Validate user input: a non-empty list of non-empty sequences of in-vocabulary ids."""
    if isinstance(sequences, Tensor) or not isinstance(sequences, Sequence) or isinstance(sequences, str):
        raise FlexevalError(f"{what} takes a list of token-id sequences, got {type(sequences).__name__}")
    if len(sequences) == 0:
        raise FlexevalError(f"{what} got no sequences: pass at least one list of token ids")
    out = []
    for i, seq in enumerate(sequences):
        ids = torch.as_tensor(seq, dtype=torch.long).flatten()
        if ids.numel() == 0:
            raise FlexevalError(f"{what}: sequence {i} is empty; every sequence needs at least one token")
        if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise FlexevalError(f"{what}: sequence {i} has token ids outside the vocabulary [0, {vocab_size})")
        out.append(ids)
    return out


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

"""Attention over padded batches: the CPU's per-padding calls and the single masked call agree."""

from __future__ import annotations

import pytest
import torch

from flexeval.engine.batch import left_pad, pack, packed_mask
from flexeval.models.attention import _padded, _unpadded
from flexeval.models.common import Step


def step(pads: tuple[int, ...], queries: int, keys: int, window: int | None, mask=None) -> Step:
    b = len(pads)
    ids = torch.zeros(b, queries, dtype=torch.long)
    return Step(ids, ids, pads, mask, keys - queries, torch.zeros(0), None, None, window)


def qkv(b: int, queries: int, keys: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, queries, 8, generator=g), *(torch.randn(b, 2, keys, 8, generator=g) for _ in "kv")


@pytest.mark.parametrize("queries", [1, 3, 12])
@pytest.mark.parametrize("window", [None, 4])
def test_per_padding_calls_compute_the_masked_batch(queries: int, window: int | None) -> None:
    pads, keys = (0, 0, 3, 5, 5, 9, 0), 12
    q, k, v = qkv(len(pads), queries, keys)
    s = step(pads, queries, keys, window)
    real = torch.arange(keys - queries, keys)[None, :] >= torch.tensor(pads)[:, None]  # (b, queries)
    a, b = _unpadded(q, k, v, s, None), _padded(q, k, v, s, None)
    torch.testing.assert_close(a.transpose(1, 2)[real], b.transpose(1, 2)[real], rtol=0, atol=1e-6)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()


def test_packed_rows_keep_their_segment_mask() -> None:
    t = torch.tensor
    rows = [pack(torch.arange(5), [t([7, 8]), t([9])]), pack(torch.arange(2), [t([3])])]
    batch = left_pad([r.ids for r in rows], torch.device("cpu"))
    segments = left_pad([r.segments for r in rows], torch.device("cpu")).ids
    width = batch.width
    s = step(batch.pads, width, width, None, packed_mask(batch.valid, segments))
    q, k, v = qkv(2, width, width, seed=1)
    a, b = _unpadded(q, k, v, s, None), _padded(q, k, v, s, None)
    torch.testing.assert_close(a.transpose(1, 2)[batch.valid], b.transpose(1, 2)[batch.valid], rtol=0, atol=1e-6)

"""Attention over padded batches: the CPU's per-padding calls and the single masked call agree;
sparse decoding reads the values FlexGen's top-k attention would."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flexeval.engine.batch import left_pad, pack, packed_mask
from flexeval.engine.kv_cache import QuantizedKVCache
from flexeval.models import attention
from flexeval.models.attention import _padded, _unpadded, attend, one_query_invariant
from flexeval.models.common import KVCache, Step
from flexeval.quantization.compression import dequantize
from flexeval.quantization.config import CompressionConfig

CPU = torch.device("cpu")


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


@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-6)])
@pytest.mark.parametrize("window", [None, 4])
def test_one_query_takes_two_products_and_computes_the_masked_batch(
    window: int | None, dtype: torch.dtype, atol: float
) -> None:
    """A decoding step (grouped heads, windows, padding) against the masked flash kernel; the
    per-run products are what makes it fast, and they must agree with it."""
    pads, keys = (0, 0, 3, 5, 5, 9, 0), 12
    q, k, v = (t.to(dtype) for t in qkv(len(pads), 1, keys))
    if not one_query_invariant(dtype, 4, 2, 8):
        pytest.skip("this machine's batched products depend on the batch: the flash kernel runs instead")
    s = step(pads, 1, keys, window)
    a, b = _unpadded(q, k, v, s, None), _padded(q, k, v, s, None)
    torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=atol)
    alone = [
        _unpadded(q[i : i + 1], k[i : i + 1], v[i : i + 1], step(pads[i : i + 1], 1, keys, window), None)
        for i in range(len(pads))
    ]
    assert torch.equal(torch.cat(alone), a)


def test_a_batch_dependent_one_query_path_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe is what keeps a sequence's bits independent of its batch: a product whose
    rounding follows the batch size must send decoding back to the flash kernel."""
    exact = attention._one_query
    monkeypatch.setattr(attention, "_one_query", lambda q, k, v, scale: exact(q, k, v, scale) * (1 + q.shape[0] / 64))
    one_query_invariant.cache_clear()
    try:
        assert not one_query_invariant(torch.bfloat16, 4, 2, 8)
        assert not one_query_invariant(torch.float32, 4, 2, 8)
        assert not one_query_invariant(torch.bfloat16, 4, 4, 8)  # a key head a query head: the kernel is faster
    finally:
        one_query_invariant.cache_clear()


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


def sparse_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: int, share: float) -> torch.Tensor:
    """One sequence, one query (h, 1, d) over keys/values (kv_heads, n, d) visible from column
    `first` on, the last being its own: FlexGen's top-k sparse attention, head by head in fp64."""
    heads, kv_heads, n = q.shape[0], k.shape[0], k.shape[1]
    out = torch.empty(heads, 1, q.shape[-1], dtype=torch.float64)
    for h in range(heads):
        kh, vh = k[h * kv_heads // heads].double()[first:], v[h * kv_heads // heads].double()[first:]
        probs = torch.softmax(q[h].double() @ kh.T / q.shape[-1] ** 0.5, -1)[0]
        kept = probs[:-1].topk(int(share * (n - 1 - first))).indices
        out[h, 0] = probs[kept] @ vh[kept] + probs[-1] * vh[-1]
    return out


@pytest.mark.parametrize("share", [0.1, 0.5, 0.99])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("quantized", [False, True])
def test_sparse_decoding_reads_the_top_values_of_each_query(share: float, window: int | None, quantized: bool) -> None:
    pads, keys = (0, 0, 3, 5, 9), 16
    q, k, v = qkv(len(pads), 1, keys, seed=2)
    s = dataclasses.replace(step(pads, 1, keys, window), attn_sparsity=share)
    shape = (len(pads), 2, keys, 8)
    cache = (
        QuantizedKVCache.empty(shape, torch.float32, CPU, CompressionConfig(8, 8, -1))
        if quantized
        else KVCache(torch.zeros(shape), torch.zeros(shape))
    )
    cache.store(0, k[:, :, :-1], v[:, :, :-1])  # the earlier columns; this step's are the last
    all_k = cache.keys(keys - 1, k[:, :, -1:])  # earlier keys as stored (dequantized), then this step's
    all_v = torch.cat(((dequantize(cache.v) if quantized else cache.v)[:, :, :-1], v[:, :, -1:]), 2)
    out = attend(q, k[:, :, -1:], v[:, :, -1:], s, cache).view(len(pads), 1, 4, 8).transpose(1, 2)
    for i, pad in enumerate(pads):
        first = pad if window is None else max(pad, keys - window)
        expected = sparse_reference(q[i], all_k[i], all_v[i], first, share)
        torch.testing.assert_close(out[i].double(), expected, rtol=0, atol=1e-5)

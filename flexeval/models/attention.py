"""Attention over a left-padded batch, computed so that padding never changes a sequence's result.

A batch is left-padded (see `engine.batch`), so a sequence's first key sits at a column that
depends on which other sequences share its batch. Attention kernels reduce over key columns in
vector lanes and blocks aligned to the first column, so the same sequence would be rounded
differently behind different amounts of padding. On the CPU, therefore, each run of sequences
with the same left padding attends over its own columns only: the kernel sees exactly what it
would see for any one of them alone, and (with row-invariant GEMMs, see `flexeval.reproducible`)
a sequence's log-probabilities and generations are bitwise the same whatever batch shape or
placement computed them. On CUDA, cuBLAS picks kernels by shape, so that exactness is out of
reach there; one masked call over the whole batch is faster.

A decoding step's single query per sequence takes its own path on the CPU with grouped heads
(`one_query`): torch's CPU flash kernel runs it slower than two batched products, 4-10x in bf16
(25 against 6 ms for 256 SmolLM2 sequences over 130 keys, 8.4 against 0.6 for 32 of
Qwen2.5-1.5B's over 140) and 1.1-2x in fp32 (3.3 against 3.1 ms for 128 SmolLM2 sequences over
140 keys, 0.96 against 0.50 for 32 of Qwen2.5-1.5B's; Zen 4, 2 threads). The products keep a
sequence's bits under any batch only where a probe says so.
"""

from __future__ import annotations

from functools import cache
from itertools import groupby

import torch
import torch.nn.functional as F
from torch import Tensor

from flexeval.models.common import Cache, Step


def visibility(pads: Tensor, queries: int, keys: int, window: int | None) -> Tensor | None:
    """(b,) left padding -> (b, 1, queries, keys) bool mask, True = may attend; the queries are
    the last `queries` key columns.

    A query sees real keys at or before its own column (and within `window` columns when a
    sliding window applies). Every query also sees itself, so rows of padding queries are not
    empty (their outputs are never read, but an empty row would produce NaNs). None means plain
    causal attention (or one query seeing every key), which kernels run faster without a mask.
    """
    if (window is None or window >= keys) and queries in (1, keys) and not bool(pads.any()):
        return None
    q_col = torch.arange(keys - queries, keys, device=pads.device)[:, None]  # (q, 1)
    k_col = torch.arange(keys, device=pads.device)[None, :]  # (1, k)
    allowed = k_col <= q_col
    if window is not None:
        allowed &= q_col - k_col < window
    mask = allowed[None] & (k_col >= pads[:, None, None])  # (b, q, k)
    mask |= k_col == q_col
    return mask[:, None]


def attend(q: Tensor, k: Tensor, v: Tensor, step: Step, cache: Cache | None, scale: float | None = None) -> Tensor:
    """Masked attention of this step's queries over the cached and new keys; returns (b, s, h * d).

    q is (b, h, s, d); k and v are (b, kv_heads, s, d) for this step's tokens only. Without a
    cache (scoring), the step attends to its own keys. Attention runs where the cache lives: a
    cache kept in CPU RAM (FlexGen's CPU delegation) receives the few new rows instead of
    sending all of its keys and values to the GPU.
    """
    home = q.device
    if cache is not None:
        where = cache.device
        if where != home:
            q, k, v = q.to(where), k.to(where), v.to(where)
        if step.sparse:
            return _sparse(q, k, v, step, cache, scale).transpose(1, 2).flatten(2).to(home)
        k, v = cache.write(step.cache_start, k, v)  # (b, kv_heads, cache_start + s, d)
    out = _unpadded(q, k, v, step, scale) if q.device.type == "cpu" else _padded(q, k, v, step, scale)
    return out.transpose(1, 2).flatten(2).to(home)  # (b, s, h * d)


def _sparse(q: Tensor, k: Tensor, v: Tensor, step: Step, cache: Cache, scale: float | None) -> Tensor:
    """One decoding query per sequence attending to its own key and value and to the values of
    only the top `attn_sparsity` share of its earlier positions, by attention probability
    (FlexGen's sparse attention): all keys are read, but only the chosen values. As in FlexGen,
    the probabilities are those of the full softmax, not renormalised over the kept positions.

    Runs of equally padded sequences are computed together, so that a sequence's result does not
    depend on its batch."""
    b, heads, _, d = q.shape
    kv_heads = k.shape[1]
    cache.store(step.cache_start, k, v)
    keys = cache.keys(step.cache_start, k)  # (b, kv_heads, n, d); the last column is this step's
    n = keys.shape[2]
    scale = d**-0.5 if scale is None else scale
    out, start = torch.empty_like(q), 0
    for pad, run in groupby(step.pads):
        rows = slice(start, start + len(list(run)))
        start = rows.stop
        first = pad if step.window is None else max(pad, n - step.window)  # the first visible column
        query = q[rows].float().reshape(-1, kv_heads, heads // kv_heads, d)  # (r, kv_heads, group, d)
        probs = torch.softmax(query @ keys[rows, :, first:].float().transpose(-1, -2) * scale, -1)
        kept = int(step.attn_sparsity * (n - 1 - first))
        top, columns = probs[..., :-1].topk(kept, -1)  # (r, kv_heads, group, kept)
        values = cache.rows(rows.start, rows.stop).values_at(columns.flatten(2) + first).float()
        values = values.view(*columns.shape, d)  # (r, kv_heads, group, kept, d)
        mixed = (top.unsqueeze(-2) @ values).squeeze(-2) + probs[..., -1:] * v[rows].float()
        out[rows] = mixed.reshape(-1, heads, 1, d).to(q.dtype)
    return out


def _padded(q: Tensor, k: Tensor, v: Tensor, step: Step, scale: float | None) -> Tensor:
    """One call over the whole batch, padding masked."""
    mask = step.attn_mask
    if mask is None:
        mask = visibility(torch.tensor(step.pads, device=q.device), q.shape[2], k.shape[2], step.window)
    return _sdpa(q, k, v, None if mask is None else mask.to(q.device), scale)


def _unpadded(q: Tensor, k: Tensor, v: Tensor, step: Step, scale: float | None) -> Tensor:
    """One call per run of sequences with equal padding, over their real columns only."""
    out = torch.zeros_like(q)  # padding queries: never read
    queries, keys, start = q.shape[2], k.shape[2], 0
    for pad, run in groupby(step.pads):
        rows = slice(start, start + len(list(run)))
        start = rows.stop
        first = max(pad - (keys - queries), 0)  # the first real query
        if queries == 1 and first == 0 and step.attn_mask is None:
            visible = keys - pad if step.window is None else min(keys - pad, step.window)
            out[rows] = one_query(q[rows], k[rows, :, keys - visible :], v[rows, :, keys - visible :], scale)
            continue
        if step.attn_mask is None:
            mask = visibility(torch.zeros(1, dtype=torch.long), queries - first, keys - pad, step.window)
        else:
            mask = step.attn_mask[rows, :, first:, pad:].to(q.device)
        out[rows, :, first:] = _sdpa(q[rows, :, first:], k[rows, :, pad:], v[rows, :, pad:], mask, scale)
    return out


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None) -> Tensor:
    causal = mask is None and q.shape[2] > 1  # None with one query: it sees every key
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def one_query(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """A decoding step's attention: one query per sequence over every key given."""
    if q.device.type == "cpu" and one_query_invariant(q.dtype, q.shape[1], k.shape[1], q.shape[3]):
        return _one_query(q, k, v, scale)
    return _sdpa(q, k, v, None, scale)


def _one_query(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
    """One query per sequence over all of its keys, as two batched products: scores in fp32 (from
    upcast queries and keys, as the flash kernel accumulates them), probabilities rounded to the
    values' dtype for the second product (as the flash kernel does too). q is (b, h, 1, d), k and
    v (b, kv_heads, n, d); query heads share key heads in consecutive groups (`enable_gqa`)."""
    b, heads, _, d = q.shape
    scores = q.float().reshape(b, k.shape[1], heads // k.shape[1], d) @ k.float().transpose(-1, -2)
    probs = torch.softmax(scores.mul_(d**-0.5 if scale is None else scale), -1).to(v.dtype)
    return (probs @ v).reshape(b, heads, 1, d)


@cache
def one_query_invariant(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether `_one_query` is the faster path here and gives a sequence the same bits among any
    number of others: batched products may pick kernels by their batch size (torch's CPU `bmm`
    hands large enough batches to oneDNN), so that is probed, once a process, on batches of 1 to
    9 sequences over key counts from 1 to 300, before it is relied on. Models with a key head per
    query head keep the flash kernel: their keys, upcast for every query, cost more than the
    kernel (Llama-2-7B's heads in bf16, 16 sequences over 140 keys: 14.6 ms against 9.0)."""
    if kv_heads == heads:
        return False
    g = torch.Generator().manual_seed(0)
    for keys in (1, 2, 5, 9, 33, 130, 300):
        q = torch.randn(9, heads, 1, head_dim, generator=g).to(dtype)
        k, v = (torch.randn(9, kv_heads, keys, head_dim, generator=g).to(dtype) for _ in "kv")
        together = _one_query(q, k, v, None)
        for rows in (slice(0, 1), slice(4, 6), slice(1, 4), slice(3, 9)):
            if not torch.equal(_one_query(q[rows], k[rows], v[rows], None), together[rows]):
                return False
    return True

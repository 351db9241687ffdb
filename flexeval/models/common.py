"""What every model family shares: the per-layer interface and the layer math.

A model is a flat list of `Layer`s (input embedding, then attention and MLP for each block, then
the output head). Each layer names its weight tensors, their shapes and the checkpoint tensors
they come from, and has a `forward(weights, hidden, step, cache)` that takes the weights as
plain arguments. That is all an engine needs to place, move and schedule weights layer by layer
without knowing the family; nothing here knows where a tensor lives.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

Weights = Mapping[str, Tensor]
LayerKind = Literal["embed", "attention", "mlp", "head", "unembed"]

# A layer whose weights are tables indexed by token id gets, beside them, under this key the
# sorted token ids of the rows it was given: the embedding only needs the rows of the tokens
# being read, and a streamed unembedding takes a slice of the vocabulary at a time.
ROWS = "rows"
# Logits materialised at once by the unembedding: bounds its working memory while keeping each
# matmul large enough to run at speed; but never fewer rows than LOGITS_CHUNK_ROWS, because each
# chunk reads the unembedding's weights once (whole vocabulary rows: 256 x 49,152 x 4 B = 50 MB).
LOGITS_CHUNK_BYTES = 4 * 2**20
LOGITS_CHUNK_ROWS = 256


@dataclass(frozen=True)
class Param:
    """One weight tensor of a layer: its shape and the checkpoint tensors it is built from.

    Several sources are concatenated along dim 0 (how q/k/v and gate/up projections fuse).
    """

    shape: tuple[int, ...]
    sources: tuple[str, ...]
    by_token: bool = False  # rows are token ids: a layer may be given only some of them (see ROWS)
    # (GGML type, rows) of each source where the checkpoint ships it in llama.cpp's blocks (GGUF):
    # what `compression=native` stores (see `quantization.blocks`)
    blocks: tuple[tuple[str, int], ...] = ()

    def nbytes(self, dtype: torch.dtype) -> int:
        return torch.Size(self.shape).numel() * dtype.itemsize


class StoredValues(Protocol):
    """A cache's values left where the cache lives, on a tier that copies (disk; CPU RAM under
    CUDA): sparse attention fetches only the columns it chose."""

    def rows(self, start: int, stop: int) -> StoredValues:
        """The values of sequences [start, stop) of the batch."""

    def at(self, columns: Tensor) -> dict[str, Tensor]:
        """(b, kv_heads, m) column indices -> each stored value part at them, (b, kv_heads, m, last)."""


class Cache(Protocol):
    """The keys and values of one attention layer for a padded batch, as attention reads and writes
    them and a tier stores them: `KVCache`, or one kept quantized (`engine.kv_cache.QuantizedKVCache`)."""

    stored: StoredValues | None

    @property
    def device(self) -> torch.device: ...

    def write(self, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store new keys/values at columns [start, start + s) and return everything up to there."""

    def store(self, start: int, k: Tensor, v: Tensor) -> None: ...

    def keys(self, start: int, k: Tensor) -> Tensor:
        """After `store(start, k, v)`: the keys of every column up to its new ones."""

    def values_at(self, columns: Tensor) -> Tensor:
        """(b, kv_heads, m) column indices -> (b, kv_heads, m, head_dim): only those values."""

    def rows(self, start: int, stop: int) -> Cache:
        """Sequences [start, stop) of the batch: views, so writes land in this cache."""

    def parts(self) -> dict[str, Tensor]:
        """The tensors that hold it, for storing it on a tier."""


@dataclass
class KVCache:
    """The keys and values of one attention layer for a padded batch; columns are time steps."""

    k: Tensor  # (b, kv_heads, max_len, head_dim)
    v: Tensor  # (b, kv_heads, max_len, head_dim); when `stored` is set, only the columns written since the fetch
    stored: StoredValues | None = None

    @property
    def device(self) -> torch.device:
        return self.k.device

    def write(self, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store new keys/values at columns [start, start + s) and return everything up to there."""
        self.store(start, k, v)
        end = start + k.shape[2]
        return self.k[:, :, :end], self.v[:, :, :end]

    def store(self, start: int, k: Tensor, v: Tensor) -> None:
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v

    def keys(self, start: int, k: Tensor) -> Tensor:
        """After `store(start, k, v)`: the keys of every column up to its new ones."""
        return self.k[:, :, : start + k.shape[2]]

    def values_at(self, columns: Tensor) -> Tensor:
        """(b, kv_heads, m) column indices -> (b, kv_heads, m, head_dim): only those values."""
        if self.stored is not None:
            return self.stored.at(columns)["v"]
        return self.v.gather(2, columns[..., None].expand(-1, -1, -1, self.v.shape[-1]))

    def rows(self, start: int, stop: int) -> KVCache:
        """Sequences [start, stop) of the batch: views, so writes land in this cache."""
        stored = None if self.stored is None else self.stored.rows(start, stop)
        return KVCache(self.k[start:stop], self.v[start:stop], stored)

    def parts(self) -> dict[str, Tensor]:
        """The tensors that hold it, for storing it on a tier."""
        return {"k": self.k, "v": self.v}


class Readout(Protocol):
    """Reduces the logits of a step's head rows, which arrive a block of rows and vocabulary at a time."""

    def update(self, logits: Tensor, rows: slice, first_token: int) -> None:
        """logits: (m, w) float32 for head rows `rows` and token ids [first_token, first_token + w)."""

    def result(self) -> Tensor: ...

    def finite(self) -> Tensor:
        """0-d bool: whether the logits reduced so far were finite (NaN and +inf always show)."""


class NoReadout:
    """The readout of a step whose layers stop before the head (GPTQ's calibration passes): any
    logits reaching it are a caller's mistake, not something to reduce."""

    def update(self, logits: Tensor, rows: slice, first_token: int) -> None:
        raise ValueError("this step reads no logits: it was built without a readout")

    def result(self) -> Tensor:
        raise ValueError("this step reads no logits: it was built without a readout")

    def finite(self) -> Tensor:
        return torch.ones((), dtype=torch.bool)


@dataclass
class Step:
    """One forward pass over a left-padded batch: everything a layer needs besides its weights."""

    ids: Tensor  # (b, s) token ids
    positions: Tensor  # (b, s) position of each token within its own sequence
    pads: tuple[int, ...]  # left padding of each sequence: cache columns before its first token
    attn_mask: Tensor | None  # packed rows: (b, 1, s, cache_start + s) bool, True = may attend
    cache_start: int  # column of the first token of this step in the KV cache
    head_rows: Tensor  # (n,) indices into the flattened (b * s) tokens that need logits
    readout: Readout  # what becomes of those logits
    rope: tuple[Tensor, Tensor] | None = None  # cos, sin: (b, s, head_dim), for rotary families
    window: int | None = None  # sliding attention window, in columns
    attn_sparsity: float = 1.0  # decoding: the share of earlier positions whose values each query reads
    gemm_rows: int = 1  # the fewest rows a matrix product is computed with (see `linear`)

    @classmethod
    def of(
        cls,
        model: Model,
        dtype: torch.dtype,
        ids: Tensor,
        positions: Tensor,
        *,
        pads: tuple[int, ...] | None = None,
        attn_mask: Tensor | None = None,
        cache_start: int = 0,
        head_rows: Tensor | None = None,
        readout: Readout | None = None,
        gemm_rows: int = 1,
    ) -> Step:
        """A step of `model` in `dtype`, with the model's rotary tables and attention window: no
        padding, head rows or readout unless given (a step that stops before the head reads none)."""
        return cls(
            ids,
            positions,
            (0,) * ids.shape[0] if pads is None else pads,
            attn_mask,
            cache_start,
            torch.empty(0, dtype=torch.long, device=ids.device) if head_rows is None else head_rows,
            NoReadout() if readout is None else readout,
            model.rotary(positions, dtype) if model.rotary else None,
            model.sliding_window,
            gemm_rows=gemm_rows,
        )

    @property
    def sparse(self) -> bool:
        """Whether attention reads only some cached values: decoding steps (one query per
        sequence) under `attn_sparsity` < 1."""
        return self.attn_sparsity < 1 and self.ids.shape[1] == 1

    def rows(self, start: int, stop: int) -> Step:
        """Sequences [start, stop) of the batch, for the layers that read no head rows (attention, MLP)."""
        rope = None if self.rope is None else (self.rope[0][start:stop], self.rope[1][start:stop])
        mask = None if self.attn_mask is None else self.attn_mask[start:stop]
        return replace(
            self,
            ids=self.ids[start:stop],
            positions=self.positions[start:stop],
            pads=self.pads[start:stop],
            attn_mask=mask,
            rope=rope,
        )


@dataclass(frozen=True)
class Layer:
    name: str  # e.g. "layers.3.attention"; unique within the model
    kind: LayerKind
    params: Mapping[str, Param]
    forward: Callable[[Weights, Tensor | None, Step, Cache | None], Tensor]
    block: int | None = None  # the transformer block an attention layer's KV cache belongs to

    def nbytes(self, dtype: torch.dtype) -> int:
        return sum(p.nbytes(dtype) for p in self.params.values())


@dataclass(frozen=True)
class Model:
    """A family's model as data: its layers plus the few facts an engine needs to run them."""

    family: str
    layers: tuple[Layer, ...]
    num_blocks: int
    kv_heads: int
    head_dim: int
    hidden_size: int  # the width of the hidden states between blocks
    vocab_size: int
    context_length: int
    sliding_window: int | None = None
    rotary: Callable[[Tensor, torch.dtype], tuple[Tensor, Tensor]] | None = None
    ignored_sources: frozenset[str] = frozenset()  # checkpoint tensors we deliberately leave out

    def nbytes(self, dtype: torch.dtype) -> int:
        """The weights' bytes, a tied tensor (built from the same checkpoint tensors) counted once."""
        params = {p.sources: p for layer in self.layers for p in layer.params.values()}
        return sum(p.nbytes(dtype) for p in params.values())


class PackedWeight(Protocol):
    """A weight matrix that an engine hands over still packed, multiplying itself (int4 codes:
    `flexeval.quantization.int4mm`); its rows come out the same among any number of rows."""

    def linear(self, x: Tensor, bias: Tensor | None) -> Tensor: ...


def linear(x: Tensor, weight: Tensor | PackedWeight, bias: Tensor | None, rows: int) -> Tensor:
    """`F.linear` over at least `rows` rows: a product of fewer is padded with zero rows, which are
    dropped after, because a BLAS may compute very few rows with other kernels, and so other
    rounding, than the same rows among more (`flexeval.reproducible` finds `rows` per machine)."""
    if not isinstance(weight, Tensor):
        return weight.linear(x, bias)
    m = x.numel() // x.shape[-1]
    if m >= rows or m == 0:
        return F.linear(x, weight, bias)
    flat = x.reshape(m, x.shape[-1])  # (m, d)
    padded = torch.cat((flat, flat.new_zeros(rows - m, flat.shape[1])))  # (rows, d)
    return F.linear(padded, weight, bias)[:m].reshape(*x.shape[:-1], -1)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm computed in fp32 and scaled in the input dtype, as the Llama reference does."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rotary_tables(positions: Tensor, inv_freq: Tensor, scale: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables for rotary embeddings at the given positions: (b, s) -> (b, s, head_dim)."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)  # (b, s, head_dim / 2)
    angles = torch.cat((freqs, freqs), dim=-1)
    return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (b, h, s, d) queries or keys by (b, s, d) tables, half-split convention."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def split_heads(x: Tensor, head_dim: int) -> Tensor:
    """(b, s, h * d) -> (b, h, s, d)"""
    b, s, _ = x.shape
    return x.view(b, s, -1, head_dim).transpose(1, 2)


def embed_tokens(w: Weights, name: str, ids: Tensor) -> Tensor:
    """Look token ids up in the embedding rows this layer was given (all of them without w[ROWS])."""
    rows = w.get(ROWS)
    return F.embedding(ids if rows is None else torch.searchsorted(rows.to(ids.device), ids), w[name])


def unembed(w: Weights, x: Tensor, step: Step, cache: Cache | None) -> Tensor:
    """Logits of the head rows x (n, d), into the step's readout: for the whole vocabulary, or for
    the slice w[ROWS] when the unembedding streams (`Policy.stream_unembedding`).

    The full (n, vocab) logits would not fit in memory at evaluation batch sizes, so they are
    produced a chunk of rows at a time (see `LOGITS_CHUNK_BYTES`). Returns x unchanged: the next
    slice needs the same rows.
    """
    table, first = w["lm_head"], int(w[ROWS][0]) if ROWS in w else 0
    rows = max(LOGITS_CHUNK_ROWS, LOGITS_CHUNK_BYTES // (table.shape[0] * 4))
    for i in range(0, x.shape[0], rows):
        chunk = slice(i, min(i + rows, x.shape[0]))
        step.readout.update(linear(x[chunk], table, None, step.gemm_rows).float(), chunk, first)
    return x


def unembedding(vocab_size: int, width: int, source: str) -> Layer:
    """The output projection to the vocabulary, the same in every family."""
    return Layer("unembed", "unembed", {"lm_head": Param((vocab_size, width), (source,), by_token=True)}, unembed)


def gather_rows(h: Tensor, step: Step) -> Tensor:
    """(b, s, d) -> (n, d): the hidden states of the tokens that need logits."""
    return h.flatten(0, 1).index_select(0, step.head_rows)

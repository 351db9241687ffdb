"""A KV cache kept quantized (FlexGen's compressed cache), on whichever tier holds it.

Groups run along `head_dim`, so each cached token's keys and values form their own groups:
appending a step's tokens quantizes just those columns, and what was stored is never quantized
again (re-quantizing dequantized values would drift a little at every step). Attention reads
the earlier columns dequantized, in the model's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import Tensor

from flexeval.models.common import StoredValues
from flexeval.quantization.compression import (
    Quantized,
    dequantize,
    packed_bytes,
    part_name,
    quantize,
    scale_dtype,
)
from flexeval.quantization.config import CompressionConfig


class QuantizedKVCache:
    """A `Cache` over quantized keys and values.

    With `stored`, the values stay on their tier and `v` holds only the columns written since
    the cache was fetched (see `KVCache`)."""

    def __init__(self, k: Quantized, v: Quantized, stored: StoredValues | None = None) -> None:
        self.k, self.v, self.stored = k, v, stored

    @classmethod
    def empty(
        cls, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, config: CompressionConfig
    ) -> QuantizedKVCache:
        """Room for (b, kv_heads, max_len, head_dim) keys and values."""
        groups = -(-shape[-1] // config.group_size)

        def one() -> Quantized:
            codes = torch.zeros(
                (*shape[:-1], packed_bytes(shape[-1], config.num_bits)),
                dtype=torch.uint8,
                device=device,
            )
            scale = torch.zeros((*shape[:-1], groups), dtype=scale_dtype(dtype), device=device)
            return Quantized(codes, scale, torch.zeros(scale.shape, dtype=dtype, device=device), shape, dtype, config)

        return cls(one(), one())

    @classmethod
    def from_parts(
        cls,
        parts: Mapping[str, Tensor],
        head_dim: int,
        dtype: torch.dtype,
        config: CompressionConfig,
        stored: StoredValues | None = None,
    ) -> QuantizedKVCache:
        def one(name: str) -> Quantized:
            scale = parts[part_name(name, "scale")]
            return Quantized.from_parts(parts, name, (*scale.shape[:-1], head_dim), dtype, config)

        return cls(one("k"), one("v"), stored)

    @property
    def device(self) -> torch.device:
        return self.k.codes.device

    def write(self, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Quantize new keys/values into columns [start, start + s); return all columns so far:
        the earlier ones dequantized, the new ones as computed (FlexGen's order: a step attends
        to its own keys exactly, and a prompt's prefill is not approximated at all)."""
        self.store(start, k, v)
        if start == 0:
            return k, v
        return self.keys(start, k), torch.cat((dequantize(_columns(self.v, start)), v), dim=2)

    def store(self, start: int, k: Tensor, v: Tensor) -> None:
        end = start + k.shape[2]
        for stored, new in ((self.k, k), (self.v, v)):
            q = quantize(new, stored.config)
            stored.codes[:, :, start:end] = q.codes
            stored.scale[:, :, start:end] = q.scale
            stored.minimum[:, :, start:end] = q.minimum

    def keys(self, start: int, k: Tensor) -> Tensor:
        """After `store(start, k, v)`: the earlier keys dequantized, then the new ones as computed."""
        return k if start == 0 else torch.cat((dequantize(_columns(self.k, start)), k), dim=2)

    def values_at(self, columns: Tensor) -> Tensor:
        """(b, kv_heads, m) column indices -> (b, kv_heads, m, head_dim): only those values dequantized."""

        def take(part: Tensor) -> Tensor:
            return part.gather(2, columns[..., None].expand(-1, -1, -1, part.shape[-1]))

        v = self.v
        shape = (*columns.shape, v.shape[-1])
        if self.stored is None:
            return dequantize(
                replace(v, codes=take(v.codes), scale=take(v.scale), minimum=take(v.minimum), shape=shape)
            )
        return dequantize(Quantized.from_parts(self.stored.at(columns), "v", shape, v.dtype, v.config))

    def rows(self, start: int, stop: int) -> QuantizedKVCache:
        """Sequences [start, stop) of the batch: views, so writes land in this cache."""
        stored = None if self.stored is None else self.stored.rows(start, stop)
        return QuantizedKVCache(_rows(self.k, start, stop), _rows(self.v, start, stop), stored)

    def parts(self) -> dict[str, Tensor]:
        return self.k.to_parts("k") | self.v.to_parts("v")


def _columns(q: Quantized, end: int) -> Quantized:
    return replace(
        q,
        codes=q.codes[:, :, :end],
        scale=q.scale[:, :, :end],
        minimum=q.minimum[:, :, :end],
        shape=(*q.shape[:2], end, q.shape[3]),
    )


def _rows(q: Quantized, start: int, stop: int) -> Quantized:
    return replace(
        q,
        codes=q.codes[start:stop],
        scale=q.scale[start:stop],
        minimum=q.minimum[start:stop],
        shape=(stop - start, *q.shape[1:]),
    )

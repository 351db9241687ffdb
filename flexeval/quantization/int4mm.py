"""4-bit weights multiplied as codes, by torch's int4 weight-packed CPU kernel, when decoding.

A decoding step multiplies each weight matrix by one row per sequence, so turning 4-bit codes into
a bf16 copy first costs more than the product itself. On a Llama-2-7B MLP matrix (11,008 x 4,096,
groups of 64, Zen 4, 2 threads): dequantizing takes 35 ms and the bf16 product of 16 rows 7 ms,
while `_weight_int4pack_mm_for_cpu` multiplies the codes by 16 rows in 9 ms (by 1 row: 1.3 ms
against 6 ms for the bf16 product alone). It scales with the rows, though (128 rows: 72 ms
against 30 ms), so a prefill's hundreds of rows still go through a dequantized copy.

Which path a product takes depends only on the step (decoding or not), never on the batch: the
kernel computes each row the same among any number of others (probed in `available`), so a
sequence keeps its bits under every batch shape and placement (see `flexeval.reproducible`).

The kernel reads a weight as (q - 8) scale + zero per group, scale and zero in bf16, laid out
(groups, out, 2). Tiled codes are stored for it (`compression.pack_tiles`, grids in bf16 and
(groups, out)), so making its operands at each use is one interleaving pass over the grids (12 ms
a decoding step for Qwen2.5-1.5B, where converting fp16 grids stored by rows took 68 ms). Its zero, minimum +
8 scale rounded to bf16, is the one value that differs from what dequantizing computes with.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from flexeval.quantization.compression import TILE_GRID, Quantized, dequantize, quantize
from flexeval.quantization.config import CompressionConfig

DTYPE = TILE_GRID  # it computes in its grids' dtype; its fp32 path is a slow reference (40 ms for 1 row)
MIDPOINT = 8  # the kernel's codes are signed around it


@dataclass(frozen=True)
class Int4Weight:
    """A weight matrix ready for the kernel: its tiled codes and, per group of inputs, bf16
    (scale, zero) pairs. Models multiply it through `linear` (see `flexeval.models.common`)."""

    codes: Tensor  # (out, in / 2) uint8, in `compression.pack_tiles`'s layout
    scale_zeros: Tensor  # (in / group_size, out, 2) bf16
    group_size: int

    @classmethod
    def of(cls, q: Quantized) -> Int4Weight:
        pairs = torch.stack((q.scale, torch.add(q.minimum, q.scale, alpha=MIDPOINT)), -1)  # (groups, out, 2)
        return cls(q.codes, pairs, q.config.group_size)

    def linear(self, x: Tensor, bias: Tensor | None) -> Tensor:
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.codes, self.group_size, self.scale_zeros)
        if bias is not None:
            y = y + bias
        return y.view(*x.shape[:-1], -1)


def usable(q: Quantized) -> bool:
    """Whether this weight can be multiplied by the kernel here."""
    return q.config.tiled and q.dtype == DTYPE and q.codes.device.type == "cpu" and available()


@cache
def available() -> bool:
    """Whether this torch has the kernel, reads `pack_tiles`'s layout as we write it, and computes
    each row alike among any number of rows (its layout is torch's internal business)."""
    generator = torch.Generator().manual_seed(0)
    config = CompressionConfig(4, 32, 1, kernel="int4mm")
    q = quantize((torch.randn(128, 64, generator=generator) * 0.05).to(DTYPE), config)
    x = torch.randn(9, 64, generator=generator).to(DTYPE)
    try:
        weight = Int4Weight.of(q)
        rows = weight.linear(x, None)
        alone = torch.cat([weight.linear(x[i : i + 1], None) for i in range(len(x))])
    except (AttributeError, NotImplementedError, RuntimeError):
        return False
    expected = x.float() @ dequantize(q).float().T
    return torch.equal(rows, alone) and bool(torch.allclose(rows.float(), expected, rtol=0.02, atol=0.02))

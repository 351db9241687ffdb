"""llama.cpp's block formats kept as shipped: a GGUF model's weights stored, moved and counted as
the file's own bytes, and dequantized on the compute device right before use.

A row of a GGUF matrix is a run of blocks along the input dimension, each block a scale (and a
minimum, or sub-block scales under a 16-bit super-scale for the K formats) plus packed integer
codes. Rows stay independent, so a token table's rows and a fused projection's row ranges are
still plain row slices. The kernels below compute every value with the same operations, in the
same order and precision, as the `gguf` package's reference dequantizer (fp16 scales widened to
fp32, each product and difference rounded once, no fused multiply-add), so the weights are
bitwise the ones a dense conversion of the file would hold: Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K.
Other formats (Q5_1, Q2_K, Q3_K, Q5_K) are dequantized once at load and kept dense instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import Tensor

DEQUANTIZE_BLOCKS = 2**14  # blocks dequantized at a time: their temporaries stay in the CPU's caches


@dataclass(frozen=True)
class Blocks:
    """A weight as GGUF blocks: one (rows, bytes per row) uint8 segment per source tensor (a
    fused q/k/v projection may mix formats), stacked along the rows."""

    segments: tuple[Tensor, ...]
    formats: tuple[str, ...]  # each segment's GGML type name
    shape: tuple[int, ...]
    dtype: torch.dtype  # what dequantizing makes

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.segments)


def native(format_name: str) -> bool:
    """Whether weights of this GGML type are kept as blocks (else dense)."""
    return format_name in KERNELS


def row_bytes(format_name: str, columns: int) -> int:
    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[format_name]]
    return columns // block * block_bytes


def dequantize(b: Blocks, out: Tensor | None = None) -> Tensor:
    """The weight in its dtype, into `out` when given (see `compression.dequantize` for why)."""
    device = b.segments[0].device
    out = torch.empty(b.shape, dtype=b.dtype, device=device) if out is None else out
    flat = out.view(-1, b.shape[-1])
    start = 0
    for segment, name in zip(b.segments, b.formats):
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
        rows = segment.shape[0]
        blocks = segment.reshape(-1, block_bytes)
        values = flat[start : start + rows].view(-1, block)
        for first in range(0, blocks.shape[0], DEQUANTIZE_BLOCKS):
            part = slice(first, first + DEQUANTIZE_BLOCKS)
            values[part] = KERNELS[name](blocks[part])
        start += rows
    return out


def _half(blocks: Tensor, start: int) -> Tensor:
    """The fp16 field at byte `start` of each block, widened to fp32: (n, 1)."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: Tensor) -> Tensor:
    """(n, k) bytes -> (n, 2k) codes: every byte's low nibble first, then every high nibble."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1)


def _q4_0(blocks: Tensor) -> Tensor:
    return _half(blocks, 0) * (_nibbles(blocks[:, 2:]).float() - 8)


def _q4_1(blocks: Tensor) -> Tensor:
    return (_half(blocks, 0) * _nibbles(blocks[:, 4:]).float()).add_(_half(blocks, 2))


def _q5_0(blocks: Tensor) -> Tensor:
    high = blocks[:, 2:6].contiguous().view(torch.int32)  # 32 fifth bits, value j's at bit j
    fifth = (high >> torch.arange(32, dtype=torch.int32, device=blocks.device)) & 1
    codes = _nibbles(blocks[:, 6:]).to(torch.int32) | (fifth << 4)
    return _half(blocks, 0) * (codes - 16).float()


def _q8_0(blocks: Tensor) -> Tensor:
    return blocks[:, 2:].contiguous().view(torch.int8).float() * _half(blocks, 0)


def _q4_k(blocks: Tensor) -> Tensor:
    n = blocks.shape[0]
    scales = blocks[:, 4:16].reshape(n, 3, 4)
    low, mid, high = scales[:, 0], scales[:, 1], scales[:, 2]
    sc = torch.cat((low & 0x3F, (high & 0x0F) | ((low >> 2) & 0x30)), dim=-1).float()  # (n, 8)
    mn = torch.cat((mid & 0x3F, (high >> 4) | ((mid >> 2) & 0x30)), dim=-1).float()
    d = (_half(blocks, 0) * sc).unsqueeze(-1)
    dm = (_half(blocks, 2) * mn).unsqueeze(-1)
    qs = blocks[:, 16:].reshape(n, 4, 32)
    codes = torch.stack((qs & 0x0F, qs >> 4), dim=2).reshape(n, 8, 32).float()
    return (d * codes).sub_(dm).reshape(n, 256)


def _q6_k(blocks: Tensor) -> Tensor:
    n = blocks.shape[0]
    ql = blocks[:, :128].reshape(n, 2, 64)
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)
    low = torch.stack((ql & 0x0F, ql >> 4), dim=2).reshape(n, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device).view(1, 1, 4, 1)
    high = ((qh >> shifts) & 0x03).reshape(n, 8, 32)
    codes = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
    d = (_half(blocks, 208) * scales).unsqueeze(-1)
    return (d * codes).reshape(n, 256)


KERNELS: dict[str, Callable[[Tensor], Tensor]] = {
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q8_0": _q8_0,
    "Q4_K": _q4_k,
    "Q6_K": _q6_k,
}

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

DEQUANTIZE_VALUES = 2**18  # values dequantized at a time (see `dequantize`)


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
    """The weight in its dtype, into `out` when given (see `compression.dequantize` for why).

    A few thousand blocks at a time, so that the kernels' fp32 temporaries stay in the CPU's
    caches; the last of their operations writes into `out` itself when it is fp32."""
    device = b.segments[0].device
    out = torch.empty(b.shape, dtype=b.dtype, device=device) if out is None else out
    flat = out.view(-1, b.shape[-1])
    start = 0
    for segment, name in zip(b.segments, b.formats):
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
        rows = segment.shape[0]
        blocks = segment.reshape(-1, block_bytes)
        values = flat[start : start + rows].view(-1, block)
        step = max(1, DEQUANTIZE_VALUES // block)
        for first in range(0, blocks.shape[0], step):
            part = slice(first, first + step)
            target = values[part] if values.dtype == torch.float32 else None
            result = KERNELS[name](blocks[part], target)
            if target is None:
                values[part] = result
        start += rows
    return out


def _half(blocks: Tensor, start: int) -> Tensor:
    """The fp16 field at byte `start` of each block, widened to fp32: (n, 1)."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: Tensor) -> tuple[Tensor, Tensor]:
    """(n, k) bytes (k a multiple of 8) -> every byte's low nibble, every byte's high nibble, each
    (n, k): computed on 64-bit words, eight bytes an operation."""
    words = qs.contiguous().view(torch.int64)
    return (words & LOW_NIBBLES).view(torch.uint8), ((words >> 4) & LOW_NIBBLES).view(torch.uint8)


def _scaled(scale: Tensor, codes: Tensor, out: Tensor | None) -> Tensor:
    """scale * codes in fp32 (codes of any integer type, scale broadcast), into `out` if given."""
    values = codes.float()
    return torch.mul(scale, values, out=values if out is None else out.view(values.shape))


def _q4_0(blocks: Tensor, out: Tensor | None) -> Tensor:
    low, high = _nibbles(blocks[:, 2:])
    return _scaled(_half(blocks, 0), torch.cat((low, high), dim=-1).to(torch.int8) - 8, out)


def _q4_1(blocks: Tensor, out: Tensor | None) -> Tensor:
    return _scaled(_half(blocks, 0), torch.cat(_nibbles(blocks[:, 4:]), dim=-1), out).add_(_half(blocks, 2))


def _q5_0(blocks: Tensor, out: Tensor | None) -> Tensor:
    high = blocks[:, 2:6].contiguous().view(torch.int32)  # 32 fifth bits, value j's at bit j
    fifth = ((high >> torch.arange(32, dtype=torch.int32, device=blocks.device)) & 1).to(torch.uint8)
    codes = torch.cat(_nibbles(blocks[:, 6:]), dim=-1) | (fifth << 4)
    return _scaled(_half(blocks, 0), codes.to(torch.int8) - 16, out)


def _q8_0(blocks: Tensor, out: Tensor | None) -> Tensor:
    return _scaled(_half(blocks, 0), blocks[:, 2:].contiguous().view(torch.int8), out)


def _q4_k(blocks: Tensor, out: Tensor | None) -> Tensor:
    n = blocks.shape[0]
    scales = blocks[:, 4:16].reshape(n, 3, 4)
    low, mid, high = scales[:, 0], scales[:, 1], scales[:, 2]
    sc = torch.cat((low & 0x3F, (high & 0x0F) | ((low >> 2) & 0x30)), dim=-1).float()  # (n, 8)
    mn = torch.cat((mid & 0x3F, (high >> 4) | ((mid >> 2) & 0x30)), dim=-1).float()
    d = (_half(blocks, 0) * sc).unsqueeze(-1)
    dm = (_half(blocks, 2) * mn).unsqueeze(-1)
    lo, hi = (x.view(n, 4, 1, 32) for x in _nibbles(blocks[:, 16:]))
    codes = torch.cat((lo, hi), dim=2).view(n, 8, 32)  # sub-block 2i: chunk i's low nibbles, 2i+1: its high
    return _scaled(d, codes, out).sub_(dm).view(n, 256)


def _q6_k(blocks: Tensor, out: Tensor | None) -> Tensor:
    n = blocks.shape[0]
    lo, hi = (x.view(n, 2, 1, 64) for x in _nibbles(blocks[:, :128]))
    low = torch.cat((lo, hi), dim=2).view(n, 2, 4, 32)  # half h, quarter q: 32 low 4-bit parts
    qh = blocks[:, 128:192].contiguous().view(torch.int64).view(n, 2, 1, 4)
    two_bits = torch.tensor([0, 2, 4, 6], dtype=torch.int64, device=blocks.device).view(1, 1, 4, 1)
    high = ((qh >> two_bits) & LOW_TWO_BITS).view(torch.uint8).view(n, 2, 4, 32)
    codes = (low | (high << 4)).view(torch.int8) - 32
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
    d = (_half(blocks, 208) * scales).unsqueeze(-1)
    return _scaled(d, codes.view(n, 16, 16), out).view(n, 256)


LOW_NIBBLES = 0x0F0F0F0F0F0F0F0F
LOW_TWO_BITS = 0x0303030303030303


KERNELS: dict[str, Callable[[Tensor, Tensor | None], Tensor]] = {
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q8_0": _q8_0,
    "Q4_K": _q4_k,
    "Q6_K": _q6_k,
}

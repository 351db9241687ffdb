"""Group-wise asymmetric quantization (FlexGen's): `num_bits` per value, densely packed, and one
scale and minimum per group of `group_size` values along `group_dim`.

A group's values are coded as round((x - minimum) / scale) in [0, 2^bits - 1], so each value is
recovered to within half a step, (max - min) / (2 (2^bits - 1)). The scale is stored in fp16:
rounded *down*, which makes the steps a little finer while the 2^bits - 1 of them still span
the group to within half a step (for up to 9 bits), or rounded up below fp16's normal range,
where its absolute error is tiny. The minimum is stored in the tensor's own dtype, so that it is
exact: in fp16 (FlexGen's choice, which assumes fp16 models) the minimum of fp32 values rounds
by up to |min| * 2^-11, more than half a step whenever a group sits far from zero relative to
its range (8 bits: |min| above about 4 ranges), and a constant group could not come back
exactly. For fp16 and bf16 models the minimum takes two bytes as in FlexGen; for fp32 four,
which keeps 4-bit groups of 64 at 0.297 of the fp16 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flexeval.errors import FlexevalError

BITS = (2, 3, 4, 8)
HALF = torch.float16


@dataclass(frozen=True)
class CompressionConfig:
    num_bits: int = 4
    group_size: int = 64
    group_dim: int = 0  # the dimension that groups run along (weights: 0, FlexGen's default)

    def __post_init__(self) -> None:
        if self.num_bits not in BITS:
            raise FlexevalError(f"compression: num_bits must be one of {BITS}, got {self.num_bits!r}")
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1:
            raise FlexevalError(f"compression: group_size must be a positive integer, got {self.group_size!r}")
        if not isinstance(self.group_dim, int) or isinstance(self.group_dim, bool):
            raise FlexevalError(f"compression: group_dim must be an integer, got {self.group_dim!r}")

    @property
    def levels(self) -> int:
        return 2**self.num_bits - 1


@dataclass(frozen=True)
class Quantized:
    """A tensor as packed codes plus per-group scale (fp16) and minimum (its dtype); its shape and dtype."""

    codes: Tensor  # uint8, densely packed
    scale: Tensor  # fp16, (..., groups) over the other dimensions
    minimum: Tensor  # the tensor's dtype, like scale
    shape: tuple[int, ...]
    dtype: torch.dtype
    config: CompressionConfig

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes + self.minimum.nbytes


def quantize(x: Tensor, config: CompressionConfig) -> Quantized:
    dim = _dim(x, config)
    groups = _grouped(x.float(), dim, config.group_size)  # (..., groups, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    if not torch.isfinite(low).all() or not torch.isfinite(high).all():
        raise FlexevalError("compression: values are not finite; cannot quantize")
    scale, minimum = _parameters(low, high, config.levels, x.dtype)
    step = torch.where(scale > 0, scale.float(), 1.0)[..., None]
    codes = ((groups - minimum.float()[..., None]) / step).round_().clamp_(0, config.levels).to(torch.uint8)
    return Quantized(pack(codes.flatten(), config.num_bits), scale, minimum, tuple(x.shape), x.dtype, config)


def dequantize(q: Quantized) -> Tensor:
    config = q.config
    dim = config.group_dim % len(q.shape)
    grouped_shape = (*q.scale.shape, config.group_size)
    codes = unpack(q.codes, config.num_bits, torch.Size(grouped_shape).numel()).view(grouped_shape)
    values = torch.addcmul(q.minimum.float()[..., None], codes.float(), q.scale.float()[..., None])
    values = values.flatten(-2).narrow(-1, 0, q.shape[dim])  # drop the last group's padding
    return values.movedim(-1, dim).to(q.dtype)


def pack(codes: Tensor, bits: int) -> Tensor:
    """(n,) uint8 codes below 2^bits -> bytes holding them densely, first code in the low bits.

    2, 4 and 8 bits tile a byte; 3-bit codes go eight to three bytes."""
    per = 8 if bits == 3 else 8 // bits  # codes per packing unit
    codes = torch.nn.functional.pad(codes, (0, -len(codes) % per)).view(-1, per).to(torch.int32)
    shifts = torch.arange(per, dtype=torch.int32, device=codes.device) * bits
    words = (codes << shifts).sum(-1, dtype=torch.int32)  # (units,) each holding per * bits bits
    unit_bytes = per * bits // 8
    byte_shifts = torch.arange(unit_bytes, dtype=torch.int32, device=codes.device) * 8
    return ((words[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).flatten()


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """The first n codes of `pack`'s bytes, as uint8."""
    per = 8 if bits == 3 else 8 // bits
    unit_bytes = per * bits // 8
    byte_shifts = torch.arange(unit_bytes, dtype=torch.int32, device=packed.device) * 8
    words = (packed.view(-1, unit_bytes).to(torch.int32) << byte_shifts).sum(-1, dtype=torch.int32)
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    return ((words[:, None] >> shifts) & (2**bits - 1)).to(torch.uint8).flatten()[:n]


def _dim(x: Tensor, config: CompressionConfig) -> int:
    if not -x.dim() <= config.group_dim < x.dim():
        raise FlexevalError(f"compression: group_dim {config.group_dim} is out of range for a {x.dim()}-d tensor")
    return config.group_dim % x.dim()


def _grouped(x: Tensor, dim: int, size: int) -> Tensor:
    """x with `dim` last, cut into groups of `size`; a short last group repeats its last value,
    which changes neither its minimum nor its maximum."""
    x = x.movedim(dim, -1)
    pad = -x.shape[-1] % size
    if pad:
        x = torch.cat((x, x[..., -1:].expand(*x.shape[:-1], pad)), dim=-1)
    return x.reshape(*x.shape[:-1], -1, size)


def _parameters(low: Tensor, high: Tensor, levels: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(fp16 scale, minimum in `dtype`) per group: every value in [low, high] within half an exact
    step, (high - low) / (2 levels), of minimum + k * scale for some k in [0, levels]."""
    exact = (high - low) / levels
    if bool((exact > torch.finfo(HALF).max).any()):
        raise FlexevalError("compression: values too far apart for fp16 scales (a step above 65504); cannot quantize")
    scale = exact.to(HALF)
    normal = scale >= torch.finfo(HALF).tiny
    scale = torch.where(normal & (scale.float() > exact), _next(scale, 0.0), scale)  # finer steps
    scale = torch.where(~normal & (scale.float() < exact), _next(scale, float("inf")), scale)  # ulp below 6e-8
    return scale, low.to(dtype)  # low is one of the tensor's values: exact in its dtype


def _next(h: Tensor, toward: float) -> Tensor:
    """The fp16 neighbour of each value in the direction of `toward`."""
    return torch.nextafter(h, torch.full_like(h, toward))

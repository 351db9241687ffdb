"""Group-wise asymmetric quantization (FlexGen's): `num_bits` per value, densely packed, and one
scale and minimum per group of `group_size` values along `group_dim`.

A group's values are coded as round((x - minimum) / scale) in [0, 2^bits - 1], so each value is
recovered to within half a step, (max - min) / (2 (2^bits - 1)). Scale and minimum are stored in
the tensor's own dtype, as FlexGen stores them, except that 16-bit tensors all take fp16 scales
(bf16's 8-bit significand would coarsen steps by up to 2^-9). The minimum is then exact (one of
the group's values), so constant groups come back exactly. An fp32 model keeps fp32 scales:
rounding them to fp16 moves a 4-bit model's perplexity by several percent (SmolLM2-135M on
LAMBADA, 4-bit groups of 64: 150.0 with exact steps, FlexGen's quantizer in fp32; 143.8 with
fp16 steps), so fp16 scales would not compute what FlexGen computes. Groups of 64 then take 5
bits per weight in fp32 and 4.5 in 16 bits (0.28 of the 16-bit bytes). An fp16 scale rounds to
the nearest fp16 unless that rounds it up and some value of its group would then land more than
half an exact step from its code's value (under 1 % of groups); those round it down, to finer
steps whose 2^bits - 1 still span the group to within half a step (up to 9 bits). Below fp16's
normal range the scale rounds up, where its absolute error is tiny.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from flexeval.errors import FlexevalError
from flexeval.quantization.config import CompressionConfig

TILE_ROWS = 64  # output rows per tile of the int4 kernel's layout (see `pack_tiles`)
TILE_GRID = torch.bfloat16  # what tiled codes keep their scales and minima in: the kernel's dtype
HALF = torch.float16
DEQUANTIZE_VALUES = 2**20  # values that `dequantize` unpacks at a time
QUANTIZE_VALUES = 2**22  # values that `quantize_rows` reads and quantizes at a time
CLIP_RATIOS = torch.linspace(1.0, 0.5, 21).tolist()  # the ranges that the "mse" fit tries, as shares of min-max


PARTS = ("codes", "scale", "minimum")  # the tensors of a `Quantized`; stored as `name#codes`, ...


def part_name(name: str, part: str | int) -> str:
    """The name one of several tensors that together hold `name` is stored under: its quantized parts
    (`name#codes`, ...), or each source's llama.cpp blocks (`name#0`, ...)."""
    return f"{name}#{part}"


def split_part_name(stored: str) -> tuple[str, str]:
    """(name, part) of a name `part_name` made; part is "" for a tensor stored whole."""
    name, _, part = stored.partition("#")
    return name, part


@dataclass(frozen=True)
class Quantized:
    """A tensor as packed codes plus per-group scale and minimum; its shape and dtype."""

    codes: Tensor  # uint8, densely packed (tiled: `pack_tiles`)
    scale: Tensor  # `grid_dtypes(dtype, config)[0]`, (..., groups) over the other dimensions; tiled: (groups, out)
    minimum: Tensor  # `grid_dtypes(dtype, config)[1]`, like scale
    shape: tuple[int, ...]
    dtype: torch.dtype
    config: CompressionConfig

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes + self.minimum.nbytes

    @staticmethod
    def part_names(name: str) -> list[str]:
        """The names `to_parts` stores a tensor called `name` under."""
        return [part_name(name, part) for part in PARTS]

    def to_parts(self, name: str) -> dict[str, Tensor]:
        """Its tensors, named for storing beside others (see `part_name`)."""
        return {part_name(name, part): getattr(self, part) for part in PARTS}

    @classmethod
    def from_parts(
        cls,
        parts: Mapping[str, Tensor],
        name: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        config: CompressionConfig,
    ) -> Quantized:
        """The tensor `to_parts(name)` stored, from those parts."""
        return cls(*(parts[n] for n in cls.part_names(name)), shape, dtype, config)


def quantize(x: Tensor, config: CompressionConfig) -> Quantized:
    """Codes keep the tensor's own layout, packed along its last dimension: dequantizing needs no
    transpose, and each index of the leading dimensions (a row of a token table, a token of a
    KV cache) stays readable on its own when groups run along the last one. The int4 kernel's
    codes (`config.tiled`) are laid out as it reads them instead, and their grids as (groups, out)."""
    dim = _dim(x.dim(), config)
    if config.tiled and not tileable(tuple(x.shape), config):
        raise FlexevalError(f"compression: kernel int4mm cannot tile a tensor of shape {tuple(x.shape)}")
    groups = _grouped(x.float(), dim, config.group_size)  # (pre..., groups, group_size, post...)
    low, high = groups.amin(dim + 1), groups.amax(dim + 1)
    if not torch.isfinite(low).all() or not torch.isfinite(high).all():
        raise FlexevalError("compression: values are not finite; cannot quantize")
    scale, minimum, codes = _fit(groups, low, high, dim, config.levels, x.dtype)
    if config.fit == "mse":
        error = _squared_error(groups, codes, scale, minimum, dim)
        for ratio in CLIP_RATIOS[1:]:
            *candidate, candidate_codes = _fit(groups, low * ratio, high * ratio, dim, config.levels, x.dtype)
            candidate_error = _squared_error(groups, candidate_codes, *candidate, dim)
            better = candidate_error < error
            scale, minimum = torch.where(better, candidate[0], scale), torch.where(better, candidate[1], minimum)
            codes = torch.where(better.unsqueeze(dim + 1), candidate_codes, codes)
            error = torch.minimum(error, candidate_error)
    if config.fit == "gptq":
        scale_as, minimum_as = grid_dtypes(x.dtype, config)
        scale, minimum = scale.to(scale_as), minimum.to(minimum_as)
        if not (torch.isfinite(scale).all() and torch.isfinite(minimum).all()):
            raise FlexevalError("compression: values beyond fp16's range; the gptq fit stores 16-bit grids: use minmax")
        codes = _codes(groups, scale, minimum, dim, config.levels)
    if config.tiled:  # the kernel's bf16 grids, codes chosen on them
        scale, minimum = scale.to(TILE_GRID), minimum.to(TILE_GRID)
        codes = _codes(groups, scale, minimum, dim, config.levels)
    codes = codes.to(torch.uint8).flatten(dim, dim + 1).narrow(dim, 0, x.shape[dim])
    if config.tiled:
        return Quantized(
            pack_tiles(codes), scale.T.contiguous(), minimum.T.contiguous(), tuple(x.shape), x.dtype, config
        )
    return Quantized(pack(codes, config.num_bits), scale, minimum, tuple(x.shape), x.dtype, config)


def quantize_rows(read: Callable[[int, int], Tensor], shape: tuple[int, ...], config: CompressionConfig) -> Quantized:
    """`quantize` of a tensor given by a reader of its leading rows [start, stop), a slice at a
    time: quantizing takes several fp32 copies of what it quantizes (a 7B model's 131M-value
    token table: ~2 GB), which a model loaded in 4 bits under a memory limit cannot hold beside
    its resident weights (Llama-2-7B under a 3.5 GB plan peaked at 7.7 GiB). The result is
    `quantize`'s own, bit for bit: a slice holds whole groups of rows when groups run along the
    rows, and rows are quantized independently when they run along another dimension."""
    dim = _dim(len(shape), config)
    unit = _row_unit(dim, config)
    rows = max(unit, QUANTIZE_VALUES // max(1, math.prod(shape[1:])) // unit * unit)
    parts = [quantize(read(start, min(start + rows, shape[0])), config) for start in range(0, shape[0], rows)]
    if len(parts) == 1:
        return parts[0]
    fields = (torch.cat([getattr(p, part) for p in parts], _row_dim(part, config)) for part in PARTS)
    return Quantized(*fields, tuple(shape), parts[0].dtype, config)


def _codes(groups: Tensor, scale: Tensor, minimum: Tensor, dim: int, levels: int) -> Tensor:
    step = torch.where(scale > 0, scale.float(), 1.0).unsqueeze(dim + 1)
    return ((groups - minimum.float().unsqueeze(dim + 1)) / step).round_().clamp_(0, levels)


def _squared_error(groups: Tensor, codes: Tensor, scale: Tensor, minimum: Tensor, dim: int) -> Tensor:
    """Per group: the squared error of dequantizing (in fp32, as `dequantize` does)."""
    values = codes * scale.float().unsqueeze(dim + 1) + minimum.float().unsqueeze(dim + 1)
    return (values - groups).square_().sum(dim + 1)


def dequantize(q: Quantized, out: Tensor | None = None) -> Tensor:
    """The tensor again, in its dtype; into `out` (its shape and dtype) when given, so that a
    caller can reuse memory: fresh pages for a model's worth of weights on every pass cost more
    than the arithmetic. Big tensors go a slice of leading rows at a time, so that unpacking's
    temporaries stay in the CPU's caches (a 49,152 x 576 token table: 3x faster)."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.codes.device) if out is None else out
    dim = q.config.group_dim % len(q.shape)
    unit = _row_unit(dim, q.config)
    rows = max(unit, DEQUANTIZE_VALUES // max(1, torch.Size(q.shape[1:]).numel()) // unit * unit)
    for start in range(0, q.shape[0], rows):
        stop = min(start + rows, q.shape[0])
        groups = slice(start // unit, -(-stop // unit)) if dim == 0 else slice(start, stop)
        index = (slice(None), groups) if q.config.tiled else (groups,)  # tiled grids: (groups, out)
        part = Quantized(
            q.codes[start:stop], q.scale[index], q.minimum[index], (stop - start, *q.shape[1:]), q.dtype, q.config
        )
        _dequantize(part, out[start:stop])
    return out


def _dequantize(q: Quantized, out: Tensor) -> None:
    config, shape = q.config, q.shape
    dim = config.group_dim % len(shape)
    codes = untile(q.codes, shape[-1]) if config.tiled else unpack(q.codes, config.num_bits, shape[-1])  # shape
    scale, minimum = (q.scale.T, q.minimum.T) if config.tiled else (q.scale, q.minimum)  # (..., groups)
    pad = scale.shape[dim] * config.group_size - shape[dim]
    if pad:  # the short last group: any codes do, they are cut off again below
        codes = torch.cat((codes, codes.new_zeros(*shape[:dim], pad, *shape[dim + 1 :])), dim)
    grouped = (*shape[:dim], scale.shape[dim], config.group_size, *shape[dim + 1 :])
    codes = codes.view(grouped)
    scale, minimum = scale.float().unsqueeze(dim + 1), minimum.float().unsqueeze(dim + 1)
    if not pad and out.is_contiguous():  # one pass, codes converted on the fly
        torch.addcmul(minimum, codes, scale, out=out.view(grouped))
    else:
        out.copy_(torch.addcmul(minimum, codes, scale).flatten(dim, dim + 1).narrow(dim, 0, shape[dim]))


def pack(codes: Tensor, bits: int) -> Tensor:
    """(..., n) uint8 codes below 2^bits -> (..., bytes) holding each row's codes densely, first
    code in the low bits. 2, 4 and 8 bits tile a byte; 3-bit codes go eight to three bytes."""
    per, unit_bytes = _unit(bits)
    codes = torch.nn.functional.pad(codes, (0, -codes.shape[-1] % per))
    codes = codes.view(*codes.shape[:-1], -1, per).to(torch.int32)
    words = (codes << _shifts(per, bits, codes.device)).sum(-1, dtype=torch.int32)  # per * bits bits each
    packed = (words[..., None] >> _shifts(unit_bytes, 8, codes.device)) & 0xFF
    return packed.to(torch.uint8).flatten(-2)


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """The first n codes of each row of `pack`'s bytes, as uint8."""
    if bits == 8:
        return packed[..., :n]
    per, unit_bytes = _unit(bits)
    if unit_bytes == 1:  # codes within single bytes: shift the bytes themselves, one pass per code
        codes = torch.stack([(packed >> (i * bits)) & (2**bits - 1) for i in range(per)], -1)
        return codes.flatten(-2)[..., :n]
    units = packed.view(*packed.shape[:-1], -1, unit_bytes).to(torch.int32)
    words = (units << _shifts(unit_bytes, 8, packed.device)).sum(-1, dtype=torch.int32)
    codes = (words[..., None] >> _shifts(per, bits, packed.device)) & (2**bits - 1)
    return codes.to(torch.uint8).flatten(-2)[..., :n]


def tileable(shape: tuple[int, ...], config: CompressionConfig) -> bool:
    """Whether a weight of this shape fits the int4 kernel's tiles under this config."""
    return len(shape) == 2 and shape[0] % TILE_ROWS == 0 and shape[1] % config.group_size == 0


def pack_tiles(codes: Tensor) -> Tensor:
    """(n, k) 4-bit codes -> (n, k / 2) bytes in the layout of torch's int4 CPU kernel
    (`_convert_weight_to_int4pack_for_cpu`): for each tile of 64 rows and each column, 32 bytes
    whose low nibbles hold rows 0-31 of the tile and high nibbles rows 32-63. Storing codes so
    makes them the kernel's operand with no conversion at each use; `quantization.int4mm` probes
    that torch still agrees. The bytes are as many as `pack`'s."""
    n, k = codes.shape
    tiles = codes.view(n // TILE_ROWS, 2, TILE_ROWS // 2, k).transpose(2, 3)  # (tiles, halves, k, 32)
    return (tiles[:, 0] | (tiles[:, 1] << 4)).contiguous().view(n, k // 2)


def untile(packed: Tensor, k: int) -> Tensor:
    """`pack_tiles`'s (n, k / 2) bytes -> the (n, k) uint8 codes."""
    tiles = packed.reshape(-1, k, TILE_ROWS // 2)  # (tiles, k, 32)
    return torch.cat((tiles & 0xF, tiles >> 4), -1).transpose(1, 2).reshape(-1, k)


def as_tiles(q: Quantized, config: CompressionConfig) -> Quantized:
    """A row-packed `Quantized` (what a GPTQ fit makes) as `config`'s tiles: the same codes, their
    grids rounded to bf16 (a weight moves by at most 15 / 512 of a step)."""
    if q.config.tiled or not config.tiled:
        return q
    codes = pack_tiles(unpack(q.codes, q.config.num_bits, q.shape[-1]))
    scale, minimum = (t.to(TILE_GRID).T.contiguous() for t in (q.scale, q.minimum))
    return Quantized(codes, scale, minimum, q.shape, q.dtype, replace(q.config, kernel=config.kernel))


def quantized_nbytes(shape: tuple[int, ...], dtype: torch.dtype, config: CompressionConfig) -> int:
    """What `quantize` makes of a tensor of this shape and dtype, in bytes."""
    dim = config.group_dim % len(shape)
    groups = torch.Size(shape).numel() // shape[dim] * -(-shape[dim] // config.group_size)
    codes = torch.Size(shape[:-1]).numel() * packed_bytes(shape[-1], config.num_bits)
    return codes + groups * sum(t.itemsize for t in grid_dtypes(dtype, config))


def scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """What a tensor of this dtype stores its groups' scales in."""
    return torch.float32 if dtype == torch.float32 else HALF


def grid_dtypes(dtype: torch.dtype, config: CompressionConfig) -> tuple[torch.dtype, torch.dtype]:
    """(scale, minimum) dtypes of a tensor's groups. The "gptq" fit keeps both in 16 bits in
    every model (4.5 bits a weight at groups of 64): it chooses codes on the stored grid, so a
    rounded grid costs nothing its fit does not absorb, and it has no exact arithmetic to match.
    Tiled codes keep both in bf16, what the int4 kernel computes with (`quantization.int4mm`)."""
    if config.tiled:
        return TILE_GRID, TILE_GRID
    if config.fit == "gptq":
        return HALF, HALF if dtype == torch.float32 else dtype
    return scale_dtype(dtype), dtype


def packed_bytes(n: int, bits: int) -> int:
    """Bytes that `pack` makes of n codes."""
    per, unit_bytes = _unit(bits)
    return -(-n // per) * unit_bytes


def _unit(bits: int) -> tuple[int, int]:
    """(codes, bytes) of one packing unit."""
    per = 8 if bits == 3 else 8 // bits
    return per, per * bits // 8


def _shifts(count: int, width: int, device: torch.device) -> Tensor:
    return torch.arange(count, dtype=torch.int32, device=device) * width


def _row_dim(part: str, config: CompressionConfig) -> int:
    """The dimension of a part that runs along the tensor's leading rows."""
    return 1 if config.tiled and part != "codes" else 0


def _row_unit(dim: int, config: CompressionConfig) -> int:
    """Leading rows that a slice of a quantized tensor keeps together: those sharing their groups'
    parameters, or a tile's."""
    if dim == 0:
        return config.group_size
    return TILE_ROWS if config.tiled else 1


def _dim(ndim: int, config: CompressionConfig) -> int:
    if not -ndim <= config.group_dim < ndim:
        raise FlexevalError(f"compression: group_dim {config.group_dim} is out of range for a {ndim}-d tensor")
    return config.group_dim % ndim


def _grouped(x: Tensor, dim: int, size: int) -> Tensor:
    """x viewed as (pre..., groups, size, post...) along `dim`; a short last group repeats its last
    value, which changes neither its minimum nor its maximum."""
    pad = -x.shape[dim] % size
    if pad:
        last = x.narrow(dim, x.shape[dim] - 1, 1)
        x = torch.cat((x, last.expand(*x.shape[:dim], pad, *x.shape[dim + 1 :])), dim)
    return x.reshape(*x.shape[:dim], -1, size, *x.shape[dim + 1 :])


def _fit(
    groups: Tensor, low: Tensor, high: Tensor, dim: int, levels: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """(scale, minimum in `dtype`, codes) of the grids spanning [low, high] per group: every
    value of the group within that range stays within half an exact step, (high - low) /
    (2 levels), of its code's value (values outside it, clipped by the "mse" fit, are not held to
    that). An fp16 scale is the nearest fp16 where that keeps the bound, else the one below."""
    exact = (high - low) / levels
    minimum = low.to(dtype)  # for min-max, low is one of the tensor's values: exact in its dtype
    if scale_dtype(dtype) == torch.float32:
        return exact, minimum, _codes(groups, exact, minimum, dim, levels)
    if bool((exact > torch.finfo(HALF).max).any()):
        raise FlexevalError("compression: values too far apart for fp16 scales (a step above 65504); cannot quantize")
    scale = exact.to(HALF)
    subnormal = scale < torch.finfo(HALF).tiny
    scale = torch.where(subnormal & (scale.float() < exact), _next(scale, float("inf")), scale)  # ulp below 6e-8
    codes = _codes(groups, scale, minimum, dim, levels)
    coarser = ~subnormal & (scale.float() > exact)
    if bool(coarser.any()):
        inside = groups.clamp(low.unsqueeze(dim + 1), high.unsqueeze(dim + 1))
        values = codes * scale.float().unsqueeze(dim + 1) + minimum.float().unsqueeze(dim + 1)
        breaks = (values - inside).abs_().amax(dim + 1) > exact / 2
        down = coarser & breaks
        scale = torch.where(down, _next(scale, 0.0), scale)
        codes = torch.where(down.unsqueeze(dim + 1), _codes(groups, scale, minimum, dim, levels), codes)
    return scale, minimum, codes


def _next(h: Tensor, toward: float) -> Tensor:
    """The fp16 neighbour of each value in the direction of `toward`."""
    return torch.nextafter(h, torch.full_like(h, toward))

"""Group-wise quantization: the error bound, dense packing, constant groups, bad configurations."""

from __future__ import annotations

import pytest
import torch

from flexeval import FlexevalError
from flexeval.engine.compression import BITS, CompressionConfig, dequantize, pack, quantize, unpack

SHAPES = [(130,), (7, 130), (64, 64), (3, 5, 9), (2, 3, 4, 33), (1, 1), (576, 100)]


def groups(x: torch.Tensor, config: CompressionConfig) -> torch.Tensor:
    """(..., groups, size) view of x along the config's dimension, a short last group padded with
    its own last value (what the bound is stated over)."""
    x = x.float().movedim(config.group_dim % x.dim(), -1)
    pad = -x.shape[-1] % config.group_size
    x = torch.cat((x, x[..., -1:].expand(*x.shape[:-1], pad)), -1)
    return x.reshape(*x.shape[:-1], -1, config.group_size)


def excess(x: torch.Tensor, config: CompressionConfig) -> torch.Tensor:
    """Per element: |x - dequant(quant(x))| minus the bound (max - min) / (2 (2^b - 1)) of its group."""
    y = dequantize(quantize(x, config))
    assert y.shape == x.shape and y.dtype == x.dtype
    g = groups(x, config)
    bound = (g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / (2 * config.levels)
    return (groups(y, config) - g).abs() - bound


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", SHAPES)
def test_every_value_comes_back_within_half_a_step(bits: int, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(len(shape) * 10 + bits)
    for dim in range(-len(shape), len(shape)):
        for size in (1, 4, 7, 32, 64, 128):
            for spread, offset in ((1.0, 0.0), (0.02, 0.01), (3.0, -2.0), (1e-3, 0.0)):
                x = torch.randn(shape, generator=g) * spread + offset
                config = CompressionConfig(bits, size, dim)
                assert excess(x, config).max() <= 1e-6, (dim, size, spread, offset)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_tensors_keep_their_dtype_and_the_bound(dtype: torch.dtype) -> None:
    x = torch.randn(96, 80, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert excess(x, CompressionConfig(4, 64, 0)).max() <= 1e-6 + x.float().abs().max() * 2**-8  # output rounding


@pytest.mark.parametrize("bits", BITS)
def test_packing_is_dense_and_bit_exact(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    for n in (1, 2, 3, 7, 8, 9, 63, 64, 1000, 4097):
        codes = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.uint8)
        packed = pack(codes, bits)
        per, unit = (8, 3) if bits == 3 else (8 // bits, 1)
        assert packed.dtype == torch.uint8 and len(packed) == -(-n // per) * unit
        assert torch.equal(unpack(packed, bits, n), codes)


def test_pack_puts_the_first_code_in_the_low_bits() -> None:
    assert pack(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21]
    assert pack(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00111001]
    assert pack(torch.tensor([7, 0, 0, 0, 0, 0, 0, 5], dtype=torch.uint8), 3).tolist() == [0x07, 0x00, 0xA0]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_constant_groups_come_back_exactly(bits: int, dtype: torch.dtype) -> None:
    config = CompressionConfig(bits, 64, 1)
    for value in (0.0, 1.0, -3.25, 0.1, -1.7, 1e-5, 1000.0, 2.0**-20):
        x = torch.full((3, 130), value, dtype=dtype)
        assert torch.equal(dequantize(quantize(x, config)), x), value


def test_a_group_with_one_outlier_keeps_the_bound() -> None:
    x = torch.zeros(4, 64)
    x[:, 5] = torch.tensor([1.0, -1.0, 1e-3, 7.0])
    assert excess(x, CompressionConfig(4, 64, 1)).max() <= 1e-6


@pytest.mark.parametrize("dtype, ratio", [(torch.float16, 0.28125), (torch.float32, 0.296875)])
def test_footprint_of_4_bit_groups_of_64(dtype: torch.dtype, ratio: float) -> None:
    q = quantize(torch.randn(576, 1536).to(dtype), CompressionConfig(4, 64, 0))
    groups = (576 // 64) * 1536
    assert q.nbytes == 576 * 1536 // 2 + groups * (2 + dtype.itemsize)  # codes, fp16 scale, minimum
    assert q.nbytes / (576 * 1536 * 2) == ratio


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(num_bits=5), "num_bits must be one of (2, 3, 4, 8)"),
        (dict(group_size=0), "group_size must be a positive integer"),
        (dict(group_size=2.5), "group_size must be a positive integer"),
        (dict(group_dim="0"), "group_dim must be an integer"),
    ],
)
def test_bad_configurations_are_refused(fields: dict, message: str) -> None:
    with pytest.raises(FlexevalError, match=message.replace("(", r"\(").replace(")", r"\)")):
        CompressionConfig(**fields)


def test_bad_tensors_are_refused() -> None:
    with pytest.raises(FlexevalError, match="group_dim 2 is out of range for a 2-d tensor"):
        quantize(torch.ones(2, 2), CompressionConfig(group_dim=2))
    with pytest.raises(FlexevalError, match="values are not finite"):
        quantize(torch.tensor([[1.0, float("nan")]]), CompressionConfig(group_dim=1))
    with pytest.raises(FlexevalError, match="too far apart for fp16 scales"):
        quantize(torch.tensor([[-1e9, 1e9]]), CompressionConfig(num_bits=2, group_dim=1))

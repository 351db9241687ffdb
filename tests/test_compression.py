"""Group-wise quantization: the error bound, dense packing, constant groups, bad configurations;
quantized weights in the engine."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flexeval import Engine, FlexevalError, Policy
from flexeval.engine.kv_cache import QuantizedKVCache
from flexeval.engine.placement import group_rows, table_rows, weight_bytes_per_tier
from flexeval.models import registry
from flexeval.quantization import compression, int4mm
from flexeval.quantization.compression import (
    PARTS,
    Quantized,
    dequantize,
    pack,
    packed_bytes,
    quantize,
    quantize_rows,
    quantized_nbytes,
    unpack,
)
from flexeval.quantization.config import BITS, INT4MM_GROUP_SIZES, CompressionConfig
from tests.helpers import same_results

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
        codes = torch.randint(0, 2**bits, (3, n), generator=g, dtype=torch.uint8)
        packed = pack(codes, bits)
        per, unit = (8, 3) if bits == 3 else (8 // bits, 1)
        assert packed.dtype == torch.uint8 and packed.shape == (3, -(-n // per) * unit) == (3, packed_bytes(n, bits))
        assert torch.equal(unpack(packed, bits, n), codes)
        assert torch.equal(unpack(packed[1], bits, n), codes[1])  # each row on its own


def test_rows_of_a_table_grouped_along_its_width_dequantize_alone() -> None:
    table = torch.randn(50, 70)
    q = quantize(table, CompressionConfig(4, 32, 1))
    rows = torch.tensor([3, 17, 49])
    alone = Quantized(q.codes[rows], q.scale[rows], q.minimum[rows], (3, 70), q.dtype, q.config)
    assert torch.equal(dequantize(alone), dequantize(q)[rows])


@pytest.mark.parametrize("group_dim", [0, 1])
def test_rows_of_a_table_dequantize_from_their_own_parts(group_dim: int) -> None:
    """What the weight store fetches for some rows of a token table: their codes, and their
    groups' scales and minima (each group once when groups run along the rows)."""
    table = torch.randn(150, 70)
    q = quantize(table, CompressionConfig(4, 32, group_dim))
    rows = torch.tensor([3, 17, 31, 32, 33, 149])
    groups = torch.unique_consecutive(rows // 32) if group_dim == 0 else rows
    assert torch.equal(group_rows(rows, q.config, 2), groups)
    fetched = Quantized(q.codes[rows], q.scale[groups], q.minimum[groups], q.shape, q.dtype, q.config)
    assert torch.equal(dequantize(table_rows(fetched, rows)), dequantize(q)[rows])


@pytest.mark.parametrize("fit", ["minmax", "mse"])
@pytest.mark.parametrize("group_dim", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantizing_a_slice_of_rows_at_a_time_makes_the_same_bits(
    fit: str, group_dim: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """How a weight is quantized at load (whole, it would take several fp32 copies of itself):
    slices of 80 rows, cut down to whole groups (64 rows) when groups run along the rows."""
    monkeypatch.setattr(compression, "QUANTIZE_VALUES", 80 * 70)
    table = torch.randn(150, 70).to(dtype)
    config = CompressionConfig(4, 32, group_dim, fit)
    reads = []
    sliced = quantize_rows(lambda start, stop: reads.append(stop - start) or table[start:stop], table.shape, config)
    assert reads == ([64, 64, 22] if group_dim == 0 else [80, 70])
    whole = quantize(table, config)
    assert all(torch.equal(getattr(sliced, part), getattr(whole, part)) for part in PARTS)
    assert (sliced.shape, sliced.dtype) == (whole.shape, whole.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(128, 64), (130, 70)])  # whole groups; a short last group
def test_dequantizing_into_a_given_buffer_computes_the_same(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    q = quantize(torch.randn(shape).to(dtype), CompressionConfig(4, 64, 0))
    out = torch.full(shape, float("nan"), dtype=dtype)
    assert dequantize(q, out).data_ptr() == out.data_ptr()
    assert torch.equal(out, dequantize(q))


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


@pytest.mark.parametrize("bits", BITS)
def test_scales_round_to_the_nearest_fp16_unless_that_breaks_the_bound(bits: int) -> None:
    """Always rounding the scale down would keep the bound too, but bias every step low: a 4-bit
    SmolLM2's perplexity moves by several percent."""
    config = CompressionConfig(bits, 64, 1)
    x = torch.randn(256, 64 * 64, generator=torch.Generator().manual_seed(bits)).bfloat16()
    q = quantize(x, config)
    g = groups(x, config)
    values = groups(dequantize(replace(q, dtype=torch.float32)), config)  # before rounding to bf16
    bound = (g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / (2 * config.levels)
    assert ((values - g).abs() - bound).max() <= 1e-6
    exact = (g.amax(-1) - g.amin(-1)) / config.levels
    nearest = exact.half()
    below = torch.nextafter(nearest, torch.zeros_like(nearest))
    rounded_down = q.scale != nearest
    assert torch.equal(q.scale[rounded_down], below[rounded_down])
    assert (nearest[rounded_down].float() > exact[rounded_down]).all()  # only ever instead of rounding up
    assert rounded_down.float().mean() < 0.05  # half the groups would round up; nearly all of those hold the bound


@pytest.mark.parametrize("bits, gain", [(2, 0.7), (3, 0.9), (4, 0.97), (8, 1.0)])
def test_the_mse_fit_never_errs_more_than_min_max_and_clips_outliers(bits: int, gain: float) -> None:
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(bits))
    x[:, 7] *= 12  # one outlier per group of 64 along dimension 1
    minmax, mse = (CompressionConfig(bits, 64, 1, fit) for fit in ("minmax", "mse"))
    error = {c.fit: groups((dequantize(quantize(x, c)) - x).square(), c).sum(-1) for c in (minmax, mse)}
    assert (error["mse"] <= error["minmax"]).all()
    assert error["mse"].sum() <= gain * error["minmax"].sum()  # 8 bits: clipping an outlier never pays
    for value in (0.0, -1.7, 1000.0):
        constant = torch.full((3, 130), value)
        assert torch.equal(dequantize(quantize(constant, mse)), constant)


@pytest.mark.parametrize("dtype, ratio", [(torch.float16, 0.28125), (torch.bfloat16, 0.28125), (torch.float32, 0.3125)])
def test_footprint_of_4_bit_groups_of_64(dtype: torch.dtype, ratio: float) -> None:
    """16-bit tensors: fp16 scales and minima, 4.5 bits per value; fp32: both fp32, 5 bits."""
    q = quantize(torch.randn(576, 1536).to(dtype), CompressionConfig(4, 64, 0))
    groups = (576 // 64) * 1536
    assert q.scale.dtype == (torch.float32 if dtype == torch.float32 else torch.float16)
    assert q.minimum.dtype == dtype
    assert q.nbytes == 576 * 1536 // 2 + groups * (q.scale.itemsize + dtype.itemsize)
    assert q.nbytes == quantized_nbytes((576, 1536), dtype, CompressionConfig(4, 64, 0))
    assert q.nbytes / (576 * 1536 * 2) == ratio


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(num_bits=5), "num_bits must be one of (2, 3, 4, 8)"),
        (dict(group_size=0), "group_size must be a positive integer"),
        (dict(group_size=2.5), "group_size must be a positive integer"),
        (dict(group_dim="0"), "group_dim must be an integer"),
        (dict(fit="awq"), "fit must be one of ('minmax', 'mse', 'gptq')"),
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
        quantize(torch.tensor([[-1e9, 1e9]], dtype=torch.bfloat16), CompressionConfig(num_bits=2, group_dim=1))


def fake_quantized_checkpoint(
    directory: Path,
    config: CompressionConfig,
    dtype: torch.dtype = torch.float32,
    tables: CompressionConfig | None = None,
) -> None:
    """Rewrite a checkpoint with every matrix replaced by dequantize(quantize(.)) in `dtype`: what
    an engine storing quantized weights must compute; token tables by `tables` if given."""
    path = directory / "model.safetensors"
    tensors = load_file(path)
    for name, w in tensors.items():
        if w.dim() == 2:
            table = tables is not None and ("embed_tokens" in name or "lm_head" in name)
            tensors[name] = dequantize(quantize(w.to(dtype), tables if table else config))
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("config", [CompressionConfig(4, 64, 0), CompressionConfig(3, 32, 1), CompressionConfig(8, 16)])
def test_engine_computes_with_the_dequantized_weights_wherever_they_live(
    config: CompressionConfig, tiny_dir: Path, tmp_path: Path
) -> None:
    seqs = [torch.randint(0, 250, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 40, 17, 2)]
    compressed = {}
    for fields in ({}, dict(w_gpu_percent=0, w_cpu_percent=0), dict(w_gpu_percent=30, w_cpu_percent=40)):
        policy = Policy(gpu_batch_size=2, compress_weight=True, comp_weight_config=config, **fields)
        engine = Engine.load(tiny_dir, policy=policy, offload_dir=tmp_path)
        compressed[str(fields)] = engine.logprobs(seqs), engine.generate(seqs, max_new_tokens=6, stop_token_ids=[])
        engine.close()
    fake_quantized_checkpoint(tiny_dir, config)
    reference = Engine.load(tiny_dir, policy=Policy(gpu_batch_size=2))
    expected_lp, expected_gen = reference.logprobs(seqs), reference.generate(seqs, max_new_tokens=6, stop_token_ids=[])
    for label, (lp, gen) in compressed.items():
        assert gen == expected_gen, label
        assert all(torch.equal(a, b) for a, b in zip(lp, expected_lp)), label


@pytest.mark.slow
def test_quantized_weights_shrink_the_disk_files(tmp_path: Path) -> None:
    """SmolLM2-135M in 16 bits, 4-bit groups of 64, all weights on disk: at most 0.30 of its
    16-bit bytes."""
    policy = Policy(compress_weight=True, w_gpu_percent=0, w_cpu_percent=0)
    engine = Engine.load(registry.DEFAULT_MODEL, policy=policy, offload_dir=tmp_path, dtype="bfloat16")
    on_disk = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
    half = engine.model.nbytes(torch.bfloat16)
    print(f"4-bit weights on disk: {on_disk / 1e6:.1f} MB, {on_disk / half:.3f} of the 16-bit bytes")
    assert on_disk <= 0.30 * half
    assert (
        engine.tiers["weights"][2].stats.held == weight_bytes_per_tier(engine.model.layers, policy, torch.bfloat16)[2]
    )
    engine.close()


CACHE_PLACEMENTS = [
    {},
    dict(cache_gpu_percent=0, cache_cpu_percent=100),
    dict(cache_gpu_percent=0, cache_cpu_percent=0),
    dict(cache_gpu_percent=30, cache_cpu_percent=30, gpu_batch_size=1, num_gpu_batches=3),
]


@pytest.mark.parametrize("name", ["tiny-llama-gqa", "tiny-opt"])
@pytest.mark.parametrize("attn_sparsity", [1.0, 0.4])
def test_a_quantized_cache_generates_the_same_on_every_tier(name: str, attn_sparsity: float, tmp_path: Path) -> None:
    seqs = [torch.randint(0, 250, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 40, 17, 2, 60)]
    plain = Engine.load(name, policy=Policy(gpu_batch_size=2, attn_sparsity=attn_sparsity))
    expected_lp, plain_gen = plain.logprobs(seqs), plain.generate(seqs, max_new_tokens=8, stop_token_ids=[])
    results = []
    for fields in CACHE_PLACEMENTS:
        policy = Policy(**{"gpu_batch_size": 2, **fields}, compress_cache=True, attn_sparsity=attn_sparsity)
        engine = Engine.load(name, policy=policy, offload_dir=tmp_path)
        lp, gen = engine.logprobs(seqs), engine.generate(seqs, max_new_tokens=8, stop_token_ids=[])
        assert same_results(lp, expected_lp)  # scoring keeps no cache
        assert all(g[0] == p[0] for g, p in zip(gen, plain_gen))  # a prompt's prefill is exact
        results.append(gen)
        engine.close()
    assert all(r == results[0] for r in results)
    assert results[0] != plain_gen  # the cache was quantized (4 bits change these random models' choices)


def test_a_quantized_cache_outlasts_its_shortest_budgets() -> None:
    """A micro-batch whose sequences are all done still takes its block's decoding steps: its
    cache must hold them (a quantized cache whose budget was its own failed on the next write)."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 250, (int(n),), generator=g) for n in torch.randint(3, 60, (40,), generator=g)]
    budgets = [int(b) for b in torch.randint(1, 9, (40,), generator=g)]
    out = {}
    for shape in ((1, 1), (3, 2)):
        policy = Policy(gpu_batch_size=shape[0], num_gpu_batches=shape[1], compress_cache=True)
        out[shape] = Engine.load("tiny-llama-gqa", policy=policy).generate(
            prompts, max_new_tokens=budgets, stop_token_ids=[]
        )
    assert [len(o) for o in out[3, 2]] == budgets
    assert out[3, 2] == out[1, 1]


def test_cache_columns_come_back_as_quantized_and_new_columns_exact() -> None:
    config = CompressionConfig(4, 8, -1)
    cache = QuantizedKVCache.empty((2, 3, 10, 16), torch.float32, torch.device("cpu"), config)
    g = torch.Generator().manual_seed(0)
    first, second = (torch.randn(2, 3, n, 16, generator=g) for n in (6, 1))
    k, _ = cache.write(0, first, first)
    assert torch.equal(k, first)
    k, v = cache.write(6, second, -second)
    assert torch.equal(k[:, :, :6], dequantize(quantize(first, config))) and torch.equal(k[:, :, 6:], second)
    assert torch.equal(v[:, :, 6:], -second)
    rows = cache.rows(1, 2)
    k, _ = rows.write(7, second[1:], second[1:])
    assert torch.equal(k[:, :, 6:7], dequantize(quantize(second[1:], config)))  # written through the view


@pytest.mark.parametrize("dtype, ratio", [(torch.bfloat16, 0.28125), (torch.float32, 0.15625)])
def test_a_4_bit_cache_takes_under_0_3_of_its_16_bit_bytes(dtype: torch.dtype, ratio: float) -> None:
    shape = (256, 3, 160, 64)  # SmolLM2-135M: 3 kv heads of 64, 256 sequences of 160 tokens
    cache = QuantizedKVCache.empty(shape, dtype, torch.device("cpu"), CompressionConfig(4, 64, -1))
    stored = sum(t.nbytes for t in cache.parts().values())
    assert stored / (2 * torch.Size(shape).numel() * dtype.itemsize) == ratio


def test_tiles_are_the_int4_kernels_layout_and_hold_the_same_codes() -> None:
    codes = torch.randint(0, 16, (192, 96), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    tiles = compression.pack_tiles(codes)
    assert tiles.shape == (192, 48) and tiles.is_contiguous() and tiles.nbytes == pack(codes, 4).nbytes
    assert torch.equal(tiles, torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 8))
    assert torch.equal(compression.untile(tiles, 96), codes)


@pytest.mark.parametrize("group_size", INT4MM_GROUP_SIZES)
def test_tiled_codes_keep_the_bound_on_bf16_grids_and_slice_like_rows(group_size: int) -> None:
    """bf16 grids: a group's top may fall short of its maximum by 15 steps' rounding (2^-9 each)."""
    x = torch.randn(320, 512, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    rows, tiled = CompressionConfig(4, group_size, 1), CompressionConfig(4, group_size, 1, kernel="int4mm")
    q = quantize(x, tiled)
    assert q.scale.dtype == q.minimum.dtype == torch.bfloat16 and q.scale.shape == (512 // group_size, 320)
    assert q.nbytes == quantized_nbytes(tuple(x.shape), x.dtype, tiled) == quantize(x, rows).nbytes
    step = (groups(x, tiled).amax(-1, keepdim=True) - groups(x, tiled).amin(-1, keepdim=True)) / 15
    assert (excess(x, tiled) <= step * 15 * 2**-9 + groups(x, tiled).abs() * 2**-8).all()
    converted = compression.as_tiles(quantize(x, rows), tiled)
    assert converted.codes.equal(pack_tiles_of(quantize(x, rows)))
    rounded = dict(atol=float(step.max()) * 15 * 2**-9, rtol=2**-7)  # the grid's rounding, then each value's
    torch.testing.assert_close(dequantize(converted).float(), dequantize(quantize(x, rows)).float(), **rounded)
    sliced = quantize_rows(lambda start, stop: x[start:stop], tuple(x.shape), tiled)
    assert all(torch.equal(getattr(sliced, part), getattr(q, part)) for part in PARTS)
    with pytest.raises(FlexevalError, match=r"kernel int4mm cannot tile a tensor of shape \(96, 512\)"):
        quantize(x[:96], tiled)


def test_the_int4_kernel_multiplies_the_codes_row_by_row() -> None:
    g = torch.Generator().manual_seed(2)
    q = quantize((torch.randn(256, 128, generator=g) * 0.05).bfloat16(), CompressionConfig(4, 32, 1, kernel="int4mm"))
    assert int4mm.usable(q)
    x, bias = torch.randn(2, 5, 128, generator=g).bfloat16(), torch.randn(256, generator=g).bfloat16()
    y = int4mm.Int4Weight.of(q).linear(x, bias)
    expected = x.float() @ dequantize(q).float().T + bias.float()
    assert y.shape == (2, 5, 256) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, rtol=0.02, atol=0.02)
    one = int4mm.Int4Weight.of(q).linear(x[1, 3:4], bias)
    assert torch.equal(one, y[1, 3:4])  # a row computes alike among any number of rows


def pack_tiles_of(q: Quantized) -> torch.Tensor:
    return compression.pack_tiles(unpack(q.codes, q.config.num_bits, q.shape[-1]))


def decode_products(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the rows that the int4 kernel multiplies from here on (its probe run before)."""
    assert int4mm.available()
    rows = []
    multiply = int4mm.Int4Weight.linear
    monkeypatch.setattr(
        int4mm.Int4Weight, "linear", lambda w, x, b: rows.append(x.numel() // x.shape[-1]) or multiply(w, x, b)
    )
    return rows


def test_int4mm_decodes_with_the_kernel_alike_in_every_batch_and_placement(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seqs = [torch.randint(0, 250, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 40, 17, 2)]
    tiled = CompressionConfig(4, 64, 1, kernel="int4mm")
    preset = dict(compress_weight=True, comp_weight_config=tiled)
    rows = decode_products(monkeypatch)
    results = []
    for fields in (dict(gpu_batch_size=4), dict(gpu_batch_size=1, num_gpu_batches=2, w_gpu_percent=0, w_cpu_percent=0)):
        engine = Engine.load(tiny_dir, dtype="bfloat16", policy=Policy(**fields, **preset), offload_dir=tmp_path)
        lp = engine.logprobs(seqs)
        assert not rows  # scoring dequantizes
        results.append((lp, engine.generate(seqs, max_new_tokens=6, stop_token_ids=[])))
        assert rows and max(rows) <= 4  # decoding steps multiplied the codes, a micro-batch at a time
        rows.clear()
        engine.close()
    assert results[0][1] == results[1][1] and same_results(results[0][0], results[1][0])
    fake_quantized_checkpoint(tiny_dir, tiled, torch.bfloat16, tables=replace(tiled, kernel="dequantize"))
    expected_lp = Engine.load(tiny_dir, dtype="bfloat16", policy=Policy(gpu_batch_size=4)).logprobs(seqs)
    assert all(torch.equal(a, b) for a, b in zip(results[0][0], expected_lp))  # scoring: the dequantized weights


def test_int4mm_is_refused_where_it_cannot_run(tiny_dir: Path) -> None:
    with pytest.raises(FlexevalError, match="kernel int4mm multiplies 4-bit codes in groups of 32, 64, 128, 256"):
        CompressionConfig(4, 64, 0, kernel="int4mm")
    with pytest.raises(FlexevalError, match="kernel must be one of"):
        CompressionConfig(kernel="marlin")
    policy = Policy(compress_weight=True, comp_weight_config=CompressionConfig(4, 64, 1, kernel="int4mm"))
    with pytest.raises(FlexevalError, match="int4mm multiplies in bfloat16 .* set dtype=bfloat16"):
        Engine.load(tiny_dir, dtype="float32", policy=policy)


def test_command_lines_name_the_kernel_after_the_fit() -> None:
    policy = Policy.from_dict({"compress_weight": "true", "comp_weight_config": "4:64:1:minmax:int4mm"})
    assert policy.comp_weight_config == CompressionConfig(4, 64, 1, "minmax", "int4mm")

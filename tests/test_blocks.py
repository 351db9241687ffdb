"""GGUF blocks kept as shipped (`compression=native`): the kernels compute the `gguf` package's
values bit for bit, and a model that keeps its file's blocks computes what its dense conversion
computes, at the file's size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as reference

from flexeval import Engine, FlexevalError, Policy
from flexeval.engine.placement import weight_bytes_per_tier
from flexeval.models import gguf
from flexeval.quantization import blocks
from tests.helpers import same_results

HALF_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q8_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,)}
NATIVE = Policy(native_weights=True)


@pytest.mark.parametrize("name", sorted(blocks.KERNELS))
def test_kernels_match_the_reference_dequantizer(name: str) -> None:
    """Random blocks (every code and sub-scale bit pattern) with finite fp16 scales."""
    assert set(HALF_FIELDS) == set(blocks.KERNELS)
    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (48 * 5, block_bytes), dtype=np.uint8)
    for start in HALF_FIELDS[name]:
        raw[:, start : start + 2] = rng.normal(0, 0.05, (len(raw), 1)).astype(np.float16).view(np.uint8)
    raw = raw.reshape(48, -1)
    stored = blocks.Blocks((torch.from_numpy(raw.copy()),), (name,), (48, 5 * block), torch.float32)
    expected = torch.from_numpy(reference(raw, GGMLQuantizationType[name]).copy())
    assert torch.equal(blocks.dequantize(stored), expected)
    assert torch.equal(blocks.dequantize(stored, torch.empty(48, 5 * block, dtype=torch.bfloat16)), expected.bfloat16())


@pytest.mark.slow
def test_a_model_keeping_its_blocks_computes_what_the_dense_one_does(smollm2: Engine, smollm2_dir, tmp_path) -> None:
    resident = Engine.load(smollm2_dir, dtype="float32", policy=NATIVE)
    on_disk = Engine.load(
        smollm2_dir,
        dtype="float32",
        policy=Policy(native_weights=True, w_gpu_percent=0, w_cpu_percent=0),
        offload_dir=tmp_path,
    )
    seqs = [smollm2.tokenizer(t).input_ids for t in ("The capital of France is", "Blocks stay blocks", "a b c d")]
    dense = smollm2.logprobs(seqs)
    assert same_results(resident.logprobs(seqs), dense)
    assert same_results(on_disk.logprobs(seqs), dense)
    assert resident.generate(seqs, max_new_tokens=8) == smollm2.generate(seqs, max_new_tokens=8)
    stored = sum(weight_bytes_per_tier(resident.model.layers, resident.policy, torch.float32))
    file_bytes = (smollm2_dir / gguf.GGUF_NAME).resolve().stat().st_size
    assert 0.95 * file_bytes < stored < file_bytes  # the file's blocks (its header aside), not 538 MB of fp32


def test_native_needs_blocks_and_excludes_requantizing() -> None:
    with pytest.raises(FlexevalError, match="compression=native keeps the llama.cpp blocks of a GGUF file"):
        Engine.load("tiny-llama", policy=NATIVE)
    with pytest.raises(FlexevalError, match="choose one"):
        Policy(native_weights=True, compress_weight=True)


@pytest.mark.slow
def test_qwen2_keeps_its_k_quants_bit_for_bit() -> None:
    """Qwen2.5-Coder-0.5B's Q4_K, Q6_K, Q5_0 and Q8_0 blocks on real weights, and its file's size."""
    dense = Engine.load("qwen2.5-coder-0.5b", dtype="float32")
    kept = Engine.load("qwen2.5-coder-0.5b", dtype="float32", policy=NATIVE)
    formats = {f for layer in kept.model.layers for p in layer.params.values() for f, _ in p.blocks}
    assert formats == {"Q4_K", "Q6_K", "Q5_0", "Q8_0"}
    seqs = [kept.tokenizer(t).input_ids for t in ("def fibonacci(n):\n    return", "The capital of France is")]
    assert same_results(kept.logprobs(seqs), dense.logprobs(seqs))
    stored = sum(weight_bytes_per_tier(kept.model.layers, kept.policy, torch.float32))
    assert stored <= 1.15 * 491_400_064

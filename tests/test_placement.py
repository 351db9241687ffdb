"""Placement (`flexeval.engine.placement`): results free of where tensors live and of batch shape,
weight shares per tier, the KV cache on disk, tied embeddings stored once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flexeval import Engine, Policy
from flexeval.engine.kv_cache import QuantizedKVCache
from flexeval.engine.placement import BlockState, weight_bytes_per_tier
from flexeval.engine.tiers import DiskTier, MemoryTier
from flexeval.models import registry
from flexeval.models.common import KVCache
from flexeval.quantization.config import CompressionConfig
from tests.helpers import CPU, DISK, SMALL, Work, run, same_results

PLACEMENTS = {
    "resident": {},
    "weights on disk": DISK,
    "weights 50/30/20": dict(w_gpu_percent=50, w_cpu_percent=30),
    "cache 0/50/50": dict(cache_gpu_percent=0, cache_cpu_percent=50),
    "activations 50/25/25": dict(act_gpu_percent=50, act_cpu_percent=25),
    "everything on disk, no overlap": dict(
        DISK, cache_gpu_percent=0, cache_cpu_percent=0, act_gpu_percent=0, act_cpu_percent=0, overlap=False
    ),
    "one unit per block": dict(sep_layer=False),
    "cache in CPU RAM, attention there": dict(cache_gpu_percent=0, cache_cpu_percent=100, cpu_cache_compute=True),
}


SHAPES = [(1, 1), (4, 1), (4, 8), (16, 4)]


@pytest.mark.parametrize(
    "name", ["tiny-opt", "tiny-llama-gqa", "tiny-mistral", pytest.param(registry.DEFAULT_MODEL, marks=pytest.mark.slow)]
)
def test_placement_and_batch_shape_do_not_change_results(name: str, tmp_path: Path) -> None:
    """Every sequence computed alone (1 x 1) is the reference; no policy may change a bit of it."""
    work = SMALL if name == registry.DEFAULT_MODEL else Work()
    reference_lp, reference_gen = run(name, Policy(gpu_batch_size=1), tmp_path, work)
    for gpu_batch_size, num_gpu_batches in SHAPES:
        for label, fields in PLACEMENTS.items():
            policy = Policy(gpu_batch_size=gpu_batch_size, num_gpu_batches=num_gpu_batches, **fields)
            lp, gen = run(name, policy, tmp_path, work)
            assert gen == reference_gen, (gpu_batch_size, num_gpu_batches, label)
            assert same_results(lp, reference_lp), (gpu_batch_size, num_gpu_batches, label)
    assert list(tmp_path.iterdir()) == []  # every engine removed its offload files


@pytest.mark.slow
def test_smollm2_weights_on_disk_match_resident(smollm2: Engine, tmp_path: Path) -> None:
    seqs = [torch.tensor(smollm2.tokenizer(t).input_ids) for t in ("The capital of France is", "One, two, three,")]
    offloaded = Engine.load(
        registry.DEFAULT_MODEL, dtype="float32", policy=Policy(gpu_batch_size=2, **DISK), offload_dir=tmp_path
    )
    resident = Engine.load(registry.DEFAULT_MODEL, dtype="float32", policy=Policy(gpu_batch_size=2))
    assert same_results(offloaded.logprobs(seqs), resident.logprobs(seqs))
    assert offloaded.generate(seqs, max_new_tokens=8) == resident.generate(seqs, max_new_tokens=8)


@pytest.mark.slow
def test_weight_shares_hold_within_one_layer(smollm2: Engine) -> None:
    layers = smollm2.model.layers
    total = smollm2.model.nbytes(torch.float32)
    largest = max(layer.nbytes(torch.float32) for layer in layers)
    for gpu, cpu in [(50, 30), (25, 0), (30, 0), (0, 100), (10, 10)]:
        placed = weight_bytes_per_tier(layers, Policy(w_gpu_percent=gpu, w_cpu_percent=cpu), torch.float32)
        for share, got in zip((gpu, cpu, 100 - gpu - cpu), placed):
            assert abs(got - share / 100 * total) <= largest


@pytest.mark.parametrize("quantized", [False, True])
def test_a_cache_on_disk_moves_its_new_columns_and_only_the_values_attention_chose(
    quantized: bool, tmp_path: Path
) -> None:
    """Decoding writes back the step's column alone; with `values=False` the values stay on disk
    and `at` reads the pages of the chosen columns, not the whole cache."""
    g = torch.Generator().manual_seed(0)
    config = CompressionConfig(4, 64, -1)
    policy = Policy(cache_gpu_percent=0, cache_cpu_percent=0)
    disk = DiskTier(tmp_path, CPU)
    tiers = [MemoryTier("compute", CPU, home=CPU), MemoryTier("cpu", CPU, home=CPU), disk]

    def restore(parts: dict, stored) -> KVCache | QuantizedKVCache:
        if quantized:
            return QuantizedKVCache.from_parts(parts, 64, torch.float32, config, stored)
        return KVCache(parts["k"], parts["v"], stored)

    state = BlockState(tiers, tiers, policy, micro_batches=1, num_blocks=1, restore_cache=restore)
    shape = (4, 2, 1024, 64)  # 256-byte rows: 16 columns to a 4 KiB page
    if quantized:
        cache = QuantizedKVCache.empty(shape, torch.float32, CPU, config)
        cache.store(0, torch.randn(4, 2, 1000, 64, generator=g), torch.randn(4, 2, 1000, 64, generator=g))
    else:
        cache = KVCache(torch.randn(shape, generator=g), torch.randn(shape, generator=g))
    whole = sum(t.nbytes for t in cache.parts().values())
    state.store_cache(0, 0, cache)
    assert disk.stats.bytes_written == whole

    step_k, step_v = torch.randn(4, 2, 1, 64, generator=g), torch.randn(4, 2, 1, 64, generator=g)
    cache.store(1000, step_k, step_v)  # what a decoding step at column 1000 writes
    fetched, loaded = state.load_cache(0, 0)
    fetched.store(1000, step_k, step_v)
    state.store_cache(0, 0, fetched, columns=(1000, 1001))
    loaded.release()
    assert disk.stats.bytes_written == whole + whole // 1024  # one column of every part

    sparse, loaded = state.load_cache(0, 0, values=False)
    assert all(torch.equal(a, b) for n, (a, b) in _parts(sparse, cache) if n.startswith("k"))
    columns = torch.randint(0, 1001, (4, 2, 30), generator=g)
    assert torch.equal(sparse.rows(1, 3).values_at(columns[1:3]), cache.rows(1, 3).values_at(columns[1:3]))
    disk.stats.reset()
    far_apart = torch.tensor([100, 500, 900]).expand(2, 2, 3)  # >= 56 KiB apart: every row its own read
    assert torch.equal(sparse.rows(1, 3).values_at(far_apart), cache.rows(1, 3).values_at(far_apart))
    if quantized:  # 4- to 32-byte rows: reads merge across gaps, but only the sequences asked for
        assert disk.stats.bytes_read == sum(t[1:3].nbytes for n, t in cache.parts().items() if n.startswith("v"))
    else:
        assert disk.stats.bytes_read == 2 * 2 * 3 * 4096  # a page per row
    loaded.release()
    state.close()
    assert list(tmp_path.iterdir()) == []


def _parts(a, b) -> list[tuple[str, tuple[torch.Tensor, torch.Tensor]]]:
    return [(n, (t, b.parts()[n])) for n, t in a.parts().items()]


@pytest.mark.parametrize("fields", [DISK, dict(w_gpu_percent=0, w_cpu_percent=100), {}])
def test_tied_embeddings_are_stored_once(fields: dict, tmp_path: Path) -> None:
    engine = Engine.load("tiny-opt", policy=Policy(**fields), offload_dir=tmp_path)
    layers = engine.model.layers
    per_layer = sum(layer.nbytes(torch.float32) for layer in layers)
    table = layers[0].params["tokens"].nbytes(torch.float32)
    assert engine.model.nbytes(torch.float32) == per_layer - table  # the unembedding is the embedding
    held = sum(tier.stats.held for tier in engine.tiers["weights"] if tier is not None)
    assert held == engine.model.nbytes(torch.float32)
    (embedding,), (unembedding,) = (engine.weights.load([j]).bundles for j in (0, len(layers) - 1))
    torch.testing.assert_close(embedding["tokens"], unembedding["lm_head"], rtol=0, atol=0)
    engine.close()

"""The offloading engine: placement invariance, tiers, the block schedule's accounting, bad policies."""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from flexeval import Engine, FlexevalError, Policy
from flexeval.engine import heap, schedule
from flexeval.engine.kv_cache import QuantizedKVCache
from flexeval.engine.placement import BlockState, weight_bytes_per_tier
from flexeval.engine.schedule import Unit, units
from flexeval.engine.tiers import DiskTier, MemoryTier, distribute
from flexeval.models import registry
from flexeval.models.common import KVCache
from flexeval.quantization.config import CompressionConfig
from tests.conftest import same_results

CPU = torch.device("cpu")
MB = 2**20
DISK = dict(w_gpu_percent=0, w_cpu_percent=0)
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


@dataclass(frozen=True)
class Workload:
    sequences: int = 37  # scored
    prompts: int = 20  # the first few of them, continued
    new_tokens: int = 16


SMALL = Workload(sequences=20, prompts=8, new_tokens=6)  # for the real model: every policy reads all of it


def sequences(count: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 90, (count,), generator=g).tolist()
    return [torch.randint(0, 250, (n,), generator=g) for n in lengths]


def run(name: str, policy: Policy, offload: Path, work: Workload = Workload()) -> tuple[list[torch.Tensor], list]:
    seqs = sequences(work.sequences)
    engine = Engine.load(name, dtype="float32", policy=policy, offload_dir=offload)  # fp32's guarantee
    try:
        generated = engine.generate(seqs[: work.prompts], max_new_tokens=work.new_tokens, stop_token_ids=[])
        return engine.logprobs(seqs), generated
    finally:
        engine.close()


@pytest.mark.parametrize(
    "name", ["tiny-opt", "tiny-llama-gqa", "tiny-mistral", pytest.param(registry.DEFAULT_MODEL, marks=pytest.mark.slow)]
)
def test_placement_and_batch_shape_do_not_change_results(name: str, tmp_path: Path) -> None:
    """Every sequence computed alone (1 x 1) is the reference; no policy may change a bit of it."""
    work = SMALL if name == registry.DEFAULT_MODEL else Workload()
    reference_lp, reference_gen = run(name, Policy(gpu_batch_size=1), tmp_path, work)
    for gpu_batch_size, num_gpu_batches in SHAPES:
        for label, fields in PLACEMENTS.items():
            policy = Policy(gpu_batch_size=gpu_batch_size, num_gpu_batches=num_gpu_batches, **fields)
            lp, gen = run(name, policy, tmp_path, work)
            assert gen == reference_gen, (gpu_batch_size, num_gpu_batches, label)
            assert same_results(lp, reference_lp), (gpu_batch_size, num_gpu_batches, label)
    assert list(tmp_path.iterdir()) == []  # every engine removed its offload files


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama-gqa"])
def test_cpu_chunks_of_a_micro_batch_compute_what_the_whole_does(name: str, tmp_path: Path, monkeypatch) -> None:
    policy = Policy(gpu_batch_size=16, num_gpu_batches=2, cache_gpu_percent=50, cache_cpu_percent=50)
    whole_lp, whole_gen = run(name, policy, tmp_path)
    monkeypatch.setattr(schedule, "CPU_CHUNK_TOKENS", 100)  # a few sequences per chunk, uneven last chunk
    chunked_lp, chunked_gen = run(name, policy, tmp_path)
    assert chunked_gen == whole_gen
    assert same_results(chunked_lp, whole_lp)


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama-gqa"])
def test_a_streamed_unembedding_agrees_with_the_whole_one(name: str, tmp_path: Path, monkeypatch) -> None:
    """Vocabulary slices sum log-probabilities online: not log_softmax's bits over whole rows, but
    its values to fp32 rounding and the same tokens; and as free of placement and batch shape."""
    monkeypatch.setattr(schedule, "UNEMBED_SLICE_BYTES", 2**12)
    streamed = Policy(gpu_batch_size=1, stream_unembedding=True)
    assert len(Engine.load(name, policy=streamed).plan) > len(Engine.load(name).plan) + 2  # several slices
    whole_lp, whole_gen = run(name, Policy(gpu_batch_size=1), tmp_path)
    reference_lp, reference_gen = run(name, streamed, tmp_path)
    assert reference_gen == whole_gen
    for a, b in zip(reference_lp, whole_lp):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    for fields in ({}, DISK):
        lp, gen = run(name, Policy(gpu_batch_size=4, num_gpu_batches=8, stream_unembedding=True, **fields), tmp_path)
        assert gen == reference_gen and same_results(lp, reference_lp), fields


@pytest.mark.parametrize("name", ["tiny-llama-gqa", "tiny-mistral"])
def test_sparse_attention_changes_decoding_but_not_its_independence_of_the_batch(name: str, tmp_path: Path) -> None:
    sparse = dict(attn_sparsity=0.3)
    dense_lp, dense_gen = run(name, Policy(gpu_batch_size=1), tmp_path)
    reference_lp, reference_gen = run(name, Policy(gpu_batch_size=1, **sparse), tmp_path)
    assert same_results(reference_lp, dense_lp)  # scoring has no decoding steps
    assert reference_gen != dense_gen
    for shape, fields in [
        ((4, 8), {}),
        ((16, 4), dict(cache_gpu_percent=0, cache_cpu_percent=0)),
        ((4, 1), dict(cache_gpu_percent=0, cache_cpu_percent=50, w_gpu_percent=0, w_cpu_percent=0)),
    ]:
        _, gen = run(name, Policy(*shape, **sparse, **fields), tmp_path)
        assert gen == reference_gen, (shape, fields)


def test_smollm2_weights_on_disk_match_resident(smollm2: Engine, tmp_path: Path) -> None:
    seqs = [torch.tensor(smollm2.tokenizer(t).input_ids) for t in ("The capital of France is", "One, two, three,")]
    offloaded = Engine.load(
        registry.DEFAULT_MODEL, dtype="float32", policy=Policy(gpu_batch_size=2, **DISK), offload_dir=tmp_path
    )
    resident = Engine.load(registry.DEFAULT_MODEL, dtype="float32", policy=Policy(gpu_batch_size=2))
    assert same_results(offloaded.logprobs(seqs), resident.logprobs(seqs))
    assert offloaded.generate(seqs, max_new_tokens=8) == resident.generate(seqs, max_new_tokens=8)


def test_distribute_tracks_shares_within_one_item() -> None:
    sizes = [3, 10, 3, 10, 3, 10, 7, 7, 1, 25]
    shares = (0.5, 0.3, 0.2)
    tiers = distribute(sizes, shares)
    for tier, share in enumerate(shares):
        placed = sum(s for s, t in zip(sizes, tiers) if t == tier)
        assert abs(placed - share * sum(sizes)) <= max(sizes)
    assert distribute([5] * 4, (0, 0, 1)) == [2, 2, 2, 2]
    assert distribute([5] * 4, (0.5, 0.5, 0)) == [0, 1, 0, 1]  # interleaved, not in runs


def test_weight_shares_hold_within_one_layer(smollm2: Engine) -> None:
    layers = smollm2.model.layers
    total = smollm2.model.nbytes(torch.float32)
    largest = max(layer.nbytes(torch.float32) for layer in layers)
    for gpu, cpu in [(50, 30), (25, 0), (30, 0), (0, 100), (10, 10)]:
        placed = weight_bytes_per_tier(layers, Policy(w_gpu_percent=gpu, w_cpu_percent=cpu), torch.float32)
        for share, got in zip((gpu, cpu, 100 - gpu - cpu), placed):
            assert abs(got - share / 100 * total) <= largest


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8])
def test_tiers_round_trip_bit_for_bit(dtype: torch.dtype, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    bundle = {
        "a": (torch.randn(7, 13, generator=g) * 100).to(dtype),
        "b": (torch.randn(5000, generator=g) * 100).to(dtype),
    }
    tiers = [
        MemoryTier("compute", CPU, home=CPU),
        MemoryTier("cpu", CPU, home=CPU),
        DiskTier(tmp_path, CPU, durable=True),
        DiskTier(tmp_path, CPU),
    ]
    for tier in tiers:
        tier.put("x", bundle)
        fetched = tier.get("x")
        assert all(torch.equal(fetched.bundle[k], bundle[k]) for k in bundle)
        tier.release(fetched)
        in_place = isinstance(tier, MemoryTier)  # CPU-only: the memory tiers hand out their tensors
        assert tier.stats.bytes_written == (0 if in_place else sum(t.nbytes for t in bundle.values()))
        packed = sum(-(-t.nbytes // 64) * 64 for t in bundle.values())  # tensors 64-byte aligned in a file
        pages = -(-packed // 4096) * 4096  # read as whole aligned blocks
        assert tier.stats.bytes_read == (0 if in_place else pages)
        tier.evict("x")
        assert tier.stats.held == 0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "rows",
    [[0], [5, 6, 7, 8], [3, 900, 901, 1999], list(range(0, 2000, 7)), list(range(1200, 2000))],
    ids=["one", "contiguous", "scattered", "strided", "slice"],
)
def test_tiers_fetch_only_the_requested_rows(rows: list[int], tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    bundle = {"table": torch.randn(2000, 300, generator=g), "other": torch.randn(10, generator=g)}
    wanted = torch.tensor(rows)
    for tier in (MemoryTier("compute", CPU, home=CPU), DiskTier(tmp_path, CPU, durable=True)):
        tier.put("x", bundle)
        fetched = tier.get("x", {"table": wanted})
        assert torch.equal(fetched.bundle["table"], bundle["table"][wanted])
        assert torch.equal(fetched.bundle["other"], bundle["other"])
        if isinstance(tier, DiskTier):  # only the pages holding those rows (and small gaps) are read
            assert tier.stats.bytes_read <= 4096 + (rows[-1] - rows[0] + 3) * 1200 + 4096
        tier.release(fetched)
        tier.evict("x")


def test_tiers_overwrite_only_the_rows_given(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    bundle = {"table": torch.randn(500, 64, generator=g), "other": torch.randn(10, generator=g)}
    index = torch.tensor([3, 4, 5, 200, 499])  # a run of three, two alone
    new = torch.randn(5, 64, generator=g)
    expected = bundle["table"].clone()
    expected[index] = new
    for tier in (MemoryTier("cpu", CPU, home=CPU), DiskTier(tmp_path, CPU)):
        tier.put("x", {n: t.clone() for n, t in bundle.items()})
        tier.write_rows("x", {"table": (index, new)})
        fetched = tier.get("x")
        assert torch.equal(fetched.bundle["table"], expected) and torch.equal(fetched.bundle["other"], bundle["other"])
        assert tier.stats.bytes_written == (0 if tier.in_place else 500 * 64 * 4 + 10 * 4 + new.nbytes)
        tier.release(fetched)
        tier.evict("x")


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


def test_a_bounded_heap_is_settled_after_every_unit_and_changes_no_result(tmp_path: Path, monkeypatch) -> None:
    settled = []
    monkeypatch.setattr(heap.Heap, "settle", lambda self: settled.append(1))
    reference_lp, reference_gen = run("tiny-llama", Policy(gpu_batch_size=4, **DISK), tmp_path, SMALL)
    assert settled == []
    bounded = Policy(gpu_batch_size=4, bound_heap=True, **DISK)
    lp, gen = run("tiny-llama", bounded, tmp_path, SMALL)
    assert gen == reference_gen and same_results(lp, reference_lp)
    units_per_pass = len(units(registry.build_model(registry.resolve("tiny-llama")).layers, bounded, torch.float32))
    scoring = -(-SMALL.sequences // 4)
    decoding = -(-SMALL.prompts // 4) * SMALL.new_tokens  # a prefill and a pass per further token
    assert len(settled) == units_per_pass * (scoring + decoding)


def test_the_heap_is_trimmed_only_once_it_has_grown_by_its_slack(monkeypatch) -> None:
    resident, trims = [100 * MB], []
    monkeypatch.setattr(heap, "_resident_anonymous", lambda: resident[0])
    monkeypatch.setattr(heap, "release_free_memory", lambda: trims.append(resident[0]))
    bounded = heap.Heap(slack=32 * MB)
    for grown in (10, 32, 33, 40, 60, 66):  # MB above the first reading
        resident[0] = (100 + grown) * MB
        bounded.settle()
    assert trims == [133 * MB, 166 * MB]  # each measured from the size after the last trim


def test_disk_reads_reuse_their_buffers(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, CPU)
    tier.put("small", {"w": torch.ones(1000)})
    tier.put("big", {"w": torch.ones(2_000_000)})
    for _ in range(3):
        for key in ("small", "big"):
            tier.release(tier.get(key))
    assert len(tier.pool._free) == 2


def test_disk_bytes_read_per_block_are_one_pass_of_the_disk_weights(tmp_path: Path) -> None:
    policy = Policy(gpu_batch_size=4, num_gpu_batches=2, **DISK)
    engine = Engine.load("tiny-llama", policy=policy, offload_dir=tmp_path)
    seqs = sequences(16)
    engine.logprobs(seqs)  # two blocks of 8
    on_disk = weight_bytes_per_tier(engine.model.layers, policy, torch.float32)[2]
    assert on_disk == engine.model.nbytes(torch.float32)
    pages = [sum(-(-p.nbytes(torch.float32) // 4096) * 4096 for p in x.params.values()) for x in engine.model.layers]
    per_block = engine.stats.tiers["weights"]["disk"]["bytes_read"] / 2
    assert sum(pages[1:]) < per_block <= sum(pages)  # every layer once; of the embedding, the rows in use
    assert engine.stats.prefill_tokens == sum(len(s) - 1 for s in seqs)


def test_decoding_writes_a_cache_on_disk_a_column_a_step(tmp_path: Path) -> None:
    """The prefill stores each cache whole; each later step writes its own column alone."""
    policy = Policy(gpu_batch_size=4, num_gpu_batches=2, cache_gpu_percent=0, cache_cpu_percent=0)
    engine = Engine.load("tiny-llama", policy=policy, offload_dir=tmp_path)
    engine.generate(sequences(8), max_new_tokens=10, stop_token_ids=[])
    disk, model = engine.stats.tiers["cache"]["disk"], engine.model
    column = 2 * policy.gpu_batch_size * model.kv_heads * model.head_dim * 4  # keys and values, fp32
    steps = 9  # the first token comes from the prefill
    assert disk["bytes_written"] == disk["peak_bytes"] + steps * column * model.num_blocks * policy.num_gpu_batches


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


def test_generation_reports_throughput_and_stops_early() -> None:
    engine = Engine.load("tiny-llama", policy=Policy(gpu_batch_size=4, num_gpu_batches=2))
    prompts = sequences(8)
    out = engine.generate(prompts, max_new_tokens=[1] * 8)
    assert [len(o) for o in out] == [1] * 8
    assert engine.stats.decode_tokens == 8 and engine.stats.prefill_tokens == sum(len(p) for p in prompts)
    assert engine.stats.prefill_tokens_per_second > 0


def test_units_group_attention_with_its_mlp_and_slice_a_streamed_unembedding(smollm2: Engine) -> None:
    layers = smollm2.model.layers
    assert units(layers, Policy(), torch.float32)[-1] == Unit((len(layers) - 1,))  # whole by default
    grouped = units(layers, Policy(sep_layer=False, stream_unembedding=True), dtype=torch.float32)
    assert grouped[0] == Unit((0,), tokens=True) and grouped[1].layers == (1, 2)
    head, slices = grouped[smollm2.model.num_blocks + 1], grouped[smollm2.model.num_blocks + 2 :]
    assert head.layers == (len(layers) - 2,) and {u.layers for u in slices} == {(len(layers) - 1,)}
    vocab = [range(*u.vocab) for u in slices]  # even slices of at most 4 MiB of a 49,152 x 576 fp32 table
    assert [t for r in vocab for t in r] == list(range(49_152))
    assert len(vocab) == 28 and {len(r) for r in vocab} == {1755, 1756}  # 1,820 rows make 4 MiB: 28 slices


@pytest.mark.parametrize(
    "fields, expected",
    [
        (dict(w_gpu_percent=80, w_cpu_percent=30), "w_gpu_percent + w_cpu_percent = 110 exceeds 100"),
        (dict(cache_cpu_percent=-5), "cache_cpu_percent must be between 0 and 100"),
        (dict(act_gpu_percent=101), "act_gpu_percent must be between 0 and 100"),
        (dict(gpu_batch_size=0), "gpu_batch_size must be a positive integer"),
        (dict(num_gpu_batches=2.5), "num_gpu_batches must be a positive integer"),
        (dict(attn_sparsity=0.0), r"attn_sparsity must be in \(0, 1\]"),
        (dict(attn_sparsity=1.5), r"attn_sparsity must be in \(0, 1\]"),
        (dict(comp_weight_config="4:64:0"), "comp_weight_config must be a CompressionConfig"),
        (dict(comp_cache_config=CompressionConfig(4, 64, 2)), "comp_cache_config.group_dim must be the head"),
    ],
)
def test_infeasible_policies_are_refused(fields: dict, expected: str) -> None:
    with pytest.raises(FlexevalError, match=expected.replace("+", r"\+")):
        Policy(**fields)


def test_unknown_policy_fields_list_the_valid_ones() -> None:
    with pytest.raises(FlexevalError, match="unknown fields \\['w_gpu'\\]; valid fields: act_cpu_percent"):
        Policy.from_dict({"w_gpu": 10})


def test_missing_offload_directory(tmp_path: Path) -> None:
    with pytest.raises(FlexevalError, match="does not exist"):
        Engine.load("tiny-llama", policy=Policy(**DISK), offload_dir=tmp_path / "nope")


def test_unwritable_offload_directory() -> None:
    with pytest.raises(FlexevalError, match="is not writable"):
        Engine.load("tiny-llama", policy=Policy(**DISK), offload_dir="/proc")


def test_full_offload_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(FlexevalError, match="GiB free but the policy puts"):
        Engine.load("tiny-llama", policy=Policy(**DISK), offload_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_disk_filling_up_midway_is_reported_and_cleaned(tmp_path: Path, monkeypatch) -> None:
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(FlexevalError, match="No space left on device"):
        Engine.load("tiny-llama", policy=Policy(**DISK), offload_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []

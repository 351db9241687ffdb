"""The block schedule (`flexeval.engine.schedule`): its units, CPU chunks, streamed unembedding,
sparse decoding, the heap settled after every unit, and its accounting of what each pass reads and writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flexeval import Engine, Policy
from flexeval.engine import heap, schedule
from flexeval.engine.placement import weight_bytes_per_tier
from flexeval.engine.schedule import Unit, units
from flexeval.models import registry
from tests.helpers import DISK, SMALL, run, same_results, sequences


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


def test_generation_reports_throughput_and_stops_early() -> None:
    engine = Engine.load("tiny-llama", policy=Policy(gpu_batch_size=4, num_gpu_batches=2))
    prompts = sequences(8)
    out = engine.generate(prompts, max_new_tokens=[1] * 8)
    assert [len(o) for o in out] == [1] * 8
    assert engine.stats.decode_tokens == 8 and engine.stats.prefill_tokens == sum(len(p) for p in prompts)
    assert engine.stats.prefill_tokens_per_second > 0


@pytest.mark.slow
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

"""Engine behaviour beyond parity: padding invariance, stopping, sampling, dtypes, cache reuse."""

from __future__ import annotations

import pytest
import torch

from flexeval import Engine, FlexevalError, Policy
from flexeval.engine.batch import left_pad, positions
from flexeval.models import registry, tiny
from flexeval.models.attention import visibility
from tests.helpers import reference_logprobs, same_results


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load("tiny-llama-gqa")


def random_seqs(lengths, seed=0, vocab=tiny.VOCAB - 2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def test_padding_does_not_change_results(engine: Engine) -> None:
    seqs = random_seqs((7, 50, 23))
    together = engine.logprobs(seqs)
    for seq, lp in zip(seqs, together):
        assert same_results([lp], engine.logprobs([seq]))
    batched = engine.generate(seqs, max_new_tokens=12)
    assert batched == [engine.generate([s], max_new_tokens=12)[0] for s in seqs]


def test_left_padding_masks_and_positions() -> None:
    batch = left_pad([torch.tensor([5, 6, 7]), torch.tensor([9])], torch.device("cpu"))
    assert batch.ids.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert positions(batch.valid).tolist() == [[0, 1, 2], [0, 0, 0]]
    assert batch.pads == (0, 2)
    mask = visibility(torch.tensor(batch.pads), 3, 3, None)[:, 0]
    assert mask[0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert mask[1].tolist() == [[True, False, False], [False, True, False], [False, False, True]]
    assert visibility(torch.tensor([2]), 1, 5, None)[0, 0].tolist() == [[False, False, True, True, True]]
    windowed = visibility(torch.zeros(1, dtype=torch.long), 4, 4, window=2)[0, 0]
    assert windowed[3].tolist() == [False, False, True, True]
    assert visibility(torch.zeros(2, dtype=torch.long), 5, 5, None) is None  # unpadded: plain causal
    assert visibility(torch.zeros(2, dtype=torch.long), 1, 5, window=8) is None  # one query sees every key


def test_one_token_sequences_have_no_logprobs(engine: Engine) -> None:
    out = engine.logprobs([[3], [4, 5], [6]])
    assert [len(x) for x in out] == [0, 1, 0]
    assert [len(x) for x in engine.logprobs([[3], [4]])] == [0, 0]


def test_logprobs_are_log_probabilities(engine: Engine) -> None:
    (lp,) = engine.logprobs(random_seqs((30,)))
    assert lp.dtype == torch.float32 and (lp <= 0).all() and torch.isfinite(lp).all()


def test_decoding_along_a_continuation_scores_what_one_pass_does(engine: Engine) -> None:
    prompts, continuations = random_seqs((5, 30, 12), seed=3), random_seqs((9, 1, 20), seed=4)
    decoded = engine.decode_logprobs(prompts, continuations)
    whole = engine.logprobs([torch.cat((p, c)) for p, c in zip(prompts, continuations)])
    for d, w, c in zip(decoded, whole, continuations):
        torch.testing.assert_close(d, w[-len(c) :], rtol=0, atol=2e-5)  # one query at a time, the same math
    with pytest.raises(FlexevalError, match="3 prompts but 2 continuations"):
        engine.decode_logprobs(prompts, continuations[:2])
    with pytest.raises(FlexevalError, match="sequence 0 is empty"):
        engine.decode_logprobs(prompts[:1], [[]])


def test_scores_through_decoding_steps_are_those_of_one_pass(engine: Engine) -> None:
    contexts, endings = random_seqs((5, 30), seed=7), random_seqs((1, 9, 4), seed=8)
    requests = [(contexts[0], endings), (contexts[1], endings[1:])]
    for decoded, whole in zip(engine.decode_score(requests), engine.score(requests)):
        assert len(decoded) == len(whole)
        for d, w in zip(decoded, whole):
            assert d.logprob == pytest.approx(w.logprob, abs=1e-4) and d.greedy == w.greedy
    with pytest.raises(FlexevalError, match="decode_score: request 0 is not a"):
        engine.decode_score([(contexts[0], [])])


def test_a_stream_hands_over_the_blocks_it_announced() -> None:
    """One sort and cut, by the engine: the blocks a stream announces are those it runs (here cut
    by tokens too), each with its own stats, and collected they are the list methods' results."""
    engine = Engine.load("tiny-llama-gqa", policy=Policy(gpu_batch_size=2, num_gpu_batches=2, gpu_batch_tokens=60))
    contexts, endings = random_seqs((5, 30, 12, 7, 40, 3), seed=9), random_seqs((3, 1, 2, 4, 6, 2), seed=10)
    requests = [(c, [e, e[:1]]) for c, e in zip(contexts, endings)]
    for stream, expected in (
        (engine.score_blocks(requests), engine.score(requests)),
        (engine.decode_score_blocks(requests), engine.decode_score(requests)),
        (engine.generate_blocks(contexts, [4, 0, 3, 2, 1, 5]), engine.generate(contexts, [4, 0, 3, 2, 1, 5])),
    ):
        blocks = list(stream)
        assert [b.indices for b in blocks] == stream.blocks and len(blocks) > 1
        assert sorted(i for b in blocks for i in b.indices) == list(range(len(contexts)))
        assert stream.stats.prefill_tokens == sum(b.stats.prefill_tokens for b in blocks) > 0
        found = {i: result for b in blocks for i, result in zip(b.indices, b.results)}
        assert [found[i] for i in range(len(contexts))] == expected


def test_sparse_attention_costs_little_log_likelihood_when_most_is_kept() -> None:
    prompts, continuations = random_seqs((40, 60), seed=5), random_seqs((30, 30), seed=6)
    dense = torch.cat(Engine.load("tiny-llama-gqa").decode_logprobs(prompts, continuations))
    half = torch.cat(
        Engine.load("tiny-llama-gqa", policy=Policy(attn_sparsity=0.5)).decode_logprobs(prompts, continuations)
    )
    tenth = torch.cat(
        Engine.load("tiny-llama-gqa", policy=Policy(attn_sparsity=0.1)).decode_logprobs(prompts, continuations)
    )
    assert not torch.equal(half, dense)
    assert (half - dense).abs().mean() < (tenth - dense).abs().mean()


def test_per_prompt_budgets_and_stop_tokens(engine: Engine) -> None:
    prompts = random_seqs((5, 9, 3), seed=1)
    out = engine.generate(prompts, max_new_tokens=[0, 3, 6], stop_token_ids=[])
    assert [len(o) for o in out] == [0, 3, 6]
    free = engine.generate(prompts, max_new_tokens=8, stop_token_ids=[])
    stop = free[1][2]
    stopped = engine.generate(prompts, max_new_tokens=8, stop_token_ids=[stop])
    assert stopped[1] == free[1][: free[1].index(stop) + 1]  # the stop token ends, and is included


def test_sampling_is_seeded_and_top_k_1_is_greedy(engine: Engine) -> None:
    prompts = random_seqs((4, 11, 6, 20), seed=2)
    kwargs = dict(max_new_tokens=16, stop_token_ids=[])
    a = engine.generate(prompts, temperature=1.5, seed=7, **kwargs)
    assert a == engine.generate(prompts, temperature=1.5, seed=7, **kwargs)
    assert a != engine.generate(prompts, temperature=1.5, seed=8, **kwargs)
    greedy = engine.generate(prompts, **kwargs)
    assert engine.generate(prompts, temperature=0.7, top_k=1, **kwargs) == greedy
    assert engine.generate(prompts, temperature=0.7, top_p=1e-6, **kwargs) == greedy


def test_bfloat16_stays_close_to_float32() -> None:
    seqs = random_seqs((40, 17))
    fp32 = Engine.load("tiny-llama").logprobs(seqs)
    bf16 = Engine.load("tiny-llama", dtype="bfloat16").logprobs(seqs)
    for a, b in zip(fp32, bf16):
        assert (a - b).abs().mean() < 0.05


@pytest.mark.slow
def test_bfloat16_smollm2_matches_transformers_bfloat16(smollm2_dir) -> None:

    engine = Engine.load(smollm2_dir, dtype="bfloat16")
    model = registry.hf_model(smollm2_dir, torch.bfloat16)
    seq = torch.tensor(engine.tokenizer("The capital of France is Paris, and the capital of Italy is Rome.").input_ids)
    (ours,) = engine.logprobs([seq])
    assert (ours - reference_logprobs(model, seq)).abs().max() < 0.1


def test_converted_checkpoints_are_reused(tmp_path) -> None:
    first = registry.resolve("tiny-opt", tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert registry.resolve("tiny-opt", tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp


def test_bin_checkpoints_load_without_pickle(tiny_dir, tmp_path) -> None:
    from safetensors.torch import load_file

    directory = tmp_path / "bin"
    directory.mkdir()
    for f in tiny_dir.iterdir():
        if f.suffix != ".safetensors":
            (directory / f.name).write_bytes(f.read_bytes())
    torch.save(load_file(tiny_dir / "model.safetensors"), directory / "pytorch_model.bin")
    seqs = random_seqs((9, 4))
    for a, b in zip(Engine.load(directory).logprobs(seqs), Engine.load(tiny_dir).logprobs(seqs)):
        assert torch.equal(a, b)

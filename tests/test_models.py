"""Our layer math against transformers on identical weights (fp32): log-probs and greedy decoding."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from flexeval import Engine
from flexeval.models import registry
from tests.helpers import TINY_MODELS, reference_logprobs

LOGPROB_TOLERANCE = 1e-4
SCORE_LENGTHS = (5, 64, 33, 1, 80, 17, 2, 64, 100)
PROMPT_LENGTHS = (3, 40, 12, 1, 25, 7, 64, 18)
TEXTS = (
    "The capital of France is",
    "Hello",
    "In 1492, Columbus sailed across the ocean blue and",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Q: What is the boiling point of water at sea level in degrees Celsius? Give a short answer, then "
    "explain in one sentence why it changes at high altitude, for example on a mountain top.\nA:",
    "Once upon a time",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23,",
    "The quick brown fox jumps over the lazy dog because",
)


@torch.inference_mode()
def reference_generate(model, prompt: Tensor, max_new_tokens: int, eos: int) -> list[int]:
    mask = torch.ones(1, len(prompt), dtype=torch.long)
    out = model.generate(prompt[None], attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, len(prompt) :].tolist()
    return new[: new.index(eos) + 1] if eos in new else new


def assert_matches(engine: Engine, model, scored: list[Tensor], prompts: list[Tensor]) -> None:
    ours = engine.logprobs(scored)
    for seq, lp in zip(scored, ours):
        ref = reference_logprobs(model, seq)
        assert lp.shape == ref.shape
        if len(ref):
            assert (lp - ref).abs().max().item() <= LOGPROB_TOLERANCE
    generated = engine.generate(prompts, max_new_tokens=32)
    eos = engine.tokenizer.eos_token_id
    for prompt, out in zip(prompts, generated):
        assert out == reference_generate(model, prompt, 32, eos)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_model_matches_transformers(name: str) -> None:
    engine = Engine.load(name)
    model = registry.hf_model(registry.resolve(name))
    g = torch.Generator().manual_seed(0)
    scored = [torch.randint(0, engine.model.vocab_size, (n,), generator=g) for n in SCORE_LENGTHS]
    prompts = [torch.randint(0, engine.model.vocab_size, (n,), generator=g) for n in PROMPT_LENGTHS]
    assert_matches(engine, model, scored, prompts)


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2: Engine, smollm2_hf) -> None:
    tokenize = smollm2.tokenizer
    seqs = [torch.tensor(tokenize(t, add_special_tokens=False).input_ids) for t in TEXTS]
    assert len({len(s) for s in seqs}) == len(seqs) and max(len(s) for s in seqs) >= 40
    assert_matches(smollm2, smollm2_hf, seqs, seqs)


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france(smollm2: Engine) -> None:
    prompt = smollm2.tokenizer("The capital of France is", add_special_tokens=False).input_ids
    (out,) = smollm2.generate([prompt], max_new_tokens=3)
    assert smollm2.tokenizer.decode(out).startswith(" Paris")


@pytest.mark.slow
def test_qwen2_gguf_matches_transformers() -> None:
    """A real Qwen2 model (q/k/v biases, unpermuted GGUF rows, K-quant and Q5_0/Q8_0 blocks), read
    from its GGUF file, against transformers reading the same file. `make test-slow` installs it."""
    engine = Engine.load("qwen2.5-coder-0.5b", dtype="float32")
    model = registry.hf_model(registry.resolve("qwen2.5-coder-0.5b"))
    seqs = [torch.tensor(engine.tokenizer(t, add_special_tokens=False).input_ids) for t in TEXTS]
    assert_matches(engine, model, seqs, seqs)


def test_prepared_gguf_config_is_plain(smollm2_dir) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(smollm2_dir)
    assert getattr(config, "quantization_config", None) is None and config.tie_word_embeddings


@pytest.mark.slow
def test_model_layers_describe_every_weight(smollm2: Engine) -> None:
    """The per-layer interface the engine schedules by: kinds in order, and bytes that add up."""
    layers = smollm2.model.layers
    assert [layer.kind for layer in layers[:3]] == ["embed", "attention", "mlp"]
    assert [layer.kind for layer in layers[-2:]] == ["head", "unembed"]
    assert sum(layer.kind == "attention" for layer in layers) == smollm2.model.num_blocks == 30
    bundles = smollm2.weights.load(range(len(layers))).bundles
    unique = {t.data_ptr(): t for bundle in bundles for t in bundle.values()}  # tied embedding counted once
    assert sum(t.numel() for t in unique.values()) == 134_515_008
    for layer, bundle in zip(layers, bundles):
        assert layer.nbytes(torch.float32) == sum(t.nbytes for t in bundle.values())

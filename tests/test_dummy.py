"""Dummy weights at a real model's shape: deterministic, placed like any checkpoint's, never
mistaken for a real model's results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig

from flexeval import Engine, FlexevalError, Policy
from flexeval.models import dummy, registry
from flexeval.report import rows
from flexeval.resolve import resolve
from tests.helpers import compose_run, same_results

SMALL = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}


@pytest.fixture
def small_shape(tmp_path: Path) -> str:
    (tmp_path / "small.json").write_text(json.dumps(SMALL))
    return f"dummy:{tmp_path / 'small.json'}"


def test_every_shipped_shape_is_a_model_we_build() -> None:
    assert {"llama-2-7b", "llama-3.1-8b", "qwen2.5-7b", "opt-1.3b", "opt-30b"} <= set(dummy.shapes())
    billions = {}
    for shape in dummy.shapes():
        config = AutoConfig.from_pretrained(dummy.config_path(shape))
        billions[shape] = registry.FAMILIES[config.model_type](config).nbytes(torch.bfloat16) / 1e9
    assert billions["llama-2-7b"] == pytest.approx(13.48, abs=0.01)  # 6.74 B parameters
    assert billions["opt-30b"] == pytest.approx(59.95, abs=0.01)


def test_dummy_weights_are_deterministic_and_placed_like_real_ones(small_shape: str, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="accuracy is meaningless"):
        directory = registry.resolve(small_shape, tmp_path / "cache")
    config = json.loads((directory / "config.json").read_text())
    assert config["vocab_size"] == 49152  # widened to the default tokenizer's, so every id has a row
    resident = Engine.load(small_shape, cache_dir=tmp_path / "cache")
    on_disk = Engine.load(small_shape, cache_dir=tmp_path / "cache", policy=Policy(w_gpu_percent=0, w_cpu_percent=0))
    seqs = [resident.tokenizer("a dummy model scores this").input_ids, [5, 6, 7]]
    assert same_results(resident.logprobs(seqs), on_disk.logprobs(seqs))
    checkpoint = dummy.DummyCheckpoint(directory)
    weight = checkpoint.get("model.layers.1.mlp.up_proj.weight", torch.float32)
    assert torch.equal(weight, checkpoint.get("model.layers.1.mlp.up_proj.weight", torch.float32))
    assert not torch.equal(weight, checkpoint.get("model.layers.0.mlp.up_proj.weight", torch.float32))
    assert weight.std().item() == pytest.approx(dummy.INIT_STD, rel=0.05)
    assert torch.equal(checkpoint.get("model.norm.weight", torch.float32), torch.ones(64))


def test_a_dummy_run_says_so() -> None:
    run = resolve(compose_run("model=llama-2-7b", "model.pretrained=dummy", "policy=disk-offload"))
    assert run.config.model.pretrained == "dummy:llama-2-7b"
    usage = {"requests": 1, "prompt_tokens": 1, "generated_tokens": 0, "peak_bytes": {}}
    usage |= {"wall_seconds": 1.0, "requests_per_second": 1.0, "tokens_per_second": 1.0}
    results = {
        "config": OmegaConf.to_container(run.config, resolve=True),
        "throughput": {"piqa": usage},
        "results": {"piqa": {"acc,none": 0.5}},
        "higher_is_better": {"piqa": {"acc": True}},
    }
    (row,) = rows(results, "run")
    assert row.model == "llama-2-7b (dummy weights)"


def test_an_unknown_shape_lists_the_shapes() -> None:
    with pytest.raises(
        FlexevalError, match="unknown dummy shape 'llama-9b': use dummy:<shape> with one of .*llama-2-7b"
    ):
        registry.check("dummy:llama-9b")


def test_any_slice_of_a_dummy_tensor_is_the_same(small_shape: str, tmp_path: Path) -> None:
    checkpoint = dummy.DummyCheckpoint(registry.resolve(small_shape, tmp_path / "cache"))
    whole = checkpoint.get("model.embed_tokens.weight", torch.bfloat16)  # 49,152 rows: 48 seeded runs
    for start, stop in ((0, 1), (1000, 3000), (48_000, 49_152)):
        assert torch.equal(
            checkpoint.get_rows("model.embed_tokens.weight", start, stop, torch.bfloat16), whole[start:stop]
        )
